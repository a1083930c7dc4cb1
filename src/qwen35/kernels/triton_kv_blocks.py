"""K/V kept as GGUF blocks (-ctk/-ctv q8_0, q4_0, q4_1, q5_0, q5_1) inside the Triton attention kernels.

A stored K or V vector of head_dim values is head_dim / 32 blocks of 32, llama.cpp's layout (a float16
scale, a float16 minimum for q4_1/q5_1, the fifth bits of q5_0/q5_1, then the quants). `load_tile`
reads a tile of slots as float32, `quantize_store` quantizes a new token's vector, stores its blocks and
returns the values as they will be read back. The plain references are engine/quantized_kv.py's
`quantize_rows` and `dequantize_rows` (gguf-py's quantizer and dequantizer, bit for bit); `quantize`
and `dequantize` below run these device functions on whole rows so that tests can compare them.

Quantizing is bit-equal to gguf-py only with the kernel compiled without fused multiply-adds
(`enable_fp_fusion=False`): gguf-py rounds `x * (1 / d)` before adding the offset. Reading needs no
such care: a quant times a float16 scale is exact in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.kernels.triton_checks import require

FLOAT = tl.constexpr(0)  # the pool holds a float dtype: loads and stores as that dtype
Q4_0 = tl.constexpr(int(GGMLQuantizationType.Q4_0))
Q4_1 = tl.constexpr(int(GGMLQuantizationType.Q4_1))
Q5_0 = tl.constexpr(int(GGMLQuantizationType.Q5_0))
Q5_1 = tl.constexpr(int(GGMLQuantizationType.Q5_1))
Q8_0 = tl.constexpr(int(GGMLQuantizationType.Q8_0))
TYPE_IDS = {"q8_0": Q8_0.value, "q4_0": Q4_0.value, "q4_1": Q4_1.value, "q5_0": Q5_0.value, "q5_1": Q5_1.value}
BLOCK = tl.constexpr(32)  # values a block


@triton.jit
def _layout(TYPE: tl.constexpr):
    # (bytes a block, offset of its minimum, of its fifth bits, of its quants); -1: none.
    if TYPE == Q8_0:
        return 34, -1, -1, 2
    elif TYPE == Q4_0:
        return 18, -1, -1, 2
    elif TYPE == Q4_1:
        return 20, 2, -1, 4
    elif TYPE == Q5_0:
        return 22, -1, 2, 6
    else:
        return 24, 2, 4, 8


@triton.jit
def _load_f16(at, mask):
    # Every block and every field in it starts at an even byte: one 16-bit load.
    return tl.load(at.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_f16(at, x, mask):
    bits = x.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(at, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(at + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def load_tile(at, slot_offsets, cols, mask, TYPE: tl.constexpr):
    """Values [slots, cols] as float32 of the vectors starting at byte `at + slot_offsets[i]` (masked: 0;
    offsets int32: a tile lies in one page). Each value loads its own bytes, its block's scale (repeated
    across the block's 32 columns) from L1: loading the scales once a block and broadcasting them took
    more registers."""
    size, minimum_at, high_bits_at, quants_at = _layout(TYPE)
    block, within = cols // BLOCK, cols % BLOCK
    block_offsets = slot_offsets[:, None] + (block * size)[None, :]
    scale = _load_f16(at + block_offsets, mask)
    if TYPE == Q8_0:
        quants = at.to(tl.pointer_type(tl.int8)) + (block_offsets + (quants_at + within)[None, :])
        return tl.load(quants, mask=mask, other=0).to(tl.float32) * scale
    packed = tl.load(at + (block_offsets + (quants_at + within % 16)[None, :]), mask=mask, other=0)
    q = ((packed >> (4 * (within // 16)).to(tl.uint8)[None, :]) & 0x0F).to(tl.int32)
    if high_bits_at >= 0:
        bits = tl.load(at + (block_offsets + (high_bits_at + within // 8)[None, :]), mask=mask, other=0)
        q = q | (((bits >> (within % 8).to(tl.uint8)[None, :]) & 1).to(tl.int32) << 4)
    if minimum_at >= 0:
        return scale * q.to(tl.float32) + _load_f16(at + (block_offsets + minimum_at), mask)
    offset: tl.constexpr = 8 if TYPE == Q4_0 else 16
    return scale * (q - offset).to(tl.float32)


@triton.jit
def _inverse(d):
    return tl.where(d == 0, 0.0, tl.math.div_rn(tl.full(d.shape, 1.0, tl.float32), tl.where(d == 0, 1.0, d)))


@triton.jit
def _round_half_away(x):
    # C's roundf as gguf-py's np_roundf computes it: floor(|x|) + floor(2 * frac(|x|)), signed.
    magnitude = tl.abs(x)
    floored = tl.floor(magnitude)
    rounded = floored + tl.floor(2 * (magnitude - floored))
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def quantize_store(x, at, writes, BLOCK_D: tl.constexpr, D: tl.constexpr, TYPE: tl.constexpr):
    """x [BLOCK_D] float32 (columns from D on: zeros) as head_dim / 32 blocks of TYPE, stored at `at`
    where `writes`; returns the values they hold, [BLOCK_D] float32, as `load_tile` reads them back."""
    BLOCKS: tl.constexpr = BLOCK_D // BLOCK
    size, minimum_at, high_bits_at, quants_at = _layout(TYPE)
    blocks = tl.reshape(x, (BLOCKS, BLOCK))
    index = tl.arange(0, BLOCK)
    block_ids = tl.arange(0, BLOCKS)
    block_at = at + block_ids * size
    stored = writes & (block_ids * BLOCK < D)
    if TYPE == Q8_0:
        d = tl.math.div_rn(tl.max(tl.abs(blocks), axis=1), tl.full([BLOCKS], 127.0, tl.float32))
        q = _round_half_away(blocks * _inverse(d)[:, None]).to(tl.int32)
        tl.store(block_at[:, None] + quants_at + index[None, :], q.to(tl.int8).to(tl.uint8, bitcast=True),
                 mask=stored[:, None])
        low = tl.zeros([BLOCKS], tl.float32)
        offset = 0
    else:
        if minimum_at >= 0:  # q4_1, q5_1: d = (max - min) / top, quants trunc((x - min) / d + 0.5)
            top: tl.constexpr = 15 if TYPE == Q4_1 else 31
            low = tl.min(blocks, axis=1)
            d = tl.math.div_rn(tl.max(blocks, axis=1) - low, tl.full([BLOCKS], top, tl.float32))
            q = tl.minimum(((blocks - low[:, None]) * _inverse(d)[:, None] + 0.5).to(tl.int32), top)
            _store_f16(block_at + minimum_at, low, stored)
            low = low.to(tl.float16).to(tl.float32)
            offset = 0
        else:  # q4_0, q5_0: d = the value of largest magnitude (the first) / -levels
            levels: tl.constexpr = 8 if TYPE == Q4_0 else 16
            magnitude = tl.abs(blocks)
            first = tl.min(tl.where(magnitude == tl.max(magnitude, axis=1)[:, None], index[None, :], BLOCK), axis=1)
            extreme = tl.sum(tl.where(index[None, :] == first[:, None], blocks, 0.0), axis=1)
            d = tl.math.div_rn(extreme, tl.full([BLOCKS], -levels, tl.float32))
            q = tl.minimum((blocks * _inverse(d)[:, None] + (levels + 0.5)).to(tl.int32), 2 * levels - 1)
            low = tl.zeros([BLOCKS], tl.float32)
            offset = levels
        q = tl.maximum(q, 0)
        halves = tl.reshape(q, (BLOCKS, 2, 16))  # value j in the low nibble of byte j, j + 16 in its high
        nibble_shift = (tl.arange(0, 2) * 4)[None, :, None]
        packed = tl.sum((halves & 0x0F) << nibble_shift, axis=1)
        tl.store(block_at[:, None] + quants_at + tl.arange(0, 16)[None, :], packed.to(tl.uint8), mask=stored[:, None])
        if high_bits_at >= 0:  # bit 4 of value j at bit j % 8 of byte j // 8
            bits = tl.reshape((q >> 4) & 1, (BLOCKS, 4, 8)) << tl.arange(0, 8)[None, None, :]
            tl.store(block_at[:, None] + high_bits_at + tl.arange(0, 4)[None, :], tl.sum(bits, axis=2).to(tl.uint8),
                     mask=stored[:, None])
    _store_f16(block_at, d, stored)
    scale = d.to(tl.float16).to(tl.float32)
    kept = scale[:, None] * (q - offset).to(tl.float32) + low[:, None]
    return tl.reshape(kept, (BLOCK_D,))


# ------------------------------------------------------------------ whole rows, for tests


def row_bytes(type_id: int, width: int) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return width // block_size * type_size


@triton.jit
def _quantize_kernel(x_ptr, blocks_ptr, kept_ptr, row_bytes, D: tl.constexpr, BLOCK_D: tl.constexpr,
                     TYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + row * D + cols, mask=cols < D, other=0.0)
    kept = quantize_store(x, blocks_ptr + row * row_bytes, True, BLOCK_D, D, TYPE)
    tl.store(kept_ptr + row * D + cols, kept, mask=cols < D)


@triton.jit
def _dequantize_kernel(blocks_ptr, out_ptr, rows, row_bytes, D: tl.constexpr, BLOCK_D: tl.constexpr,
                       ROWS: tl.constexpr, TYPE: tl.constexpr):
    first = tl.program_id(0) * ROWS
    slots = first + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (slots < rows)[:, None] & (cols < D)[None, :]
    values = load_tile(blocks_ptr + first.to(tl.int64) * row_bytes, tl.arange(0, ROWS) * row_bytes, cols, mask, TYPE)
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * D + cols[None, :], values, mask=mask)


def _checked_type(cache_type: str, width: int) -> int:
    require(cache_type in TYPE_IDS, f"no GGUF block K/V type {cache_type!r} (one of {', '.join(TYPE_IDS)})")
    require(width % BLOCK.value == 0,
            f"a {cache_type} K/V vector must hold a multiple of {BLOCK.value} values, not {width}")
    return TYPE_IDS[cache_type]


def quantize(x: torch.Tensor, cache_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, width] float32 -> (uint8 blocks [rows, row bytes], the values they hold [rows, width]),
    through `quantize_store`."""
    type_id = _checked_type(cache_type, x.shape[-1])
    x = x.float().contiguous()
    rows, width = x.shape
    blocks = torch.zeros(rows, row_bytes(type_id, width), dtype=torch.uint8, device=x.device)
    kept = torch.empty_like(x)
    if rows:
        _quantize_kernel[(rows,)](x, blocks, kept, blocks.shape[1], D=width, BLOCK_D=triton.next_power_of_2(width),
                                  TYPE=type_id, enable_fp_fusion=False)
    return blocks, kept


def dequantize(blocks: torch.Tensor, cache_type: str, width: int) -> torch.Tensor:
    """uint8 blocks [rows, row bytes] -> float32 [rows, width], through `load_tile`."""
    type_id = _checked_type(cache_type, width)
    require(blocks.dim() == 2 and blocks.dtype == torch.uint8 and blocks.shape[1] == row_bytes(type_id, width),
            f"{cache_type} blocks of {width} values must be uint8 [rows, {row_bytes(type_id, width)}]")
    blocks = blocks.contiguous()
    rows, rows_a_program = blocks.shape[0], 16
    out = torch.empty(rows, width, dtype=torch.float32, device=blocks.device)
    if rows:
        _dequantize_kernel[(triton.cdiv(rows, rows_a_program),)](
            blocks, out, rows, blocks.shape[1], D=width, BLOCK_D=triton.next_power_of_2(width), ROWS=rows_a_program,
            TYPE=type_id)
    return out
