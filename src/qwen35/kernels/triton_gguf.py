"""Triton kernels that compute straight from GGUF quantized blocks (no re-packing).

Weights stay in the file's bytes: `blocks` is a uint8 tensor [rows, row_bytes] (or
[E, rows, row_bytes] for a stack of MoE experts) holding the ggml blocks of a weight
W [out_features, in_features], each row `in_features / block_size` consecutive blocks.
The block layouts are those of `qwen35.kernels.dequant` (the plain reference, bit-equal
to gguf-py); `dequantize` here is bit-equal to it in float32.

Every block type is described to the kernels the same way: one step along a row covers
256 elements (Q6_K: four parts of 64), seen as a tile of G groups of L elements, and a
type's loader returns the codes as P byte planes [rows, G, L / P] (see the loaders' notes),
a per-group scale a and, for types with minimums, a per-group offset b [rows, G, 1], so
that W = a * q - b. Weights are read as whole 32-bit or 16-bit words, never byte by byte.

The GEMV kernels are written for memory-bound decode on the GPU, where the instructions
spent per weight, not the bytes, are what limit a kernel like this: codes become floats
by an exponent trick instead of integer conversions, with one row of x the products
accumulate element-wise and are reduced once at the end (offsets contribute -b * sum(x)
per group), and a program covers 32 or 64 rows so that each thread reuses its x values.
Many programs run over output rows, with split-K when the matrix is too skinny to fill the
machine (partial sums go to a [splits, M, out] buffer summed afterwards, so results are
deterministic); accumulation is fp32; nothing syncs with the host (expert ids are read
inside the kernel), so the calls can be captured in CUDA graphs. Without a GPU, Triton's interpreter runs them on
CPU tensors (set TRITON_INTERPRET=1 before importing this module).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.errors import Qwen35Error
from qwen35.kernels.dequant import FP16_FIELD_OFFSETS, type_name

T = GGMLQuantizationType
STEP_ELEMENTS = 256  # elements of a row covered by one kernel step (one K super-block, eight 32-blocks)
_STEP = tl.constexpr(STEP_ELEMENTS)

# type id -> (groups G, group length L, byte planes P) of one step's tile, and the alignment
# (bytes) its word loads need of the tensor's start.
_TILES = {
    T.Q4_K: (8, 32, 4),
    T.Q5_K: (8, 32, 4),
    T.Q6_K: (4, 16, 2),  # one quarter of the step: its tile is loaded once for four quarters
    T.Q8_0: (8, 32, 2),
    T.Q4_0: (16, 16, 2),
}
_ALIGNMENT = {T.Q4_K: 4, T.Q5_K: 4, T.Q6_K: 2, T.Q8_0: 2, T.Q4_0: 2}
_HAS_MIN = {T.Q4_K, T.Q5_K}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in _TILES)

MAX_GEMV_ROWS = 16  # the most rows of x one gemv call takes (decode-sized batches)


def supports(type_id: int) -> bool:
    return int(type_id) in SUPPORTED_TYPES


# ---------------------------------------------------------------- block loaders (device code)
#
# A loader reads one step (256 elements) of BLOCK_N rows as whole 32-bit words (Q4_K, Q5_K:
# 16-byte aligned blocks) or 16-bit words (the 2-byte aligned Q6_K, Q8_0, Q4_0), never single
# bytes, and splits each word into its P byte planes: plane b holds the codes of elements
# g * L + P * w + b (Q6_K: see _fetch_q6_k), a [BLOCK_N, G, L / P] tile. It returns four
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
def _fetch_q6_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
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
def _q6_k_quarter(low_a, low_b, high, d, block, mask, QUARTER: tl.constexpr, G: tl.constexpr):
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
def _load_step(rows, step, n_blocks, mask, QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """One step (256 elements) of BLOCK_N rows: planes q0..q3 [N, G, L / P] and scale, offset
    [N, G, 1] (see above). `rows` [N, 1, 1] points at each row's first byte; `n_blocks` is the
    row's ggml block count (steps for 256-element types, 32-blocks for Q8_0/Q4_0). Q6_K, whose
    step is four parts, goes through _fetch_q6_k and _q6_k_quarter instead."""
    if QTYPE == 12:
        return _load_q4_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 13:
        return _load_q5_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 8:
        return _load_q8_0(rows, step, n_blocks, mask, G, L)
    else:
        tl.static_assert(QTYPE == 2, "unsupported block type")
        return _load_q4_0(rows, step, n_blocks, mask, G, L)


# ---------------------------------------------------------------- kernels


@triton.jit
def _part_elements(QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """[G, L]: the step-relative element of each position of a part's tile (Q6_K's quarter 0:
    halves of 128 apart, lanes 16 apart; other types: groups of L in order)."""
    g = tl.arange(0, G)[:, None]
    t = tl.arange(0, L)[None, :]
    if QTYPE == 14:
        return 128 * (g // 2) + 16 * (g % 2) + t
    else:
        return g * L + t


@triton.jit
def _weights(q, scale, offset, HAS_MIN: tl.constexpr):
    if HAS_MIN:
        return scale * q - offset  # the reference's order; a negated offset added would flip signed zeros
    else:
        return scale * q


@triton.jit
def _store_weights(out_ptr, row, row_ok, col, in_features, w):
    """Stores float32 weights [N, G, L] at columns col [1, G, L] as the output's dtype."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates.
        # (Weights from blocks with finite fp16 scales are finite, so no NaN payload to keep.)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + row * in_features + col, w.to(out_ptr.dtype.element_ty), mask=row_ok & (col < in_features))


@triton.jit
def _dequantize_kernel(
    w_ptr, out_ptr, n_rows, row_bytes, in_features, n_blocks,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    step = tl.program_id(1)
    row = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    row_ok = row < n_rows
    rows = w_ptr + row * row_bytes
    # The planes are interleaved back into element order (join, then reshape) so that the
    # stores are contiguous.
    col = step * _STEP + _part_elements(QTYPE, G, L)[None, :, :]
    if QTYPE == 14:
        low_a, low_b, high, d, block, mask = _fetch_q6_k(rows, step, n_blocks, row_ok, G, L)
        for quarter in tl.static_range(4):
            q0, q1, q2, q3, scale, offset = _q6_k_quarter(low_a, low_b, high, d, block, mask, quarter, G)
            w = tl.join(_weights(q0, scale, offset, HAS_MIN), _weights(q1, scale, offset, HAS_MIN))
            _store_weights(out_ptr, row, row_ok, col + 32 * quarter, in_features, tl.reshape(w, (BLOCK_N, G, L)))
    else:
        q0, q1, q2, q3, scale, offset = _load_step(rows, step, n_blocks, row_ok, QTYPE, G, L)
        if P == 4:  # element 4w + 2a + b
            even = tl.join(_weights(q0, scale, offset, HAS_MIN), _weights(q2, scale, offset, HAS_MIN))
            odd = tl.join(_weights(q1, scale, offset, HAS_MIN), _weights(q3, scale, offset, HAS_MIN))
            w = tl.join(even, odd)
        else:
            w = tl.join(_weights(q0, scale, offset, HAS_MIN), _weights(q1, scale, offset, HAS_MIN))
        _store_weights(out_ptr, row, row_ok, col, in_features, tl.reshape(w, (BLOCK_N, G, L)))


@triton.jit
def _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col, n_x_rows, in_features, which_m,
                G: tl.constexpr, L: tl.constexpr, P: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Adds one part's products with every row of x (weights stay in registers for all rows)."""
    for mi in tl.static_range(BLOCK_M):
        # x is loaded as a contiguous [G, L] tile, split into its P planes [G, L / P] and broadcast
        # over the rows: of lower rank, the planes take the weight tile's layout (a small
        # conversion), never the reverse.
        x = tl.load(x_rows + mi * in_features + col, mask=(mi < n_x_rows) & (col < in_features), other=0.0)
        if P == 4:
            even, odd = tl.split(tl.reshape(x, (G, L // 4, 2, 2)))  # element 4w + 2a + b: by b, then a
            x0, x2 = tl.split(even)
            x1, x3 = tl.split(odd)
            x0, x1, x2, x3 = x0[None, :, :], x1[None, :, :], x2[None, :, :], x3[None, :, :]
            qx = q0 * x0 + q1 * x1 + q2 * x2 + q3 * x3
            xs = x0 + x1 + x2 + x3
        else:
            x0, x1 = tl.split(tl.reshape(x, (G, L // 2, 2)))
            x0, x1 = x0[None, :, :], x1[None, :, :]
            qx = q0 * x0 + q1 * x1
            xs = x0 + x1
        if BLOCK_M == 1:
            acc += scale * qx
            if HAS_MIN:
                acc_min += offset * tl.sum(xs, axis=2, keep_dims=True)
        else:
            part = scale * tl.sum(qx, axis=2, keep_dims=True)  # [N, G, 1]: one sum per group
            if HAS_MIN:
                part -= offset * tl.sum(xs, axis=2, keep_dims=True)
            acc = tl.where(which_m == mi, acc + tl.sum(part, axis=2)[None, :, :], acc)
    return acc, acc_min


@triton.jit
def _gemv_kernel(
    w_ptr, x_ptr, out_ptr, ids_ptr,
    n_out, in_features, n_blocks, row_bytes, expert_bytes, n_experts, n_x_rows, slots_per_x,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDS: tl.constexpr, STEPS: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out[split, m, n] = sum over this split's steps of x[m] . W[n] (or, with ids, one slot per program)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.program_id(2)
    row = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    row_ok = row < n_out
    rows = w_ptr + row * row_bytes
    if HAS_IDS:
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        expert_ok = (expert >= 0) & (expert < n_experts)
        rows += tl.where(expert_ok, expert, 0) * expert_bytes
        row_ok = row_ok & expert_ok
        x_first = slot // slots_per_x
    else:
        x_first = 0
    x_rows = x_ptr + x_first.to(tl.int64) * in_features
    element = _part_elements(QTYPE, G, L)
    which_m = tl.arange(0, BLOCK_M)[:, None, None]
    # One x row: products accumulate element-wise in the weight tile's shape and are summed
    # once at the end, because a sum per group and step reduces across the threads that share
    # a row (shuffles per element where the words are only 2-byte aligned: one per thread).
    # Several rows: one sum per group, row and step, kept apart until the end (summing the
    # groups each step would reduce across warps, through shared memory).
    acc_min = tl.zeros((BLOCK_N, G, 1), dtype=tl.float32)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, G, L // P), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, G), dtype=tl.float32)
    # STEPS (steps per split) is a compile-time constant: Triton's interpreter cannot loop to a
    # runtime bound. With NUM_STAGES > 1 the compiler prefetches the aligned word loads.
    first = split * STEPS
    for i in tl.range(0, STEPS, num_stages=NUM_STAGES):
        step = first + i  # steps past the row's end load as zeros (the last split may be short)
        col = step * _STEP + element
        if QTYPE == 14:
            low_a, low_b, high, d, block, mask = _fetch_q6_k(rows, step, n_blocks, row_ok, G, L)
            for quarter in tl.static_range(4):
                q0, q1, q2, q3, scale, offset = _q6_k_quarter(low_a, low_b, high, d, block, mask, quarter, G)
                acc, acc_min = _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col + 32 * quarter,
                                           n_x_rows, in_features, which_m, G, L, P, HAS_MIN, BLOCK_M)
        else:
            q0, q1, q2, q3, scale, offset = _load_step(rows, step, n_blocks, row_ok, QTYPE, G, L)
            acc, acc_min = _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col,
                                       n_x_rows, in_features, which_m, G, L, P, HAS_MIN, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(acc, axis=2) - tl.sum(acc_min, axis=2), axis=1)[None, :]
    else:
        acc = tl.sum(acc, axis=2)
    if HAS_IDS:
        acc = tl.where(expert_ok, acc, float("nan"))  # an out-of-range expert id poisons its slot
    out_m = tl.arange(0, BLOCK_M)[:, None]
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    if HAS_IDS:
        out_rows = tl.num_programs(2)
        out_m += slot
    else:
        out_rows = n_x_rows
    out_ptrs = out_ptr + (split.to(tl.int64) * out_rows + out_m) * n_out + out_n
    tl.store(out_ptrs, acc, mask=(tl.arange(0, BLOCK_M)[:, None] < n_x_rows) & (out_n < n_out))


# ---------------------------------------------------------------- host side


def _check_type(type_id: int) -> tuple[int, int, tuple[int, int, int]]:
    """(block size, block bytes, (G, L, P)) of a supported type, or a Qwen35Error."""
    if not supports(type_id):
        names = ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))
        raise Qwen35Error(f"the Triton GGUF kernels do not support {type_name(type_id)} (supported: {names})")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    return block_size, type_size, _TILES[GGMLQuantizationType(type_id)]


def _check_blocks(blocks: torch.Tensor, type_id: int, in_features: int, min_dims: int, max_dims: int) -> tuple:
    """(blocks per row, bytes per row, (G, L, P)) after checking the blocks' shape."""
    block_size, type_size, tile = _check_type(type_id)
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


def _aligned(blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    """The blocks, copied (on the device, no sync) if their start is too unaligned for word loads."""
    if blocks.data_ptr() % _ALIGNMENT[GGMLQuantizationType(type_id)]:
        return blocks.clone()
    return blocks


def _check_x(x: torch.Tensor, in_features: int, blocks: torch.Tensor, max_rows: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise Qwen35Error(f"x must be a float32 tensor [rows, {in_features}], got {shape}")
    if max_rows is not None and not 1 <= x.shape[0] <= max_rows:
        raise Qwen35Error(f"gemv takes 1 to {max_rows} rows of x, got {x.shape[0]}")
    if x.device != blocks.device:
        raise Qwen35Error(f"x is on {x.device} but the weight blocks are on {blocks.device}")


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter: a little splitting, so tests exercise the split-K path


# GEMV launch shapes, module-level so a benchmark can try others. With one row of x, per
# type: (rows per program, warps, software-pipelining stages). Chosen from the compiled sm_90
# code (instructions per weight, registers, hence programs per processor), not yet from
# timings: Q4_K 6.3 instructions per weight and 4 programs of 4 warps per processor, Q5_K 7.5
# and 4, Q6_K 10.0 and 4, Q8_0 8.1 and 4, Q4_0 7.6 and 4 (PTX instructions, Triton 3.6). Stages > 1 prefetch the 4-byte
# aligned words of Q4_K/Q5_K through shared memory (cp.async); the 2-byte aligned types
# cannot use it, so they rely on several programs per processor to hide the loads' latency.
GEMV_CONFIG = {
    T.Q4_K: (64, 4, 2),
    T.Q5_K: (64, 4, 2),
    T.Q6_K: (64, 4, 1),
    T.Q8_0: (32, 4, 1),
    T.Q4_0: (32, 4, 1),
}
# With several rows of x (padded to a power of two): rows per program; 4 warps, no prefetch.
# The weights are decoded once for all rows of x, but each row of x still costs a sum per
# group and step: 5 (Q4_K) to 9 (Q6_K) instructions per weight and row at M = 8.
GEMV_BLOCK_N = {2: 16, 4: 16, 8: 16, 16: 8}
PROGRAMS_PER_PROCESSOR = 4  # split-K aims for this many programs per processor


def _plan(n_out: int, n_steps: int, slots: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, steps per split): split K until there are enough programs to fill the processors."""
    row_programs = triton.cdiv(n_out, block_n) * slots
    target = PROGRAMS_PER_PROCESSOR * _processors(device)
    splits = max(1, min(n_steps, target // max(row_programs, 1)))
    steps_per_split = triton.cdiv(n_steps, splits)
    return triton.cdiv(n_steps, steps_per_split), steps_per_split


def dequantize(
    blocks: torch.Tensor, type_id: int, in_features: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Blocks [..., rows, row_bytes] -> weights [..., rows, in_features] of `dtype`.

    In float32 the result is bit-equal to `qwen35.kernels.dequant.dequantize`.
    """
    n_blocks, row_bytes, (groups, length, planes) = _check_blocks(blocks, type_id, in_features, 1, 8)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Qwen35Error(f"dequantize makes float32, float16 or bfloat16, not {dtype}")
    out = torch.empty((*blocks.shape[:-1], in_features), dtype=dtype, device=blocks.device)
    n_rows = blocks.numel() // row_bytes
    if n_rows == 0:
        return out
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    # Triton's interpreter pays per program, not per element: there, far fewer, larger programs.
    block_n = 4 if blocks.is_cuda else 64
    grid = (triton.cdiv(n_rows, block_n), n_steps)
    qtype = int(type_id)
    _dequantize_kernel[grid](
        _aligned(blocks, type_id), out, n_rows, row_bytes, in_features, n_blocks,
        QTYPE=qtype, HAS_MIN=qtype in _HAS_MIN, G=groups, L=length, P=planes, BLOCK_N=block_n,
        num_warps=4, enable_fp_fusion=False,  # a * q + b rounded twice, as the reference does
    )
    return out


def _launch_gemv(blocks, type_id, x, in_features, n_out, slots, expert_ids, n_experts, expert_bytes, block_m, n_x_rows):
    n_blocks, row_bytes, (groups, length, planes) = _check_blocks(blocks, type_id, in_features, 2, 3)
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    if block_m == 1:
        block_n, num_warps, num_stages = GEMV_CONFIG[GGMLQuantizationType(type_id)]
    else:
        block_n, num_warps, num_stages = GEMV_BLOCK_N[block_m], 4, 1
    splits, steps_per_split = _plan(n_out, n_steps, slots, block_n, blocks.device)
    out_rows = slots if expert_ids is not None else n_x_rows
    partial = torch.empty((splits, out_rows, n_out), dtype=torch.float32, device=blocks.device)
    grid = (triton.cdiv(n_out, block_n), splits, slots)
    qtype = int(type_id)
    _gemv_kernel[grid](
        _aligned(blocks, type_id), x, partial, expert_ids if expert_ids is not None else x,
        n_out, in_features, n_blocks, row_bytes, expert_bytes, n_experts, n_x_rows,
        max(slots // max(x.shape[0], 1), 1),
        QTYPE=qtype, HAS_MIN=qtype in _HAS_MIN, G=groups, L=length, P=planes, BLOCK_N=block_n,
        BLOCK_M=block_m, HAS_IDS=expert_ids is not None, STEPS=steps_per_split,
        NUM_STAGES=num_stages, num_warps=num_warps,
    )
    return partial[0] if splits == 1 else partial.sum(dim=0)


def gemv(blocks: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int) -> torch.Tensor:
    """x [M, in_features] float32 (M <= 16) times W^T -> [M, out_features] float32; W is read once."""
    _check_blocks(blocks, type_id, in_features, 2, 2)
    _check_x(x, in_features, blocks, MAX_GEMV_ROWS)
    x = x.contiguous()
    block_m = triton.next_power_of_2(x.shape[0])
    return _launch_gemv(blocks, type_id, x, in_features, blocks.shape[0], 1, None, 0, 0, block_m, x.shape[0])


def expert_gemv(
    blocks: torch.Tensor, type_id: int, x: torch.Tensor, expert_ids: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Slot s computes x[s // (S // R)] . W[expert_ids[s]]^T: blocks [E, out, row_bytes], x [R, in],
    expert_ids [S] (on the device; read by the kernel, never by the host) -> [S, out] float32.

    An expert id outside [0, E) gives NaNs in its slot instead of reading out of bounds.
    """
    _check_blocks(blocks, type_id, in_features, 3, 3)
    _check_x(x, in_features, blocks, None)
    if (not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 1
            or expert_ids.dtype not in (torch.int32, torch.int64)):
        raise Qwen35Error("expert_ids must be a 1-D int32 or int64 tensor")
    if expert_ids.device != blocks.device:
        raise Qwen35Error(f"expert_ids are on {expert_ids.device} but the weight blocks are on {blocks.device}")
    slots, x_rows = expert_ids.shape[0], x.shape[0]
    if slots == 0 or x_rows == 0 or slots % x_rows:
        raise Qwen35Error(f"the {slots} expert slots must be a positive multiple of the {x_rows} rows of x")
    n_experts, n_out = blocks.shape[0], blocks.shape[1]
    x = x.contiguous()
    return _launch_gemv(
        blocks, type_id, x, in_features, n_out, slots, expert_ids.contiguous(), n_experts,
        n_out * blocks.shape[2], 1, 1,
    )


# ---------------------------------------------------------------- benchmark


def random_blocks(type_id: int, shape: tuple[int, ...], in_features: int, device="cpu", seed: int = 0) -> torch.Tensor:
    """Random valid blocks [*shape, row_bytes]: random bytes with finite fp16 scales in [2^-10, 2^-6)."""
    block_size, type_size, _ = _check_type(type_id)
    n_blocks = in_features // block_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, n_blocks, type_size), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELD_OFFSETS[GGMLQuantizationType(type_id)]:
        scales = torch.empty((*shape, n_blocks), dtype=torch.float16).uniform_(2**-10, 2**-6, generator=generator)
        raw[..., offset : offset + 2] = scales.view(torch.uint8).reshape(*shape, n_blocks, 2)
    return raw.reshape(*shape, n_blocks * type_size).to(device)


def benchmark_gemv(type_id: int, out_features: int, in_features: int, device: str = "cuda", rows: int = 1) -> dict:
    """Median time of one gemv over random valid blocks, and the bytes it reads per second.

    "ms" is triton.testing.do_bench's median (launch overhead included when the kernel is
    shorter than the host's launch path); "graph_ms" replays the call from a CUDA graph, as
    decode runs it, which also checks that the call captures without a host sync.
    """
    blocks = random_blocks(type_id, (out_features,), in_features, device=device)
    x = torch.randn(rows, in_features, dtype=torch.float32, device=device)
    bytes_read = blocks.numel() + x.numel() * 4

    def call():
        return gemv(blocks, type_id, x, in_features)

    ms = triton.testing.do_bench(call, return_mode="median")
    graph_ms = triton.testing.do_bench_cudagraph(call, return_mode="median")
    return {"ms": ms, "GB/s": bytes_read / (ms * 1e-3) / 1e9, "graph_ms": graph_ms,
            "graph_GB/s": bytes_read / (graph_ms * 1e-3) / 1e9}
