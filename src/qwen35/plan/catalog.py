"""The Qwen 3.5 family as data: one frozen spec per size, and every tensor it has.

The table comes from the released configs (see architecture.md). Tensors are
enumerated with their GGUF names and shapes (GGUF order: row width first), as
llama.cpp's converter writes them: the text model, the MTP layer (an extra block
index L carrying `nextn.*` tensors plus a full-attention block and its FFN) and
the vision tower as an mmproj file. Everything the planner counts starts here.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import dataclass, field

VOCAB_SIZE = 248320

TEXT, MTP, VISION = "text", "mtp", "vision"


@dataclass(frozen=True)
class VisionSpec:
    # 9B and up use 27/1152/4304; 2B and 4B's tower (24/1024/4096, as in Qwen3-VL's small
    # sizes) is inferred: it is the one that reproduces their published totals.
    depth: int = 27
    hidden: int = 1152
    ffn: int = 4304
    heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a 48x48 grid


@dataclass(frozen=True)
class ModelSpec:
    """A text model's shape, enough to list its tensors and size its caches."""

    name: str  # canonical tag, e.g. "35b-a3b"
    hidden: int
    n_layers: int  # text blocks, without the MTP layer
    ffn: int  # dense FFN width (0 for MoE)
    n_head: int
    n_head_kv: int
    linear_k_heads: int
    linear_v_heads: int
    tied_embeddings: bool
    head_dim: int = 256
    linear_k_dim: int = 128
    linear_v_dim: int = 128
    conv_kernel: int = 4
    full_attention_interval: int = 4
    vocab: int = VOCAB_SIZE
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    mtp_layers: int = 1
    vision: VisionSpec | None = field(default_factory=VisionSpec)
    native_context: int = 262144
    # Explicit per-layer kinds (True = full attention) when read from a file; else from the interval.
    full_attention_flags: tuple[bool, ...] | None = None
    label: str = ""  # shown instead of the canonical name (a file's own name)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    @property
    def display_name(self) -> str:
        return self.label or "Qwen3.5-" + self.name.upper()

    def is_full_attention(self, layer: int) -> bool:
        if layer >= self.n_layers:
            return True  # the MTP layer is a full-attention block
        if self.full_attention_flags is not None:
            return self.full_attention_flags[layer]
        return (layer + 1) % self.full_attention_interval == 0

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_full_attention(i)]

    @property
    def linear_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if not self.is_full_attention(i)]

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_k_heads * self.linear_k_dim + self.linear_v_heads * self.linear_v_dim

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the row width
    part: str  # TEXT, MTP or VISION
    layer: int | None = None  # block index, None outside blocks

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def is_expert(self) -> bool:
        return "_exps." in self.name


CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec("0.8b", 1024, 24, 3584, 8, 2, 16, 16, tied_embeddings=True,
              vision=VisionSpec(depth=12, hidden=768, ffn=3072, heads=12)),
    ModelSpec("2b", 2048, 24, 6144, 8, 2, 16, 16, tied_embeddings=True,
              vision=VisionSpec(depth=24, hidden=1024, ffn=4096, heads=16)),
    ModelSpec("4b", 2560, 32, 9216, 16, 4, 16, 32, tied_embeddings=True,
              vision=VisionSpec(depth=24, hidden=1024, ffn=4096, heads=16)),
    ModelSpec("9b", 4096, 32, 12288, 16, 4, 16, 32, tied_embeddings=False),
    ModelSpec("27b", 5120, 64, 17408, 24, 4, 16, 48, tied_embeddings=False),
    ModelSpec("35b-a3b", 2048, 40, 0, 16, 2, 16, 32, tied_embeddings=False,
              n_experts=256, n_experts_used=8, expert_ffn=512, shared_ffn=512),
    ModelSpec("122b-a10b", 3072, 48, 0, 32, 2, 16, 64, tied_embeddings=False,
              n_experts=256, n_experts_used=8, expert_ffn=1024, shared_ffn=1024),
    ModelSpec("397b-a17b", 4096, 60, 0, 32, 2, 16, 64, tied_embeddings=False,
              n_experts=512, n_experts_used=10, expert_ffn=1024, shared_ffn=1024),
)

_BY_KEY = {re.sub(r"[^a-z0-9.]", "", spec.name): spec for spec in CATALOG}


def _normalise(name: str) -> str:
    key = name.strip().lower()
    key = re.sub(r"^(unsloth/|qwen/|hf\.co/)", "", key)
    key = re.sub(r"^(qwen[-_ ]?3[._]?5)", "", key)
    key = re.sub(r"(-gguf|-instruct|-base)$", "", key)
    return re.sub(r"[^a-z0-9.]", "", key)


def find_model(name: str) -> ModelSpec:
    """A catalog entry by a forgiving name: '27b', '35b-a3b', 'qwen3.5:35b-a3b', 'Qwen3.5-122B-A10B', '35b'."""
    from qwen35.errors import UnknownNameError

    key = _normalise(name)
    if key in _BY_KEY:
        return _BY_KEY[key]
    # "35b" alone names the only size that starts with it ("35b-a3b").
    prefixed = [spec for k, spec in _BY_KEY.items() if k.startswith(key) and key.endswith("b") and len(key) > 1]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(key, list(_BY_KEY), n=3, cutoff=0.4)
    names = ", ".join(spec.name for spec in CATALOG)
    hint = f"did you mean {' or '.join(_BY_KEY[k].name for k in close)}? " if close else ""
    raise UnknownNameError(f"unknown model {name!r}: {hint}known sizes: {names}")


# --- tensors -----------------------------------------------------------------------------


def _attention_block(spec: ModelSpec, i: int, part: str) -> list[TensorSpec]:
    h, hd = spec.hidden, spec.head_dim
    return [
        TensorSpec(f"blk.{i}.attn_q.weight", (h, 2 * spec.n_head * hd), part, i),
        TensorSpec(f"blk.{i}.attn_k.weight", (h, spec.n_head_kv * hd), part, i),
        TensorSpec(f"blk.{i}.attn_v.weight", (h, spec.n_head_kv * hd), part, i),
        TensorSpec(f"blk.{i}.attn_q_norm.weight", (hd,), part, i),
        TensorSpec(f"blk.{i}.attn_k_norm.weight", (hd,), part, i),
        TensorSpec(f"blk.{i}.attn_output.weight", (spec.n_head * hd, h), part, i),
    ]


def _deltanet_block(spec: ModelSpec, i: int) -> list[TensorSpec]:
    h, nv = spec.hidden, spec.linear_v_heads
    value_width = nv * spec.linear_v_dim
    return [
        TensorSpec(f"blk.{i}.attn_qkv.weight", (h, spec.conv_dim), TEXT, i),
        TensorSpec(f"blk.{i}.attn_gate.weight", (h, value_width), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_beta.weight", (h, nv), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_alpha.weight", (h, nv), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_conv1d.weight", (spec.conv_kernel, spec.conv_dim), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_dt.bias", (nv,), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_a", (nv,), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_norm.weight", (spec.linear_v_dim,), TEXT, i),
        TensorSpec(f"blk.{i}.ssm_out.weight", (value_width, h), TEXT, i),
    ]


def _ffn_block(spec: ModelSpec, i: int, part: str) -> list[TensorSpec]:
    h = spec.hidden
    if not spec.is_moe:
        return [
            TensorSpec(f"blk.{i}.ffn_gate.weight", (h, spec.ffn), part, i),
            TensorSpec(f"blk.{i}.ffn_up.weight", (h, spec.ffn), part, i),
            TensorSpec(f"blk.{i}.ffn_down.weight", (spec.ffn, h), part, i),
        ]
    e, fe, fs = spec.n_experts, spec.expert_ffn, spec.shared_ffn
    return [
        TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (h, e), part, i),
        TensorSpec(f"blk.{i}.ffn_gate_exps.weight", (h, fe, e), part, i),
        TensorSpec(f"blk.{i}.ffn_up_exps.weight", (h, fe, e), part, i),
        TensorSpec(f"blk.{i}.ffn_down_exps.weight", (fe, h, e), part, i),
        TensorSpec(f"blk.{i}.ffn_gate_inp_shexp.weight", (h,), part, i),
        TensorSpec(f"blk.{i}.ffn_gate_shexp.weight", (h, fs), part, i),
        TensorSpec(f"blk.{i}.ffn_up_shexp.weight", (h, fs), part, i),
        TensorSpec(f"blk.{i}.ffn_down_shexp.weight", (fs, h), part, i),
    ]


def text_tensors(spec: ModelSpec) -> list[TensorSpec]:
    return list(_text_tensors(spec))


@functools.lru_cache(maxsize=64)
def _text_tensors(spec: ModelSpec) -> tuple[TensorSpec, ...]:
    h = spec.hidden
    tensors = [TensorSpec("token_embd.weight", (h, spec.vocab), TEXT), TensorSpec("output_norm.weight", (h,), TEXT)]
    if not spec.tied_embeddings:
        tensors.append(TensorSpec("output.weight", (h, spec.vocab), TEXT))
    for i in range(spec.n_layers):
        tensors.append(TensorSpec(f"blk.{i}.attn_norm.weight", (h,), TEXT, i))
        tensors.append(TensorSpec(f"blk.{i}.post_attention_norm.weight", (h,), TEXT, i))
        tensors += _attention_block(spec, i, TEXT) if spec.is_full_attention(i) else _deltanet_block(spec, i)
        tensors += _ffn_block(spec, i, TEXT)
    return tuple(tensors)


def mtp_tensors(spec: ModelSpec) -> list[TensorSpec]:
    return list(_mtp_tensors(spec))


@functools.lru_cache(maxsize=64)
def _mtp_tensors(spec: ModelSpec) -> tuple[TensorSpec, ...]:
    """The MTP layer(s) as llama.cpp writes them: blocks L.. with a full-attention block, FFN and nextn.*."""
    h = spec.hidden
    tensors = []
    for i in range(spec.n_layers, spec.n_layers + spec.mtp_layers):
        tensors.append(TensorSpec(f"blk.{i}.attn_norm.weight", (h,), MTP, i))
        tensors.append(TensorSpec(f"blk.{i}.post_attention_norm.weight", (h,), MTP, i))
        tensors += _attention_block(spec, i, MTP)
        tensors += _ffn_block(spec, i, MTP)
        tensors.append(TensorSpec(f"blk.{i}.nextn.eh_proj.weight", (2 * h, h), MTP, i))
        for norm in ("enorm", "hnorm", "shared_head_norm"):
            tensors.append(TensorSpec(f"blk.{i}.nextn.{norm}.weight", (h,), MTP, i))
    return tuple(tensors)


def vision_tensors(spec: ModelSpec) -> list[TensorSpec]:
    return list(_vision_tensors(spec))


@functools.lru_cache(maxsize=64)
def _vision_tensors(spec: ModelSpec) -> tuple[TensorSpec, ...]:
    """The vision tower and merger as an mmproj GGUF holds them."""
    v = spec.vision
    if v is None:
        return []
    vh, merged = v.hidden, v.hidden * v.spatial_merge_size**2
    tensors = [
        TensorSpec("v.patch_embd.weight", (v.patch_size, v.patch_size, v.in_channels, vh), VISION),
        TensorSpec("v.patch_embd.weight.1", (v.patch_size, v.patch_size, v.in_channels, vh), VISION),
        TensorSpec("v.patch_embd.bias", (vh,), VISION),
        TensorSpec("v.position_embd.weight", (vh, v.num_position_embeddings), VISION),
    ]
    for i in range(v.depth):
        p = f"v.blk.{i}."
        tensors += [
            TensorSpec(p + "ln1.weight", (vh,), VISION, i), TensorSpec(p + "ln1.bias", (vh,), VISION, i),
            TensorSpec(p + "attn_qkv.weight", (vh, 3 * vh), VISION, i), TensorSpec(p + "attn_qkv.bias", (3 * vh,), VISION, i),
            TensorSpec(p + "attn_out.weight", (vh, vh), VISION, i), TensorSpec(p + "attn_out.bias", (vh,), VISION, i),
            TensorSpec(p + "ln2.weight", (vh,), VISION, i), TensorSpec(p + "ln2.bias", (vh,), VISION, i),
            TensorSpec(p + "ffn_up.weight", (vh, v.ffn), VISION, i), TensorSpec(p + "ffn_up.bias", (v.ffn,), VISION, i),
            TensorSpec(p + "ffn_down.weight", (v.ffn, vh), VISION, i), TensorSpec(p + "ffn_down.bias", (vh,), VISION, i),
        ]
    tensors += [
        TensorSpec("v.post_ln.weight", (vh,), VISION), TensorSpec("v.post_ln.bias", (vh,), VISION),
        TensorSpec("mm.0.weight", (merged, merged), VISION), TensorSpec("mm.0.bias", (merged,), VISION),
        TensorSpec("mm.2.weight", (merged, spec.hidden), VISION), TensorSpec("mm.2.bias", (spec.hidden,), VISION),
    ]
    return tuple(tensors)


def all_tensors(spec: ModelSpec) -> list[TensorSpec]:
    return text_tensors(spec) + mtp_tensors(spec) + vision_tensors(spec)


@functools.lru_cache(maxsize=64)
def parameter_counts(spec: ModelSpec) -> dict[str, float]:
    """Parameters by part, and the active count per token (routed experts at top-k / E)."""
    counts = {TEXT: 0, MTP: 0, VISION: 0}
    active_text = 0.0
    for tensor in all_tensors(spec):
        counts[tensor.part] += tensor.n_elements
        if tensor.part == TEXT:
            share = spec.n_experts_used / spec.n_experts if tensor.is_expert else 1.0
            active_text += tensor.n_elements * share
    return {
        "text": counts[TEXT],
        "mtp": counts[MTP],
        "vision": counts[VISION],
        # The published totals count the text model and the vision tower, not the MTP layer.
        "total": counts[TEXT] + counts[VISION],
        "active": active_text,
    }
