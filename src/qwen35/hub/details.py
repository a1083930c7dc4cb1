"""What a model says about itself, read from its headers alone: `qwen35 show` and Ollama's /api/show.

A GGUF file gives its metadata and tensor infos (formats/gguf.py reads the header; the weights stay
on disk), an HF directory its config.json, generation_config.json and safetensors headers. Nothing
loads the weights or imports torch, so a 20 GB file is described at once. The names follow the
tools people know: the quantization is llama.cpp's file type (Q4_K_M), the parameter count is the
sum of the tensors' shapes, the generation defaults are the ones `qwen35 run` samples with.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from gguf import LlamaFileType

from qwen35.errors import FormatError
from qwen35.formats.gguf import GGUFModel
from qwen35.model.config import config_from_gguf, config_from_hf, generation_defaults

VISION_TENSOR_MARKERS = ("visual.", "vision_tower.")  # an HF checkpoint's vision tower (plan/sources.py agrees)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
SHOWN_ARRAY_ITEMS = 6  # gguf-dump shows this many items of an array, then "..."
SHOWN_STRING_CHARS = 60  # and strings up to this long (longer ones: the first 57 characters and "...")
MODEL_INFO_ARRAY_ITEMS = 5  # Ollama's /api/show leaves out longer arrays unless asked to be verbose
# SamplingParams' names where Ollama's options spell them differently.
OLLAMA_OPTION_NAMES = {"repetition_penalty": "repeat_penalty"}


@dataclass(frozen=True)
class TensorRow:
    name: str
    type_name: str  # the ggml type (Q4_K, F32) or the safetensors dtype (BF16)
    shape: tuple[int, ...]  # as the file stores it: GGUF order (row width first), safetensors row-major


@dataclass(frozen=True)
class Projector:
    """The vision part: a GGUF mmproj, or an HF checkpoint's own vision tower."""

    architecture: str
    parameter_count: int
    embedding_length: int | None
    dimensions: int | None  # the width it hands the text model
    metadata: dict = field(default_factory=dict)
    tensors: tuple[TensorRow, ...] = ()


@dataclass(frozen=True)
class ModelDetails:
    path: str  # what was read: a GGUF's first shard, or an HF directory
    format: str  # "gguf" or "safetensors"
    architecture: str  # qwen35 or qwen35moe
    parameter_count: int | None  # every tensor of the model file (MTP layer included), None where unknown
    context_length: int
    embedding_length: int
    block_count: int  # as a GGUF counts them: the decoder layers and the MTP layers
    quantization: str  # llama.cpp's file type name (Q4_K_M), or the checkpoint's dtype (BF16)
    metadata: dict = field(default_factory=dict)  # the GGUF's every key, or config.json flattened
    tensors: tuple[TensorRow, ...] = ()
    template: str | None = None  # the chat template the model ships; None: run uses the built-in one
    license: str | None = None
    parameters: dict = field(default_factory=dict)  # the generation defaults, as `qwen35 run` samples
    projector: Projector | None = None
    vision: bool = False
    modified_at: float = 0.0  # the file's modification time (seconds since the epoch)

    @property
    def template_in_use(self) -> str:
        from qwen35.chat.template import default_template_source

        return self.template if self.template is not None else default_template_source()

    @property
    def capabilities(self) -> list[str]:
        """As Ollama derives them: tools and thinking where the chat template handles them."""
        template = self.template_in_use
        found = ["completion"]
        if "tools" in template:
            found.append("tools")
        if "<think>" in template or "enable_thinking" in template:
            found.append("thinking")
        if self.vision:
            found.append("vision")
        return found

    def model_info(self, verbose: bool = False) -> dict:
        """/api/show's model_info: GGUF keys, with arrays longer than a few items left out unless verbose."""
        info = {"general.architecture": self.architecture, **self.metadata}
        if self.parameter_count is not None:
            info.setdefault("general.parameter_count", self.parameter_count)
        if self.format != "gguf":  # the keys llama.cpp's converter would write for this checkpoint
            info.update({f"{self.architecture}.context_length": self.context_length,
                         f"{self.architecture}.embedding_length": self.embedding_length,
                         f"{self.architecture}.block_count": self.block_count})
        return {key: _shown(value, verbose) for key, value in info.items()}

    def summary(self) -> dict:
        """Ollama's `details` object (/api/tags, /api/ps, /api/show)."""
        return {"parent_model": "", "format": self.format, "family": self.architecture,
                "families": [self.architecture],
                "parameter_size": human_number(self.parameter_count) if self.parameter_count else "",
                "quantization_level": self.quantization}


def read_model_details(path: str | os.PathLike, mmproj: str | os.PathLike | None = None) -> ModelDetails:
    """A GGUF file (any shard of a split one) or an HF directory, plus an optional GGUF vision projector."""
    path = Path(path)
    if path.is_dir():
        details = _hf_details(path)
    elif path.is_file():
        details = _gguf_details(path)
    else:
        raise FormatError(f"no model at {path}: no such file or directory")
    if mmproj is not None:
        details = replace(details, projector=_mmproj_projector(Path(mmproj)), vision=True)
    return details


# --- GGUF ----------------------------------------------------------------------------------------


def _gguf_details(path: Path) -> ModelDetails:
    with GGUFModel(path) as gguf:
        metadata, infos = gguf.metadata, gguf.tensors
        if metadata.get("general.architecture") == "clip":
            raise FormatError(f"{path} is a vision projector (mmproj): show the model's GGUF, "
                              "with --mmproj for the projector")
        if not infos:
            raise FormatError(f"{path} holds no tensors (a vocabulary-only GGUF?): not a model to run")
        config = config_from_gguf(metadata, infos, str(path))
        tensors = tuple(TensorRow(info.name, info.type_name, info.shape) for info in infos.values())
        block_count = config.num_layers + config.mtp_num_layers
        template = metadata.get("tokenizer.chat_template")
        return ModelDetails(
            path=gguf.path, format="gguf", architecture=config.architecture,
            parameter_count=sum(math.prod(row.shape) for row in tensors),
            context_length=config.context_length, embedding_length=config.hidden_size, block_count=block_count,
            quantization=gguf_file_type(metadata.get("general.file_type"), tensors),
            metadata=dict(metadata), tensors=tensors, template=template if isinstance(template, str) else None,
            license=_gguf_license(metadata), parameters=generation_defaults(),
            modified_at=max(os.path.getmtime(f.path) for f in gguf.files))


def gguf_file_type(number, tensors: tuple[TensorRow, ...]) -> str:
    """llama.cpp's name for general.file_type (LlamaFileType.MOSTLY_Q4_K_M -> Q4_K_M); a file that
    gives none is named after the type holding most of its weights, as llama.cpp guesses it."""
    try:
        file_type = LlamaFileType(int(number))
    except (TypeError, ValueError):
        file_type = LlamaFileType.GUESSED
    if file_type != LlamaFileType.GUESSED:
        return file_type.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    weights = Counter()
    for row in tensors:
        weights[row.type_name] += math.prod(row.shape)
    return weights.most_common(1)[0][0] if weights else "unknown"


def _gguf_license(metadata: dict) -> str | None:
    parts = [metadata.get(key) for key in ("general.license.name", "general.license", "general.license.link")]
    parts = list(dict.fromkeys(part for part in parts if isinstance(part, str) and part))
    return "\n".join(parts) or None


def _mmproj_projector(path: Path) -> Projector:
    with GGUFModel(path) as gguf:
        metadata = dict(gguf.metadata)
        if metadata.get("general.architecture") != "clip":
            raise FormatError(f"--mmproj {path}: not a vision projector (its architecture is "
                              f"{metadata.get('general.architecture')!r}, a projector's is 'clip')")
        tensors = tuple(TensorRow(info.name, info.type_name, info.shape) for info in gguf.tensors.values())
    return Projector("clip", sum(math.prod(row.shape) for row in tensors),
                     metadata.get("clip.vision.embedding_length"), metadata.get("clip.vision.projection_dim"),
                     metadata, tensors)


# --- HF directory --------------------------------------------------------------------------------


def _hf_details(directory: Path) -> ModelDetails:
    from qwen35.chat.tokenizer import _hf_chat_template, _read_json
    from qwen35.plan.sources import read_safetensors_header

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FormatError(f"{directory} is not an HF model directory: it has no config.json")
    raw = _read_json(config_file)
    generation = _read_json(directory / "generation_config.json")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{directory}: no .safetensors files")
    text, vision = [], []
    for file in files:
        for name, dtype, shape, _ in read_safetensors_header(file):
            (vision if any(marker in name for marker in VISION_TENSOR_MARKERS) else text).append(
                TensorRow(name, dtype, shape))
    config = config_from_hf(raw, generation, len(text), str(config_file))
    template = _hf_chat_template(directory, _read_json(directory / "tokenizer_config.json"))
    if isinstance(template, dict):  # named templates: the one transformers calls default
        template = template.get("default") or next(iter(template.values()), None)
    quant_method = (raw.get("quantization_config") or {}).get("quant_method")
    dtypes = Counter()
    for row in text:
        dtypes[row.type_name] += math.prod(row.shape)
    return ModelDetails(
        path=str(directory), format="safetensors", architecture=config.architecture,
        parameter_count=sum(math.prod(row.shape) for row in text), context_length=config.context_length,
        embedding_length=config.hidden_size, block_count=config.num_layers + config.mtp_num_layers,
        quantization=str(quant_method).upper() if quant_method else dtypes.most_common(1)[0][0],
        metadata=_flattened(raw), tensors=tuple(text), template=template, license=_license_file(directory),
        parameters=generation_defaults(generation), projector=_hf_projector(raw, vision),
        vision=bool(vision), modified_at=max(os.path.getmtime(f) for f in [config_file, *files]))


def _hf_projector(raw: dict, tensors: list[TensorRow]) -> Projector | None:
    if not tensors:
        return None
    vision = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else {}
    return Projector(str(vision.get("model_type") or "vision"), sum(math.prod(row.shape) for row in tensors),
                     vision.get("hidden_size"), vision.get("out_hidden_size"), _flattened(vision), tuple(tensors))


def _license_file(directory: Path) -> str | None:
    for name in LICENSE_FILES:
        if (directory / name).is_file():
            return (directory / name).read_text(encoding="utf-8", errors="replace").strip() or None
    return None


def _flattened(values: dict, prefix: str = "") -> dict:
    """config.json's nested objects as dotted keys (text_config.hidden_size), as GGUF keys read."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --- what a served model shows -------------------------------------------------------------------


def served_model_details(path: str, model, started_at: float) -> ModelDetails:
    """The details of the model a server runs: its file's, read once per version of the file, with the
    vision the loaded model has (an --mmproj); from the loaded config where the file cannot be read."""
    try:
        stat = os.stat(path)
        details = _cached_details(path, stat.st_mtime_ns, stat.st_size)
    except (OSError, FormatError):
        config = model.config
        details = ModelDetails(path=path, format="gguf" if path.endswith(".gguf") else "safetensors",
                               architecture=config.architecture, parameter_count=None,
                               context_length=config.max_position_embeddings,
                               embedding_length=config.hidden_size, block_count=config.num_layers,
                               quantization="", modified_at=started_at)
    return replace(details, vision=getattr(model, "vision", None) is not None)


@functools.lru_cache(maxsize=4)
def _cached_details(path: str, mtime_ns: int, size: int) -> ModelDetails:
    return read_model_details(path)


# --- Ollama's /api/show --------------------------------------------------------------------------


def show_response(details: ModelDetails, parameters: dict | None = None, verbose: bool = False,
                  name: str | None = None) -> dict:
    """Ollama's /api/show object. `parameters`: the sampling defaults in force (a server's flags over the
    model's); the model's own by default. `verbose` adds the long arrays and the tensors."""
    parameters = details.parameters if parameters is None else parameters
    response = {
        "license": details.license or "",
        "modelfile": modelfile(details, parameters, name),
        "parameters": "\n".join(f"{key:<30} {value}" for key, value in ollama_parameters(parameters)),
        "template": details.template_in_use,
        "system": "",
        "details": details.summary(),
        "model_info": details.model_info(verbose),
        "capabilities": details.capabilities,
        "modified_at": datetime.fromtimestamp(details.modified_at, timezone.utc).isoformat(),
    }
    if details.projector is not None:
        projector = details.projector
        response["projector_info"] = {key: _shown(value, verbose) for key, value in {
            "general.architecture": projector.architecture, **projector.metadata,
            "general.parameter_count": projector.parameter_count}.items()}
    if verbose:
        response["tensors"] = [{"name": row.name, "type": row.type_name, "shape": list(row.shape)}
                               for row in details.tensors]
    return response


def ollama_parameters(parameters: dict) -> list[tuple[str, str]]:
    """(Ollama option name, value as Ollama prints it) of sampling defaults; generation_config's
    do_sample false means greedy, as SamplingParams reads it."""
    options = {key: value for key, value in parameters.items() if key != "do_sample" and value is not None}
    if parameters.get("do_sample") is False:
        options["temperature"] = 0
    return sorted((OLLAMA_OPTION_NAMES.get(key, key), _number(value)) for key, value in options.items())


def modelfile(details: ModelDetails, parameters: dict, name: str | None = None) -> str:
    """An Ollama-style Modelfile of what the model ships (its template is Jinja, not Go's)."""
    lines = ['# Modelfile generated by "qwen35 show"']
    if name:
        lines += ["# To build a new Modelfile based on this, replace FROM with:", f"# FROM {name}"]
    lines += ["", f"FROM {details.path}"]
    lines += [f'TEMPLATE """{details.template_in_use}"""']
    lines += [f"PARAMETER {key} {value}" for key, value in ollama_parameters(parameters)]
    if details.license:
        lines.append(f'LICENSE """{details.license}"""')
    return "\n".join(lines) + "\n"


def human_number(count: int) -> str:
    """A parameter count as Ollama writes it: 8.2M, 34.7B, 999.89M, 301K."""
    for suffix, scale, decimals in (("T", 1e12, 1), ("B", 1e9, 1), ("M", 1e6, 2)):
        if count >= scale:
            value = count / scale
            return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.{decimals}f}{suffix}"
    return f"{count // 1000}K" if count >= 1000 else str(count)


def summarise(value) -> str:
    """One metadata value on one line, as llama.cpp's gguf-dump prints it: strings quoted and cut at
    60 characters, arrays cut after 6 items."""
    value = _plain(value)
    if isinstance(value, str):
        return repr(value if len(value) <= SHOWN_STRING_CHARS else value[:SHOWN_STRING_CHARS - 3] + "...")
    if isinstance(value, list):
        shown = repr(value[:SHOWN_ARRAY_ITEMS])
        return shown[:-1] + ", ...]" if len(value) > SHOWN_ARRAY_ITEMS else shown
    return str(value)


def _shown(value, verbose: bool):
    value = _plain(value)
    if isinstance(value, list) and len(value) > MODEL_INFO_ARRAY_ITEMS and not verbose:
        return None
    return value


def _plain(value):
    """numpy arrays and scalars as the JSON-ready Python values they hold."""
    return value.tolist() if hasattr(value, "tolist") else value


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value) if isinstance(value, str) else str(value)
