"""K/V of a full-attention layer kept in llama.cpp's cache types (-ctk/--cache-type-k, -ctv/--cache-type-v).

f32, f16 and bf16 keep each value as that torch dtype. The GGUF block types (q8_0, q4_0,
q4_1, q5_0, q5_1) keep, as llama.cpp does, each (row, slot, kv head) vector of head_dim
values as head_dim / 32 blocks of 32: a float16 scale (and minimum), then the packed
quants. Writing quantizes the way gguf-py's reference quantizer does, bit for bit
(`quantize_rows`); reading dequantizes with kernels/dequant.py. K and V may differ in type.

`TypedAttentionKV` keeps AttentionKV's interface (engine/cache.py): the row operations
(select, merge, append, remove, install_row, shared, reserve) copy the stored bytes
untouched, so a row's K/V are quantized once, when written. `view` gives float32.
On the CPU a decode step takes one fused C++ call for every pair of types, K and V each any of
the eight (csrc/attention_decode.cpp, `attention_decode_blocks`): it rounds or quantizes the new
token into its slot as `write` does (blocks bit for bit as `quantize_rows`) and reads floats and
blocks inside its dot products, never the whole cache dequantized. A prompt's tokens take the
model's plain path, which writes through `write` and reads through `view`.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.cache_options import check_cache_type
from qwen35.engine.cache import AttentionKV, DeltaNetState, HybridCache
from qwen35.errors import Qwen35Error
from qwen35.kernels.dequant import dequantize

FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
BLOCK_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
               "q4_1": GGMLQuantizationType.Q4_1, "q5_0": GGMLQuantizationType.Q5_0,
               "q5_1": GGMLQuantizationType.Q5_1}
BLOCK = 32  # values per block, for every block type here


def block_type(cache_type: str | None) -> str | None:
    """`cache_type` where it is a GGUF block type, else None."""
    return cache_type if cache_type in BLOCK_TYPES else None


def row_nbytes(cache_type: str, width: int) -> int:
    """Bytes of one stored vector of `width` values."""
    if cache_type in FLOAT_TYPES:
        return width * FLOAT_TYPES[cache_type].itemsize
    block_size, type_size = GGML_QUANT_SIZES[BLOCK_TYPES[cache_type]]
    return width // block_size * type_size


# ------------------------------------------------------------------ gguf-py's quantizers, in torch


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, halves away from zero (C's roundf, as gguf-py's np_roundf computes it)."""
    magnitude = x.abs()
    floored = magnitude.floor()
    return x.sign() * (floored + (2 * (magnitude - floored)).floor())


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[n, 1] float32 -> [n, 2] the little-endian bytes of its float16 rounding."""
    return x.to(torch.float16).view(torch.uint8)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] quants -> [n, 16] bytes: value j in the low nibble of byte j, value j + 16 in its high nibble."""
    return (q[:, :16] & 0x0F) | (q[:, 16:] << 4)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] five-bit quants -> [n, 4] bytes: bit 4 of value j at bit j % 8 of byte j // 8."""
    weights = (1 << torch.arange(8, device=q.device)).to(torch.int32)
    return ((q >> 4).to(torch.int32).reshape(-1, 4, 8) * weights).sum(dim=-1).to(torch.uint8)


def _symmetric(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale (the value of largest magnitude over -levels) and quants 0..2*levels-1."""
    extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = extreme / -levels
    q = torch.trunc(blocks * _inverse(d) + (levels + 0.5)).to(torch.uint8).clamp(0, 2 * levels - 1)
    return d, q


def _with_minimum(blocks: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scale (range over top), the minimum and quants 0..top."""
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (high - low) / top
    q = torch.trunc((blocks - low) * _inverse(d) + 0.5).to(torch.uint8).clamp(0, top)
    return d, low, q


def _q8_0(blocks):
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_half_away(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _q4_0(blocks):
    d, q = _symmetric(blocks, 8)
    return torch.cat([_f16_bytes(d), _nibbles(q)], dim=1)


def _q4_1(blocks):
    d, low, q = _with_minimum(blocks, 15)
    return torch.cat([_f16_bytes(d), _f16_bytes(low), _nibbles(q)], dim=1)


def _q5_0(blocks):
    d, q = _symmetric(blocks, 16)
    return torch.cat([_f16_bytes(d), _high_bits(q), _nibbles(q)], dim=1)


def _q5_1(blocks):
    d, low, q = _with_minimum(blocks, 31)
    return torch.cat([_f16_bytes(d), _f16_bytes(low), _high_bits(q), _nibbles(q)], dim=1)


_QUANTIZERS = {"q8_0": _q8_0, "q4_0": _q4_0, "q4_1": _q4_1, "q5_0": _q5_0, "q5_1": _q5_1}


def quantize_rows(x: torch.Tensor, cache_type: str) -> torch.Tensor:
    """x [..., width] (width a multiple of 32) -> uint8 [..., row_nbytes] GGUF blocks, bit-equal to
    gguf-py's `gguf.quants.quantize` of the same float32 values."""
    width = x.shape[-1]
    if width % BLOCK:
        raise Qwen35Error(f"a {cache_type} K/V cache needs head_dim a multiple of {BLOCK}, not {width}")
    blocks = x.detach().to(torch.float32).reshape(-1, BLOCK)
    return _QUANTIZERS[cache_type](blocks).reshape(*x.shape[:-1], row_nbytes(cache_type, width))


def dequantize_rows(data: torch.Tensor, cache_type: str, width: int) -> torch.Tensor:
    """uint8 [..., row_nbytes] GGUF blocks -> float32 [..., width] (kernels/dequant.py's decoders)."""
    shape = (*data.shape[:-1], width)
    return dequantize(data.contiguous().reshape(-1), BLOCK_TYPES[cache_type].value, shape)


# ------------------------------------------------------------------ the cache


class TypedAttentionKV(AttentionKV):
    """AttentionKV whose K and V are stored as `type_k` and `type_v` (class attributes: make one class per
    pair with `attention_kv_class`, so that the row operations, which make new objects of the same class,
    keep the types). Storage is [reserved rows, capacity, n_kv, head_dim] of a float dtype, or
    [..., n_kv, row bytes] uint8 blocks."""

    type_k = "f32"
    type_v = "f32"

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, device, capacity: int = 0):
        for cache_type in (self.type_k, self.type_v):
            if cache_type in BLOCK_TYPES and head_dim % BLOCK:
                raise Qwen35Error(f"a {cache_type} K/V cache needs head_dim a multiple of {BLOCK}, not {head_dim}")
        self._keys = self._zeros(self.type_k, (batch_size, capacity, num_kv_heads), head_dim, device)
        self._values = self._zeros(self.type_v, (batch_size, capacity, num_kv_heads), head_dim, device)
        self.rows = batch_size

    @staticmethod
    def _zeros(cache_type: str, leading: tuple, head_dim: int, device) -> torch.Tensor:
        if cache_type in FLOAT_TYPES:
            return torch.zeros((*leading, head_dim), dtype=FLOAT_TYPES[cache_type], device=device)
        # All-zero blocks are scale 0: padding slots read as zeros.
        return torch.zeros((*leading, row_nbytes(cache_type, head_dim)), dtype=torch.uint8, device=device)

    @classmethod
    def fused_decode(cls) -> bool:
        """Whether a fused step for one float storage (kernels/triton_attention.py's) can write this store: one
        float dtype for K and V. The CPU's fused step reads every type (model/fused.py's CPU_BLOCK_KV_TYPES)."""
        return cls.type_k == cls.type_v and cls.type_k in FLOAT_TYPES

    def _encode(self, cache_type: str, x: torch.Tensor) -> torch.Tensor:
        if cache_type in FLOAT_TYPES:
            return x.to(FLOAT_TYPES[cache_type])
        return quantize_rows(x, cache_type)

    def _decode(self, cache_type: str, stored: torch.Tensor) -> torch.Tensor:
        if cache_type in FLOAT_TYPES:
            return stored.float()
        block_size, type_size = GGML_QUANT_SIZES[BLOCK_TYPES[cache_type]]
        return dequantize_rows(stored, cache_type, stored.shape[-1] // type_size * block_size)

    def write(self, starts: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        batch, length = keys.shape[:2]
        self.make_room(starts, length)
        rows = torch.arange(batch, device=keys.device)[:, None]
        slots = starts[:, None] + torch.arange(length, device=keys.device)
        self._keys[rows, slots] = self._encode(self.type_k, keys)
        self._values[rows, slots] = self._encode(self.type_v, values)

    def view(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` slots of every row as float32 (rows past their own length hold zeros or
        earlier values)."""
        keys, values = super().view(length)
        return self._decode(self.type_k, keys), self._decode(self.type_v, values)

    def _check_alike(self, other) -> None:
        if type(other) is not type(self):
            raise Qwen35Error(f"cannot copy K/V of a {_describe(other)} cache into a {_describe(self)} one")

    @staticmethod
    def merge(parts: list[TypedAttentionKV], length: int) -> TypedAttentionKV:
        for part in parts[1:]:
            parts[0]._check_alike(part)
        return AttentionKV.merge(parts, length)

    def append(self, other: TypedAttentionKV, row: int, length: int) -> None:
        self._check_alike(other)
        super().append(other, row, length)

    def install_row(self, row: int, other: TypedAttentionKV, other_row: int, length: int) -> bool:
        self._check_alike(other)
        return super().install_row(row, other, other_row, length)


def _describe(kv) -> str:
    if isinstance(kv, TypedAttentionKV):
        return f"-ctk {kv.type_k} -ctv {kv.type_v}"
    return type(kv).__name__


@lru_cache(maxsize=None)
def attention_kv_class(type_k: str, type_v: str) -> type[TypedAttentionKV]:
    """The TypedAttentionKV class storing K as `type_k` and V as `type_v` (one class per pair)."""
    type_k, type_v = check_cache_type(type_k, "-ctk"), check_cache_type(type_v, "-ctv")
    name = f"AttentionKV_{type_k}_{type_v}"
    return type(name, (TypedAttentionKV,), {"type_k": type_k, "type_v": type_v})


def make_attention_kv(batch_size: int, num_kv_heads: int, head_dim: int, device, type_k: str = "f32",
                      type_v: str = "f32") -> AttentionKV:
    """A CPU layer's K/V store: the plain float32 AttentionKV for f32/f32 (what the fused decode and every
    earlier caller know), else a TypedAttentionKV."""
    if type_k == type_v == "f32":
        return AttentionKV(batch_size, num_kv_heads, head_dim, torch.float32, device)
    return attention_kv_class(type_k, type_v)(batch_size, num_kv_heads, head_dim, device)


# ------------------------------------------------------------------ what a cache holds


def stored_cache_types(kv) -> tuple[str, str]:
    """The types one full-attention layer's store keeps K and V in (a GPU's pages: their block type or
    float dtype)."""
    if isinstance(kv, TypedAttentionKV):
        return kv.type_k, kv.type_v
    paged = hasattr(kv, "page_pool")  # engine/paged_kv.py, which imports this module
    keys, values = kv.page_pool if paged else kv.storage
    names = {dtype: name for name, dtype in FLOAT_TYPES.items()}
    return (getattr(kv, "type_k", None) or names.get(keys.dtype, str(keys.dtype)),
            getattr(kv, "type_v", None) or names.get(values.dtype, str(values.dtype)))


@torch.inference_mode()
def allocated_kv_bytes_per_token(cache: HybridCache, tokens: int = 256) -> int:
    """Bytes a one-row `cache`'s full-attention layers allocate per token of context, measured: what
    growing every layer's store by `tokens` slots adds (a GPU's page tables and spare page aside)."""
    stores = [layer for layer in cache.layers if not isinstance(layer, DeltaNetState)]
    cache.reserve(tokens=tokens)
    before = sum(store.nbytes() for store in stores)
    cache.reserve(tokens=2 * tokens)
    return (sum(store.nbytes() for store in stores) - before) // tokens
