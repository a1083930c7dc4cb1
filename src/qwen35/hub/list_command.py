"""The models pulled so far: name, quant, size, when."""

from qwen35.hub.command import add_list_arguments as add_arguments, run_list as run

__all__ = ["add_arguments", "run"]
