"""HF Qwen 3.5 checkpoints: config.json + safetensors, mapped onto the network's canonical weights.

Two layouts are declared: `Qwen3_5*ForConditionalGeneration` keeps the text model
under `model.language_model.` (and the vision tower under `model.visual.`, which
formats/weights_mmproj.py maps); `*ForCausalLM` keeps it under `model.`. `lm_head` and the MTP block
(`mtp.*`) sit at the top level in both.

MoE experts come in two declared layouts: fused 3-D tensors (`experts.gate_up_proj`
[E, 2I, H], gate rows first, and `experts.down_proj` [E, H, I], as transformers
holds them in memory) or one tensor per expert (`experts.{e}.gate_proj.weight`
..., as released checkpoints and transformers' save_pretrained write them).

HF stores norms zero-centred (the network multiplies by 1 + w), `A_log` instead of
the decay rate -exp(A_log), the conv weight as [C, 1, K], and MoE experts fused
(`gate_up_proj` [E, 2I, H], gate rows first). Each rule below says which source
tensor a canonical weight comes from, the source shape, and the transform.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from qwen35.errors import FormatError

SUPPORTED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
LAYOUT_PREFIXES = {"ForConditionalGeneration": "model.language_model.", "ForCausalLM": "model."}


def _zero_centred_norm(w: torch.Tensor) -> torch.Tensor:
    return 1.0 + w.float()


def _decay_rate(a_log: torch.Tensor) -> torch.Tensor:
    return -a_log.float().exp()


def _conv_weight(w: torch.Tensor) -> torch.Tensor:
    return w[:, 0, :]


def _first_half_rows(w: torch.Tensor) -> torch.Tensor:
    return w[:, : w.shape[1] // 2]


def _second_half_rows(w: torch.Tensor) -> torch.Tensor:
    return w[:, w.shape[1] // 2 :]


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex on the canonical name
    source: str  # replacement template for the source name (before the layout prefix)
    transform: Callable | None = None
    source_shape: Callable[[tuple], tuple] = lambda shape: shape  # canonical shape -> source shape


# First match wins.
RULES = [
    Rule(r"^(.*)\.linear_attn\.decay_rate$", r"\1.linear_attn.A_log", _decay_rate),
    Rule(r"^(.*)\.linear_attn\.dt_bias$", r"\1.linear_attn.dt_bias"),
    Rule(r"^(.*)\.linear_attn\.conv1d$", r"\1.linear_attn.conv1d.weight", _conv_weight, lambda s: (s[0], 1, s[1])),
    Rule(r"^(.*)\.linear_attn\.norm$", r"\1.linear_attn.norm.weight"),  # the one norm that is not zero-centred
    Rule(r"^(.*(?:layernorm|q_norm|k_norm|pre_fc_norm_embedding|pre_fc_norm_hidden)|norm|mtp\.norm)$",
         r"\1.weight", _zero_centred_norm),
    Rule(r"^(.*)\.experts\.gate$", r"\1.experts.gate_up_proj", _first_half_rows, lambda s: (s[0], 2 * s[1], s[2])),
    Rule(r"^(.*)\.experts\.up$", r"\1.experts.gate_up_proj", _second_half_rows, lambda s: (s[0], 2 * s[1], s[2])),
    Rule(r"^(.*)\.experts\.down$", r"\1.experts.down_proj"),
    Rule(r"^(.*)$", r"\1.weight"),
]


PER_EXPERT_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


@dataclass(frozen=True)
class Source:
    name: str
    shape: tuple[int, ...]
    transform: Callable | None
    stacked: tuple[str, ...] = ()  # per-expert tensors (each of `shape`) stacked into one [E, ...]


def source_for(canonical: str, shape: tuple[int, ...], prefix: str, tied: bool, has=lambda name: True) -> Source:
    """Where a canonical weight lives in an HF checkpoint with the given layout prefix.

    `has(name)` tells the fused expert layout from the per-expert one.
    """
    if canonical == "lm_head":
        return Source(prefix + "embed_tokens.weight" if tied else "lm_head.weight", shape, None)
    expert = re.fullmatch(r"(.*)\.experts\.(gate|up|down)", canonical)
    if expert is not None:
        base = expert[1] if expert[1].startswith("mtp.") else prefix + expert[1]
        first = f"{base}.experts.0.{PER_EXPERT_NAMES[expert[2]]}.weight"
        if has(first):
            names = tuple(f"{base}.experts.{e}.{PER_EXPERT_NAMES[expert[2]]}.weight" for e in range(shape[0]))
            return Source(names[0], tuple(shape[1:]), None, stacked=names)
    for rule in RULES:
        if re.match(rule.pattern, canonical):
            name = re.sub(rule.pattern, rule.source, canonical)
            if not name.startswith("mtp."):
                name = prefix + name
            return Source(name, tuple(rule.source_shape(shape)), rule.transform)
    raise AssertionError(f"no rule for {canonical}")  # the last rule matches everything


class HFCheckpoint:
    """A directory with config.json and one or more safetensors files (with or without an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = _read_json(self.path / "config.json", required=True)
        self.generation_config = _read_json(self.path / "generation_config.json", required=False) or {}
        self.prefix = _layout_prefix(self.config, self.path)
        self._handles: dict[Path, object] = {}
        self._files: dict[str, Path] = self._index()

    def _index(self) -> dict[str, Path]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.exists():
            weight_map = (_read_json(index_path, required=True) or {}).get("weight_map")
            if not isinstance(weight_map, dict):
                raise FormatError(f"{index_path}: no weight_map")
            files = {name: self.path / file for name, file in weight_map.items()}
            for file in set(files.values()):
                if not file.exists():
                    raise FormatError(f"{index_path} names {file.name}, which is missing")
            return files
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise FormatError(f"{self.path}: no .safetensors files")
        files = {}
        for shard in shards:
            for name in self._open(shard).keys():
                files[name] = shard
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as error:  # safetensors raises its own error types for bad headers
                raise FormatError(f"{file}: not a readable safetensors file ({error})") from None
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return list(self._files)

    def check(self, source: Source) -> None:
        """Presence, dtype and shape, from the headers alone (nothing is read or allocated)."""
        for name in source.stacked or (source.name,):
            if name not in self._files:
                raise FormatError(f"{self.path}: tensor {name} is missing")
            tensor_slice = self._open(self._files[name]).get_slice(name)
            dtype = tensor_slice.get_dtype()
            if dtype not in SUPPORTED_DTYPES:
                raise FormatError(f"{self.path}: tensor {name} has dtype {dtype} (bf16, f16 and f32 are supported)")
            shape = tuple(tensor_slice.get_shape())
            if shape != source.shape:
                raise FormatError(f"{self.path}: tensor {name} has shape {list(shape)}, expected {list(source.shape)}")

    def load(self, source: Source, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, transformed, in `dtype` (None: as stored)."""
        self.check(source)
        if source.stacked:
            return torch.stack([self._read(name).to(dtype) for name in source.stacked])
        tensor = self._read(source.name)
        if source.transform is not None:
            tensor = source.transform(tensor)
        return tensor.to(dtype).contiguous()

    def _read(self, name: str) -> torch.Tensor:
        try:
            return self._open(self._files[name]).get_tensor(name)
        except Exception as error:
            raise FormatError(f"{self.path}: cannot read tensor {name} ({error})") from None


def _layout_prefix(config: dict, path: Path) -> str:
    architectures = config.get("architectures") or []
    for architecture in architectures:
        if isinstance(architecture, str) and architecture.startswith("Qwen3_5"):
            for suffix, prefix in LAYOUT_PREFIXES.items():
                if architecture.endswith(suffix):
                    return prefix
    raise FormatError(
        f"{path}/config.json: architectures {architectures} are not a Qwen 3.5 text or multimodal model "
        "(Qwen3_5*ForConditionalGeneration or Qwen3_5*ForCausalLM)"
    )


def _read_json(path: Path, required: bool):
    if not path.exists():
        if required:
            raise FormatError(f"{path} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path}: not valid JSON ({error})") from None
