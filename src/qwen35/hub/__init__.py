"""Weights by name from the Hugging Face hub: `qwen35 pull`, `list`, `rm`, and `resolve_model` for
the commands that load a model (a path, a pulled name, or a name to pull first).

`qwen35.hub.pull.pull(...)` downloads; the module keeps its name, so it is not re-exported here.
"""

from qwen35.hub.manifest import Entry, Manifest, manifest_path
from qwen35.hub.pull import ResolvedModel, resolve_model, resolve_model_argument
from qwen35.hub.tags import ModelRef, parse_model_ref

__all__ = ["Entry", "Manifest", "ModelRef", "ResolvedModel", "manifest_path", "parse_model_ref", "resolve_model",
           "resolve_model_argument"]
