"""Triton kernels that compute straight from GGUF quantized blocks (no re-packing).

Weights stay in the file's bytes: `blocks` is a uint8 tensor [rows, row_bytes] (or
[E, rows, row_bytes] for a stack of MoE experts) holding the ggml blocks of a weight
W [out_features, in_features], each row `in_features / block_size` consecutive blocks.
The block layouts are those of `qwen35.kernels.dequant` (the plain reference, bit-equal
to gguf-py); `dequantize` here is bit-equal to it in float32.

Every block type is described to the kernels the same way: one step along a row covers
256 elements, seen as a tile of G groups of L elements (natural element order), and a
type's loader returns the integer codes q [rows, G, L] with a per-group scale a and,
for types with minimums, a per-group offset b [rows, G, 1], so that W = a * q - b.
A GEMV then needs only sum(q * x) per group, scaled once per group, and the offsets
contribute -b * sum(x) per group: the per-element work is a nibble extraction, a
conversion and one multiply-add.

The GEMV kernels are written for memory-bound decode on the GPU: many programs over
output rows, split-K when the matrix is too skinny to fill the machine (partial sums go
to a [splits, M, out] buffer summed afterwards, so results are deterministic), fp32
accumulation, and no host synchronisation (expert ids are read inside the kernel), so
they can be captured in CUDA graphs. Without a GPU, Triton's interpreter runs them on
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

# type id -> (groups G, group length L) of one step's tile.
_TILES = {
    T.Q4_K: (8, 32),
    T.Q5_K: (8, 32),
    T.Q6_K: (16, 16),
    T.Q8_0: (8, 32),
    T.Q4_0: (8, 32),
}
_HAS_MIN = {T.Q4_K, T.Q5_K}

SUPPORTED_TYPES: frozenset[int] = frozenset(int(t) for t in _TILES)

MAX_GEMV_ROWS = 16  # the most rows of x one gemv call takes (decode-sized batches)


def supports(type_id: int) -> bool:
    return int(type_id) in SUPPORTED_TYPES


# ---------------------------------------------------------------- block loaders (device code)


@triton.jit
def _f16_at(ptr, mask):
    """The little-endian fp16 at byte `ptr` (any alignment), as float32."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(block, mask, s):
    """Q4_K/Q5_K: 6-bit scale and min of sub-block `s` from the 12 bytes at block + 4."""
    i = s % 4
    sd = tl.load(block + 4 + i, mask=mask, other=0).to(tl.int32)
    sm = tl.load(block + 8 + i, mask=mask, other=0).to(tl.int32)
    smd = tl.load(block + 12 + i, mask=mask, other=0).to(tl.int32)
    scale = tl.where(s < 4, sd & 63, (smd & 15) | ((sd >> 2) & 0x30))
    minimum = tl.where(s < 4, sm & 63, (smd >> 4) | ((sm >> 2) & 0x30))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _load_q4_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    s = tl.arange(0, G)[None, :, None]
    l = tl.arange(0, L)[None, None, :]
    mask = mask & (step < n_steps)
    block = rows + step * 144
    d = _f16_at(block, mask)
    dmin = _f16_at(block + 2, mask)
    scale, minimum = _k_scale_min(block, mask, s)
    # Sub-blocks 2j and 2j+1 are the low and high nibbles of the same 32 bytes.
    packed = tl.load(block + 16 + 32 * (s // 2) + l, mask=mask, other=0).to(tl.int32)
    q = ((packed >> (4 * (s % 2))) & 15).to(tl.float32)
    return q, d * scale, dmin * minimum


@triton.jit
def _load_q5_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    s = tl.arange(0, G)[None, :, None]
    l = tl.arange(0, L)[None, None, :]
    mask = mask & (step < n_steps)
    block = rows + step * 176
    d = _f16_at(block, mask)
    dmin = _f16_at(block + 2, mask)
    scale, minimum = _k_scale_min(block, mask, s)
    packed = tl.load(block + 48 + 32 * (s // 2) + l, mask=mask, other=0).to(tl.int32)
    high = tl.load(block + 16 + l, mask=mask, other=0).to(tl.int32)  # bit s of byte l
    q = (((packed >> (4 * (s % 2))) & 15) | (((high >> s) & 1) << 4)).to(tl.float32)
    return q, d * scale, dmin * minimum


@triton.jit
def _load_q6_k(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    g = tl.arange(0, G)[None, :, None]  # 16 groups of 16 elements, one int8 scale each
    t = tl.arange(0, L)[None, None, :]
    mask = mask & (step < n_steps)
    block = rows + step * 210
    d = _f16_at(block + 208, mask)
    half = g // 8  # each 128-element half has 64 bytes of low nibbles and 32 of high bits
    quarter = (g % 8) // 2
    lane = 16 * (g % 2) + t
    low = tl.load(block + 64 * half + 32 * (quarter % 2) + lane, mask=mask, other=0).to(tl.int32)
    high = tl.load(block + 128 + 32 * half + lane, mask=mask, other=0).to(tl.int32)
    code = ((low >> (4 * (quarter // 2))) & 15) | (((high >> (2 * quarter)) & 3) << 4)
    q = (code - 32).to(tl.float32)
    scale = tl.load(block + 192 + g, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return q, d * scale, tl.zeros_like(scale)


@triton.jit
def _load_q8_0(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    b = step * G + tl.arange(0, G)[None, :, None]  # G consecutive 32-element blocks
    l = tl.arange(0, L)[None, None, :]
    mask = mask & (b < n_steps)
    block = rows + b * 34
    d = _f16_at(block, mask)
    q = tl.load(block + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return q, d, tl.zeros_like(d)


@triton.jit
def _load_q4_0(rows, step, n_steps, mask, G: tl.constexpr, L: tl.constexpr):
    b = step * G + tl.arange(0, G)[None, :, None]
    l = tl.arange(0, L)[None, None, :]
    mask = mask & (b < n_steps)
    block = rows + b * 18
    d = _f16_at(block, mask)
    packed = tl.load(block + 2 + (l % 16), mask=mask, other=0).to(tl.int32)
    q = (((packed >> (4 * (l // 16))) & 15) - 8).to(tl.float32)
    return q, d, tl.zeros_like(d)


@triton.jit
def _load_step(rows, step, n_blocks, mask, QTYPE: tl.constexpr, G: tl.constexpr, L: tl.constexpr):
    """One step (256 elements) of BLOCK_N rows: (q [N, G, L], scale [N, G, 1], offset [N, G, 1]),
    W = scale * q - offset (the offset is zero for types without minimums).

    `rows` [N, 1, 1] points at each row's first byte; `n_blocks` is the row's ggml block
    count (steps for 256-element types, 32-blocks for Q8_0/Q4_0).
    """
    if QTYPE == 12:
        return _load_q4_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 13:
        return _load_q5_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 14:
        return _load_q6_k(rows, step, n_blocks, mask, G, L)
    elif QTYPE == 8:
        return _load_q8_0(rows, step, n_blocks, mask, G, L)
    else:
        tl.static_assert(QTYPE == 2, "unsupported block type")
        return _load_q4_0(rows, step, n_blocks, mask, G, L)


# ---------------------------------------------------------------- kernels


@triton.jit
def _dequantize_kernel(
    w_ptr, out_ptr, n_rows, row_bytes, in_features, n_blocks,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    step = tl.program_id(1)
    row = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    row_ok = row < n_rows
    q, scale, offset = _load_step(w_ptr + row * row_bytes, step, n_blocks, row_ok, QTYPE, G, L)
    if HAS_MIN:
        w = scale * q - offset  # the reference's order; a negated offset added would flip signed zeros
    else:
        w = scale * q
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates.
        # (Weights from blocks with finite fp16 scales are finite, so no NaN payload to keep.)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    col = step * (G * L) + tl.arange(0, G)[None, :, None] * L + tl.arange(0, L)[None, None, :]
    tl.store(out_ptr + row * in_features + col, w.to(out_ptr.dtype.element_ty), mask=row_ok & (col < in_features))


@triton.jit
def _gemv_kernel(
    w_ptr, x_ptr, out_ptr, ids_ptr,
    n_out, in_features, n_blocks, row_bytes, expert_bytes, n_experts, n_x_rows, slots_per_x,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDS: tl.constexpr, STEPS: tl.constexpr,
):
    """out[split, m, n] = sum over this split's steps of x[m] . W[n] (or, with ids, one slot per program)."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    slot = tl.program_id(2)
    row = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    row_ok = row < n_out
    rows = w_ptr + row * row_bytes
    m = tl.arange(0, BLOCK_M)[:, None, None, None]
    if HAS_IDS:
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        expert_ok = (expert >= 0) & (expert < n_experts)
        rows += tl.where(expert_ok, expert, 0) * expert_bytes
        row_ok = row_ok & expert_ok
        x_row = m + slot // slots_per_x
    else:
        x_row = m
    x_ok = m < n_x_rows
    x_rows = x_ptr + x_row.to(tl.int64) * in_features
    element = tl.arange(0, G)[None, :, None] * L + tl.arange(0, L)[None, None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # STEPS (steps per split) is a compile-time constant: Triton's interpreter cannot loop to a
    # runtime bound, and a fixed trip count lets the compiler unroll.
    first = split * STEPS
    for i in range(0, STEPS):
        step = first + i  # steps past the row's end load as zeros (the last split may be short)
        q, scale, offset = _load_step(rows, step, n_blocks, row_ok, QTYPE, G, L)
        col = step * (G * L) + element
        x = tl.load(x_rows + col[None], mask=x_ok & (col[None] < in_features), other=0.0)  # [M, 1, G, L]
        qx = tl.sum(q[None] * x, axis=3, keep_dims=True)  # [M, N, G, 1]: one sum per group
        part = scale[None] * qx
        if HAS_MIN:
            part -= offset[None] * tl.sum(x, axis=3, keep_dims=True)
        acc += tl.sum(tl.sum(part, axis=3), axis=2)
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


def _check_type(type_id: int) -> tuple[int, int, int, int]:
    """(block size, block bytes, G, L) of a supported type, or a Qwen35Error."""
    if not supports(type_id):
        names = ", ".join(sorted(GGMLQuantizationType(t).name for t in SUPPORTED_TYPES))
        raise Qwen35Error(f"the Triton GGUF kernels do not support {type_name(type_id)} (supported: {names})")
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    groups, length = _TILES[GGMLQuantizationType(type_id)]
    return block_size, type_size, groups, length


def _check_blocks(blocks: torch.Tensor, type_id: int, in_features: int, min_dims: int, max_dims: int) -> tuple:
    block_size, type_size, groups, length = _check_type(type_id)
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
    return n_blocks, row_bytes, groups, length


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


def _plan(n_out: int, n_steps: int, slots: int, block_n: int, device: torch.device) -> tuple[int, int]:
    """(splits, steps per split): split K until there are ~4 programs per processor."""
    row_programs = triton.cdiv(n_out, block_n) * slots
    target = 4 * _processors(device)
    splits = max(1, min(n_steps, target // max(row_programs, 1)))
    steps_per_split = triton.cdiv(n_steps, splits)
    return triton.cdiv(n_steps, steps_per_split), steps_per_split


def _block_n(block_m: int) -> int:
    return max(2, 16 // block_m)


def dequantize(blocks: torch.Tensor, type_id: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Blocks [..., rows, row_bytes] -> weights [..., rows, in_features] of `dtype`.

    In float32 the result is bit-equal to `qwen35.kernels.dequant.dequantize`.
    """
    n_blocks, row_bytes, groups, length = _check_blocks(blocks, type_id, in_features, 1, 8)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Qwen35Error(f"dequantize makes float32, float16 or bfloat16, not {dtype}")
    out = torch.empty((*blocks.shape[:-1], in_features), dtype=dtype, device=blocks.device)
    n_rows = blocks.numel() // row_bytes
    if n_rows == 0:
        return out
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    block_n = 4
    grid = (triton.cdiv(n_rows, block_n), n_steps)
    qtype = int(type_id)
    _dequantize_kernel[grid](
        blocks, out, n_rows, row_bytes, in_features, n_blocks,
        QTYPE=qtype, HAS_MIN=qtype in _HAS_MIN, G=groups, L=length, BLOCK_N=block_n,
        num_warps=4, enable_fp_fusion=False,  # a * q + b rounded twice, as the reference does
    )
    return out


def _launch_gemv(blocks, type_id, x, in_features, n_out, slots, expert_ids, n_experts, expert_bytes, block_m, n_x_rows):
    n_blocks, row_bytes, groups, length = _check_blocks(blocks, type_id, in_features, 2, 3)
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    block_n = _block_n(block_m)
    splits, steps_per_split = _plan(n_out, n_steps, slots, block_n, blocks.device)
    out_rows = slots if expert_ids is not None else n_x_rows
    partial = torch.empty((splits, out_rows, n_out), dtype=torch.float32, device=blocks.device)
    grid = (triton.cdiv(n_out, block_n), splits, slots)
    qtype = int(type_id)
    _gemv_kernel[grid](
        blocks, x, partial, expert_ids if expert_ids is not None else x,
        n_out, in_features, n_blocks, row_bytes, expert_bytes, n_experts, n_x_rows,
        max(slots // max(x.shape[0], 1), 1),
        QTYPE=qtype, HAS_MIN=qtype in _HAS_MIN, G=groups, L=length,
        BLOCK_N=block_n, BLOCK_M=block_m, HAS_IDS=expert_ids is not None, STEPS=steps_per_split, num_warps=4,
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
    if not isinstance(expert_ids, torch.Tensor) or expert_ids.dim() != 1 or expert_ids.dtype not in (torch.int32, torch.int64):
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
    block_size, type_size, _, _ = _check_type(type_id)
    n_blocks = in_features // block_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, n_blocks, type_size), dtype=torch.uint8, generator=generator)
    for offset in FP16_FIELD_OFFSETS[GGMLQuantizationType(type_id)]:
        scales = torch.empty((*shape, n_blocks), dtype=torch.float16).uniform_(2**-10, 2**-6, generator=generator)
        raw[..., offset : offset + 2] = scales.view(torch.uint8).reshape(*shape, n_blocks, 2)
    return raw.reshape(*shape, n_blocks * type_size).to(device)


def benchmark_gemv(type_id: int, out_features: int, in_features: int, device: str = "cuda", rows: int = 1) -> dict:
    """Median time of one gemv over random valid blocks, and the weight bytes read per second."""
    blocks = random_blocks(type_id, (out_features,), in_features, device=device)
    x = torch.randn(rows, in_features, dtype=torch.float32, device=device)
    ms = triton.testing.do_bench(lambda: gemv(blocks, type_id, x, in_features), return_mode="median")
    bytes_read = blocks.numel() + x.numel() * 4 + rows * out_features * 4
    return {"ms": ms, "GB/s": bytes_read / (ms * 1e-3) / 1e9}
