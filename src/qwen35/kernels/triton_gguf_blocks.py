"""How the Triton kernels read GGUF blocks: device-side loaders and host-side checks.

Weights stay in the file's bytes: `blocks` is a uint8 tensor [rows, row_bytes] (or
[E, rows, row_bytes] for a stack of MoE experts) holding the ggml blocks of a weight
W [out_features, in_features], each row `in_features / block_size` consecutive blocks.
The block layouts are those of `qwen35.kernels.dequant` (the plain reference, bit-equal
to gguf-py).

Every block type is described to the kernels the same way: one step along a row covers
256 elements (Q6_K: four parts of 64), seen as a tile of G groups of L elements, and a
type's loader returns the codes as P byte planes [rows, G, L / P] (see the loaders' notes),
a per-group scale a and, for types with minimums, a per-group offset b [rows, G, 1], so
that W = a * q - b. Weights are read as whole 32-bit or 16-bit words, never byte by byte.
The kernels built on these sum products plane by plane (triton_gguf_gemv.py), or interleave
the planes back into element order where they store weights (triton_gguf.dequantize).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.errors import Qwen35Error
from qwen35.kernels.dequant import FP16_FIELD_OFFSETS, type_name

T = GGMLQuantizationType
STEP_ELEMENTS = 256  # elements of a row covered by one kernel step (one K super-block, eight 32-blocks)
STEP = tl.constexpr(STEP_ELEMENTS)

# type id -> (groups G, group length L, byte planes P) of one step's tile, and the alignment
# (bytes) its word loads need of the tensor's start.
TILES = {
    T.Q4_K: (8, 32, 4),
    T.Q5_K: (8, 32, 4),
    T.Q6_K: (4, 16, 2),  # one quarter of the step: its tile is loaded once for four quarters
    T.Q8_0: (8, 32, 2),
    T.Q4_0: (16, 16, 2),
}
ALIGNMENT = {T.Q4_K: 4, T.Q5_K: 4, T.Q6_K: 2, T.Q8_0: 2, T.Q4_0: 2}
HAS_MIN_TYPES = {T.Q4_K, T.Q5_K}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in TILES)


def supports(type_id: int) -> bool:
    return int(type_id) in SUPPORTED_TYPES


# ---------------------------------------------------------------- block loaders (device code)
#
# A loader reads one step (256 elements) of BLOCK_N rows as whole 32-bit words (Q4_K, Q5_K:
# 16-byte aligned blocks) or 16-bit words (the 2-byte aligned Q6_K, Q8_0, Q4_0), never single
# bytes, and splits each word into its P byte planes: plane b holds the codes of elements
# g * L + P * w + b (Q6_K: see fetch_q6_k), a [BLOCK_N, G, L / P] tile. It returns four
# planes (the unused ones of a P = 2 type are dead code) and the per-group scale and offset
# [BLOCK_N, G, 1] (W = scale * q - offset), with q already in float32.
#
# Codes become floats by the exponent trick: OR-ing a code c < 2^23 into the bits of 2^23 gives
# the float 2^23 + c, and subtracting 2^23 (plus any bias) is exact. That is two cheap integer
# and float operations instead of a slow integer-to-float conversion per element.

MAGIC = tl.constexpr(0x4B000000)  # the bits of the float 2^23
MAGIC_F = tl.constexpr(8388608.0)


@triton.jit
def _code_to_float(code, bias: tl.constexpr):
    """Integer codes 0 <= code < 2^23 -> float32 code - bias, exactly."""
    return (code | MAGIC).to(tl.float32, bitcast=True) - (MAGIC_F + bias)


@triton.jit
def _half_to_float(bits):
    """The low 16 bits of an integer tensor as an fp16 value, in float32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _words32(ptr):
    return ptr.to(tl.pointer_type(tl.int32))


@triton.jit
def _words16(ptr):
    return ptr.to(tl.pointer_type(tl.int16))


@triton.jit
def _k_scale_min(words, mask, s):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block `s` from the 12 bytes after d and dmin
    (ggml's get_scale_min_k4), read as three words."""
    shift = 8 * (s % 4)
    sd = (tl.load(words + 1, mask=mask, other=0) >> shift) & 0xFF
    sm = (tl.load(words + 2, mask=mask, other=0) >> shift) & 0xFF
    smd = (tl.load(words + 3, mask=mask, other=0) >> shift) & 0xFF
    scale = tl.where(s < 4, sd & 63, (smd & 15) | ((sd >> 2) & 0x30))
    minimum = tl.where(s < 4, sm & 63, (smd >> 4) | ((sm >> 2) & 0x30))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_q4_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    s = tl.arange(0, G)[None, :, None]
    w = tl.arange(0, L // 4)[None, None, :]
    mask = mask & (step < n_steps)
    words = _words32(rows + step * 144)
    d_dmin = tl.load(words, mask=mask, other=0)
    scale, minimum = _k_scale_min(words, mask, s)
    # Sub-blocks 2j and 2j+1 are the low and high nibbles of the same 32 bytes (8 words).
    packed = tl.load(words + 4 + 8 * (s // 2) + w, mask=mask, other=0)
    nibble = 4 * (s % 2)
    q0 = _code_to_float((packed >> nibble) & 15, 0.0)
    q1 = _code_to_float((packed >> (8 + nibble)) & 15, 0.0)
    q2 = _code_to_float((packed >> (16 + nibble)) & 15, 0.0)
    q3 = _code_to_float((packed >> (24 + nibble)) & 15, 0.0)
    return q0, q1, q2, q3, _half_to_float(d_dmin) * scale, _half_to_float(d_dmin >> 16) * minimum


@triton.jit
def _load_q5_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    s = tl.arange(0, G)[None, :, None]
    w = tl.arange(0, L // 4)[None, None, :]
    mask = mask & (step < n_steps)
    words = _words32(rows + step * 176)
    d_dmin = tl.load(words, mask=mask, other=0)
    scale, minimum = _k_scale_min(words, mask, s)
    packed = tl.load(words + 12 + 8 * (s // 2) + w, mask=mask, other=0)
    high = tl.load(words + 4 + w, mask=mask, other=0)  # bit s of byte l holds element l's fifth bit
    # All four bytes of a word at once: their 5-bit codes in the four bytes of `codes`.
    codes = ((packed >> (4 * (s % 2))) & 0x0F0F0F0F) | (((high >> s) & 0x01010101) << 4)
    q0 = _code_to_float(codes & 0xFF, 0.0)
    q1 = _code_to_float((codes >> 8) & 0xFF, 0.0)
    q2 = _code_to_float((codes >> 16) & 0xFF, 0.0)
    q3 = _code_to_float((codes >> 24) & 0xFF, 0.0)
    return q0, q1, q2, q3, _half_to_float(d_dmin) * scale, _half_to_float(d_dmin >> 16) * minimum


@triton.jit
def fetch_q6_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    """Q6_K words of one block: each 128-element half has 64 bytes of low nibbles (quarters 0
    and 2 in the low and high nibbles of bytes 0-31, quarters 1 and 3 of bytes 32-63) and 32
    bytes of 2-bit highs (quarter q in bits 2q, 2q+1). Tile group g is half g // 2, lanes
    16 * (g % 2) to + 15; each word is loaded once and decoded for all four quarters."""
    g = tl.arange(0, G)[None, :, None]
    w = tl.arange(0, L // 2)[None, None, :]
    mask = mask & (step < n_steps)
    block = rows + step * 210
    half = g // 2
    lane = 16 * (g % 2)
    low_a = tl.load(_words16(block + 64 * half + lane) + w, mask=mask, other=0).to(tl.int32)
    low_b = tl.load(_words16(block + 64 * half + 32 + lane) + w, mask=mask, other=0).to(tl.int32)
    high = tl.load(_words16(block + 128 + 32 * half + lane) + w, mask=mask, other=0).to(tl.int32)
    d = _half_to_float(tl.load(_words16(block + 208), mask=mask, other=0).to(tl.int32))
    return low_a, low_b, high, d, block, mask


@triton.jit
def q6_k_quarter(low_a, low_b, high, d, block, mask, QUARTER: tl.constexpr, G: tl.constexpr):
    """Planes, scale and offset of one Q6_K quarter (elements 128 * half + 32 * QUARTER + lane)."""
    g = tl.arange(0, G)[None, :, None]
    if QUARTER % 2 == 0:
        low = low_a
    else:
        low = low_b
    low_shift: tl.constexpr = 4 * (QUARTER // 2)
    high_shift: tl.constexpr = 2 * QUARTER
    # Both bytes of a word at once: their 6-bit codes in the two bytes of `codes`.
    codes = ((low >> low_shift) & 0x0F0F) | (((high >> high_shift) & 0x0303) << 4)
    q0 = _code_to_float(codes & 0xFF, 32.0)
    q1 = _code_to_float((codes >> 8) & 0xFF, 32.0)
    # The int8 scale of 16 elements: byte 8 * half + 2 * QUARTER + g % 2 of the 16 at byte 192.
    scale_word = tl.load(_words16(block + 192) + 4 * (g // 2) + QUARTER, mask=mask, other=0).to(tl.int32)
    scale = ((scale_word >> (8 * (g % 2))) & 0xFF).to(tl.int8).to(tl.float32)
    return q0, q1, q0, q1, d * scale, tl.zeros_like(scale)


@triton.jit
def _load_q8_0(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    b = step * G + tl.arange(0, G)[None, :, None]  # G consecutive 32-element blocks
    w = tl.arange(0, L // 2)[None, None, :]
    mask = mask & (b < n_steps)
    words = _words16(rows + b * 34)
    d = _half_to_float(tl.load(words, mask=mask, other=0).to(tl.int32))
    packed = tl.load(words + 1 + w, mask=mask, other=0).to(tl.int32)
    # Flipping the sign bit of an int8 gives its value + 128 as an unsigned byte.
    q0 = _code_to_float((packed & 0xFF) ^ 0x80, 128.0)
    q1 = _code_to_float(((packed >> 8) & 0xFF) ^ 0x80, 128.0)
    return q0, q1, q0, q1, d, tl.zeros_like(d)


@triton.jit
def _load_q4_0(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    g = tl.arange(0, G)[None, :, None]  # two groups per block: low nibbles (0-15), high (16-31)
    b = step * (G // 2) + g // 2
    w = tl.arange(0, L // 2)[None, None, :]
    mask = mask & (b < n_steps)
    words = _words16(rows + b * 18)
    d = _half_to_float(tl.load(words, mask=mask, other=0).to(tl.int32))
    packed = tl.load(words + 1 + w, mask=mask, other=0).to(tl.int32)
    nibble = 4 * (g % 2)
    q0 = _code_to_float((packed >> nibble) & 15, 8.0)
    q1 = _code_to_float((packed >> (8 + nibble)) & 15, 8.0)
    return q0, q1, q0, q1, d, tl.zeros_like(d)


@triton.jit
def load_step(rows, step, n_blocks, mask, QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """One step (256 elements) of BLOCK_N rows: planes q0..q3 [N, G, L / P] and scale, offset
    [N, G, 1] (see above). `rows` [N, 1, 1] points at each row's first byte; `n_blocks` is the
    row's ggml block count (steps for 256-element types, 32-blocks for Q8_0/Q4_0). Q6_K, whose
    step is four parts, goes through fetch_q6_k and q6_k_quarter instead."""
    if QTYPE == 12:
        return _load_q4_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 13:
        return _load_q5_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 8:
        return _load_q8_0(rows, step, n_blocks, mask, G, L)
    else:
        tl.static_assert(QTYPE == 2, "unsupported block type")
        return _load_q4_0(rows, step, n_blocks, mask, G, L)


@triton.jit
def part_elements(QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """[G, L]: the step-relative element of each position of a part's tile (Q6_K's quarter 0:
    halves of 128 apart, lanes 16 apart; other types: groups of L in order)."""
    g = tl.arange(0, G)[:, None]
    t = tl.arange(0, L)[None, :]
    if QTYPE == 14:
        return 128 * (g // 2) + 16 * (g % 2) + t
    else:
        return g * L + t


@triton.jit
def weights_of(q, scale, offset, HAS_MIN: tl.constexpr):
    if HAS_MIN:
        return scale * q - offset  # the reference's order; a negated offset added would flip signed zeros
    else:
        return scale * q



# ---------------------------------------------------------------- host side

def check_type(type_id: int) -> tuple[int, int, tuple[int, int, int]]:
    """(block size, block bytes, (G, L, P)) of a supported type, or a Qwen35Error."""
    if not supports(type_id):
        names = ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))
        raise Qwen35Error(f"the Triton GGUF kernels do not support {type_name(type_id)} (supported: {names})")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return block_size, type_size, TILES[GGMLQuantizationType(type_id)]


def check_blocks(blocks: torch.Tensor, type_id: int, in_features: int, min_dims: int, max_dims: int) -> tuple:
    """(blocks per row, bytes per row, (G, L, P)) after checking the blocks' shape."""
    block_size, type_size, tile = check_type(type_id)
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise Qwen35Error("GGUF blocks must be a uint8 tensor of raw block bytes")
    if not min_dims <= blocks.dim() <= max_dims:
        raise Qwen35Error(f"GGUF blocks must have {min_dims} to {max_dims} dimensions, got shape {list(blocks.shape)}")
    if in_features <= 0 or in_features % block_size:
        raise Qwen35Error(
            f"in_features {in_features} is not a positive multiple of the {type_name(type_id)} block size {block_size}"
        )
    row_bytes = in_features // block_size * type_size
    if blocks.shape[-1] != row_bytes:
        raise Qwen35Error(
            f"{type_name(type_id)} rows of {in_features} elements take {row_bytes} bytes, "
            f"but the blocks' last dimension is {blocks.shape[-1]}"
        )
    if not blocks.is_contiguous():
        raise Qwen35Error("GGUF blocks must be contiguous")
    n_blocks = in_features // block_size
    return n_blocks, row_bytes, tile


def check_expert_ids(expert_ids: torch.Tensor, blocks: torch.Tensor, x_rows: int) -> int:
    """The slot count S of expert_ids [S] (int32/int64, on the blocks' device), a positive multiple of x_rows."""
    if (not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 1
            or expert_ids.dtype not in (torch.int32, torch.int64)):
        raise Qwen35Error("expert_ids must be a 1-D int32 or int64 tensor")
    if expert_ids.device != blocks.device:
        raise Qwen35Error(f"expert_ids are on {expert_ids.device} but the weight blocks are on {blocks.device}")
    slots = expert_ids.shape[0]
    if slots == 0 or x_rows == 0 or slots % x_rows:
        raise Qwen35Error(f"the {slots} expert slots must be a positive multiple of the {x_rows} rows of x")
    return slots


def aligned(blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    """The blocks, copied (on the device, no sync) if their start is too unaligned for word loads."""
    if blocks.data_ptr() % ALIGNMENT[GGMLQuantizationType(type_id)]:
        return blocks.clone()
    return blocks


def random_blocks(type_id: int, shape: tuple[int, ...], in_features: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """Random valid blocks [*shape, row_bytes]: random bytes with finite fp16 scales in [2^-10, 2^-6)."""
    block_size, type_size, _ = check_type(type_id)
    n_blocks = in_features // block_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, n_blocks, type_size), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELD_OFFSETS[GGMLQuantizationType(type_id)]:
        scales = torch.empty((*shape, n_blocks), dtype=torch.float16).uniform_(2**-10, 2**-6, generator=generator)
        raw[..., offset : offset + 2] = scales.view(torch.uint8).reshape(*shape, n_blocks, 2)
    return raw.reshape(*shape, n_blocks * type_size).to(device)
