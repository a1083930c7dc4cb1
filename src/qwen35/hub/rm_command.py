"""Forget a pulled model and delete its files from the HF cache when nothing else uses them."""

from qwen35.hub.command import add_rm_arguments as add_arguments, run_rm as run

__all__ = ["add_arguments", "run"]
