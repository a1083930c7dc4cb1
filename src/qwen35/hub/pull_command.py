"""Download a model by tag (qwen3.5:35b-a3b) or hub repo (owner/name:Q4_K_M) into the HF cache."""

from qwen35.hub.command import add_pull_arguments as add_arguments, run_pull as run

__all__ = ["add_arguments", "run"]
