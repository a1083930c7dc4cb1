"""Tensor-core matrix products that read GGUF quantized blocks directly (no bf16 copy of W).

    dot_matmul:          out[m]  = x[m] @ W^T                          W: blocks [out, row_bytes]
    grouped_dot_matmul:  out[s]  = x[s // (S // R)] @ W[expert_ids[s]]^T   W: blocks [E, out, row_bytes]

The blocks are those of triton_gguf_blocks.py (the loaders there turn each 256-element step
of BLOCK_N weight rows into P byte planes plus per-group scales); the weights are decoded
inside the K loop and fed to tl.dot, so nothing but the raw blocks is read from memory.

How: a program computes the transposed tile out^T [BLOCK_N, BLOCK_M] = W_tile @ x_tile^T,
weight rows on the MMA's M side and tokens on its N side: decode's 1..16 rows then pad to
16, not 64 (on Hopper a warpgroup MMA is 64 x N x 16 with N a multiple of 8), and the
decoded weights, made in registers, are the operand that may stay there (sm_90: wgmma
with A in registers; x, the B operand, is streamed to shared memory). The loop runs over
256-element steps; each step's byte planes are joined back into element order in
registers (tl.join, as triton_gguf.dequantize does) and multiplied in one tl.dot of
K = 256 (Q6_K: four of K = 64, one per quarter, against x's matching columns). x is
rounded to bf16 once by torch before the launch, so its loads are bf16 tiles of whole
64-byte runs that software pipelining prefetches into shared memory.
When there are too few tiles to fill the processors, K is split over programs (partial
sums to a [splits, rows, out] buffer summed afterwards, so results are deterministic).
The grouped product reuses triton_moe's slot layout: slots sorted by expert, each
expert's group padded to whole BLOCK_M blocks, one program per (N tile, block, split).

Precision: weights are rounded to bf16 (nearest even) from the reference's float32
values, x is rounded to bf16 by torch, products are exact in fp32 and sums are fp32: the
result is x.bfloat16() @ W_ref.bfloat16().T up to the order of fp32 summation. (The
compiler may fuse Q4_K/Q5_K's scale * q - offset into one FMA: scale * q is exact in fp32,
at most 11 + 6 + 5 significant bits, so the fused form rounds as the reference does.)

Graph safety: nothing reads a device value on the host; every shape follows from the
input shapes, so calls can be captured in CUDA graphs. An expert id outside [0, E) gives
NaN rows for its slots instead of reading another expert's (or no expert's) blocks.
Without a GPU, Triton's interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1
before import); its bf16 dot multiplies raw bits and its float32 -> bf16 cast truncates,
so there the operands are rounded by hand and multiplied as bf16-valued float32.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from qwen35.errors import Qwen35Error
from qwen35.kernels.triton_gguf_blocks import (
    HAS_MIN_TYPES, STEP, STEP_ELEMENTS, aligned, check_blocks, check_expert_ids, fetch_q6_k, load_step, q6_k_quarter,
    random_blocks, weights_of,
)
from qwen35.kernels.triton_moe import _padded_group_ends, _sorted_slot_layout

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class DotTiles:
    block_n: int  # weight rows per program (the MMA's M side)
    block_m: int  # rows of x (or slots) per program (the MMA's N side), at least 16
    num_warps: int
    num_stages: int


# Tiles by rows of x (grouped: mean slots per expert), module-level so a benchmark can try
# others. UNMEASURED: chosen from the compiled sm_90 code (Triton 3.6: no spills, wgmma,
# shared memory within 227 KB), not from timings. Decoding costs ~9 instructions per weight
# and is done once per x tile, so larger x tiles spread it over more MMAs: decode-sized
# batches take 16-row tiles (little padding; split-K fills the machine), prefill 64 or 128.
DOT_TILES = (
    (16, DotTiles(block_n=64, block_m=16, num_warps=4, num_stages=3)),
    (32, DotTiles(block_n=64, block_m=32, num_warps=4, num_stages=3)),
    (128, DotTiles(block_n=128, block_m=64, num_warps=8, num_stages=3)),
    (None, DotTiles(block_n=128, block_m=128, num_warps=8, num_stages=2)),
)
# The precise (tf32x3) product holds float32 weights: the decode tile with twice the warps (smaller
# tiles, or 4 warps, spill on sm_90).
PRECISE_TILES = DotTiles(block_n=64, block_m=16, num_warps=8, num_stages=2)
# The grouped kernel stops at 64-slot tiles: at 128 its Q4_K code spills (gathered x rows cost
# registers), and every expert's group is padded to whole tiles.
GROUPED_MAX_BLOCK_M = 64
# Split-K aims for this many programs per processor: about what one holds at the decode tiles
# (60 KB of shared memory and ~128 registers a thread for Q4_K: 3 to 4), so that one wave
# streams the weights with every processor busy.
PROGRAMS_PER_PROCESSOR = 4


def pick_tiles(rows_per_weight: float, grouped: bool = False) -> DotTiles:
    """Tiles from the rows of x per weight (shapes only, no data)."""
    allowed = [(most, tiles) for most, tiles in DOT_TILES if not grouped or tiles.block_m <= GROUPED_MAX_BLOCK_M]
    for most_rows, tiles in allowed:
        if most_rows is None or rows_per_weight <= most_rows:
            return tiles
    return allowed[-1][1]


# ---------------------------------------------------------------- kernel


@triton.jit
def _to_bf16(w, DOT_IN_FP32: tl.constexpr):
    if DOT_IN_FP32:
        # Nearest even by hand (the interpreter's cast truncates), kept as a bf16-valued float32.
        bits = w.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return w.to(tl.bfloat16)  # cvt.rn: nearest even


@triton.jit
def _dot_part(acc, w, x_ptrs, x_mask, BLOCK_N: tl.constexpr, K: tl.constexpr, DOT_IN_FP32: tl.constexpr,
              PRECISE: tl.constexpr):
    """acc [N, M] += weights [N, ..., 2] (the planes joined into element order, as [N, K]) @ x [K, M]."""
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    if PRECISE:  # float32 weights and x, three tf32 products a term: float32's accuracy on tensor cores
        w = tl.reshape(w, (BLOCK_N, K))
        if DOT_IN_FP32:
            acc = tl.dot(w, x, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc, input_precision="tf32x3")
    else:
        w = tl.reshape(_to_bf16(w, DOT_IN_FP32), (BLOCK_N, K))
        if DOT_IN_FP32:
            acc = tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, x, acc)
    return acc


@triton.jit
def _dot_kernel(
    w_ptr, x_ptr, out_ptr, sorted_slots_ptr, group_counts_ptr,
    n_out, in_features, n_blocks, n_steps, row_bytes, expert_bytes, n_experts, out_rows, slots_per_row,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, STEPS: tl.constexpr, GROUPED: tl.constexpr,
    GROUPS: tl.constexpr, NUM_STAGES: tl.constexpr, EVEN_K: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """partial[split, r, n] = this split's steps of x_rows[r] . W[n]; grouped, r is a slot."""
    tile_n = tl.program_id(0)
    block = tl.program_id(1)
    split = tl.program_id(2)
    row = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row < n_out
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if GROUPED:
        # The block's expert: the number of groups whose padded run ends at or before it.
        group_ends = _padded_group_ends(group_counts_ptr, BLOCK_M, GROUPS)[0]
        expert = tl.sum((group_ends <= block * BLOCK_M).to(tl.int32), 0)
        out_row = tl.load(sorted_slots_ptr + offs_m)
        used = out_row < out_rows
        if expert >= n_experts:
            # Slots with an out-of-range expert id, or a block past the used ones (nothing stored).
            out_ptrs = out_ptr + (split * out_rows + out_row.to(tl.int64))[None, :] * n_out + row[:, None]
            nan = tl.full((BLOCK_N, BLOCK_M), float("nan"), tl.float32)
            tl.store(out_ptrs, nan, mask=row_ok[:, None] & used[None, :])
            return
        w_ptr += expert.to(tl.int64) * expert_bytes
        x_row = out_row // slots_per_row
    else:
        out_row = offs_m
        used = offs_m < out_rows
        x_row = offs_m
    rows = (w_ptr + row.to(tl.int64) * row_bytes)[:, None, None]
    # A part is one step, or one quarter of a Q6_K step (two runs of 32 elements, 128 apart).
    if QTYPE == 14:
        K: tl.constexpr = STEP // 4
        part_cols = (128 * (tl.arange(0, K) // 32) + tl.arange(0, K) % 32)[:, None]
    else:
        K: tl.constexpr = STEP
        part_cols = tl.arange(0, K)[:, None]
    # Offsets, not pointers: a [K, BLOCK_M] tile of 64-bit pointers held across the loop costs
    # twice the registers (the host makes sure the offsets fit).
    x_offsets = (x_row * in_features)[None, :] + part_cols
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # STEPS (steps per split) is a compile-time constant: Triton's interpreter cannot loop to
    # a runtime bound. Steps past the row's end (a short last split) load as zeros.
    first = split * STEPS
    for i in tl.range(0, STEPS, num_stages=NUM_STAGES):
        step = first + i
        x_step = x_ptr + (x_offsets + step * STEP)
        x_mask = used[None, :] & (step < n_steps)
        if not EVEN_K:  # Q8_0/Q4_0 rows may end inside a step
            x_mask = x_mask & (step * STEP + part_cols < in_features)
        if QTYPE == 14:
            low_a, low_b, high, d, block_ptr, mask = fetch_q6_k(rows, step, n_blocks, row_ok[:, None, None], G, L)
            for quarter in tl.static_range(4):
                q0, q1, q2, q3, scale, offset = q6_k_quarter(low_a, low_b, high, d, block_ptr, mask, quarter, G)
                w = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q1, scale, offset, HAS_MIN))
                acc = _dot_part(acc, w, x_step + 32 * quarter, x_mask, BLOCK_N, K, DOT_IN_FP32, PRECISE)
        else:
            q0, q1, q2, q3, scale, offset = load_step(rows, step, n_blocks, row_ok[:, None, None], QTYPE, G, L)
            if P == 4:  # element 4w + 2a + b is plane 2a + b: join by a, then by b
                even = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q2, scale, offset, HAS_MIN))
                odd = tl.join(weights_of(q1, scale, offset, HAS_MIN), weights_of(q3, scale, offset, HAS_MIN))
                w = tl.join(even, odd)
            else:
                w = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q1, scale, offset, HAS_MIN))
            acc = _dot_part(acc, w, x_step, x_mask, BLOCK_N, K, DOT_IN_FP32, PRECISE)
    out_ptrs = out_ptr + (split * out_rows + out_row.to(tl.int64))[None, :] * n_out + row[:, None]
    tl.store(out_ptrs, acc, mask=row_ok[:, None] & used[None, :])


# ---------------------------------------------------------------- host side


def _check_x(x: torch.Tensor, in_features: int, blocks: torch.Tensor) -> None:
    if (not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2
            or x.shape[1] != in_features):
        shape = f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise Qwen35Error(f"x must be a float32 (or bfloat16) tensor [rows, {in_features}], got {shape}")
    if x.device != blocks.device:
        raise Qwen35Error(f"x is on {x.device} but the weight blocks are on {blocks.device}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise Qwen35Error(
            f"the GGUF tensor-core products run on a CUDA device (or in Triton's interpreter with "
            f"TRITON_INTERPRET=1), not on {x.device}"
        )


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return PROGRAMS_PER_PROCESSOR * _sm_count(index)
    return 2  # the interpreter: a little splitting, so tests exercise split-K (with a short last split)


def _launch(blocks, type_id, x, in_features, n_out, out_rows, m_blocks, busy_m_blocks, tiles,
            grouping=None, n_experts=0, slots_per_row=1, precise=False):
    """Runs the kernel over (N tiles, x blocks, K splits) and sums the splits: [out_rows, n_out] float32."""
    n_blocks, row_bytes, tile = check_blocks(blocks, type_id, in_features, 2, 3)
    groups, length, planes = tile
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    if (x.shape[0] + tiles.block_m) * in_features >= 2**31:
        raise Qwen35Error(f"x has too many rows ({x.shape[0]}) for one product: split it into smaller chunks")
    n_tiles = triton.cdiv(n_out, tiles.block_n)
    target = _target_programs(blocks.device)
    splits = max(1, min(n_steps, target // max(n_tiles * busy_m_blocks, 1)))
    steps_per_split = triton.cdiv(n_steps, splits)
    splits = triton.cdiv(n_steps, steps_per_split)
    partial = torch.empty((splits, out_rows, n_out), dtype=torch.float32, device=blocks.device)
    # Rounded to bf16 once, not per N tile; kept in float32 for the precise product.
    x_in = x.to(torch.float32 if precise else torch.bfloat16, memory_format=torch.contiguous_format)
    sorted_slots, group_counts = grouping if grouping is not None else (x_in, x_in)
    qtype = int(type_id)
    _dot_kernel[(n_tiles, m_blocks, splits)](
        aligned(blocks, type_id), x_in, partial, sorted_slots, group_counts,
        n_out, in_features, n_blocks, n_steps, row_bytes, n_out * row_bytes, n_experts, out_rows, slots_per_row,
        QTYPE=qtype, HAS_MIN=qtype in HAS_MIN_TYPES, G=groups, L=length, P=planes,
        BLOCK_N=tiles.block_n, BLOCK_M=tiles.block_m, STEPS=steps_per_split, GROUPED=grouping is not None,
        GROUPS=group_counts.shape[0] if grouping is not None else 1, NUM_STAGES=tiles.num_stages,
        EVEN_K=in_features % STEP_ELEMENTS == 0,
        DOT_IN_FP32=_INTERPRETED, PRECISE=precise, num_warps=tiles.num_warps,
    )
    return partial[0] if splits == 1 else partial.sum(dim=0)


def dot_matmul(
    blocks: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int, tiles: DotTiles | None = None,
    precise: bool = False,
) -> torch.Tensor:
    """x [M, in_features] float32 times W^T, W the blocks [out, row_bytes] -> [M, out] float32.

    Computes x.bfloat16() @ W.bfloat16().T with fp32 sums (bfloat16 x is taken as it is);
    `tiles` overrides pick_tiles. With `precise`, float32 x and weights, each term three tf32
    tensor-core products (float32's accuracy, as the matrix-vector kernel's; decode-sized M).
    """
    check_blocks(blocks, type_id, in_features, 2, 2)
    _check_x(x, in_features, blocks)
    rows, n_out = x.shape[0], blocks.shape[0]
    if rows == 0 or n_out == 0:
        return torch.zeros((rows, n_out), dtype=torch.float32, device=x.device)
    tiles = tiles or (PRECISE_TILES if precise else pick_tiles(rows))
    m_blocks = triton.cdiv(rows, tiles.block_m)
    return _launch(blocks, type_id, x, in_features, n_out, rows, m_blocks, m_blocks, tiles, precise=precise)


def grouped_dot_matmul(
    blocks: torch.Tensor, type_id: int, x: torch.Tensor, expert_ids: torch.Tensor, in_features: int,
    tiles: DotTiles | None = None,
) -> torch.Tensor:
    """Slot s computes x[s // (S // R)] @ W[expert_ids[s]]^T: blocks [E, out, row_bytes], x [R, in]
    float32 (or bfloat16), expert_ids [S] int32/int64 on the device (never read by the host) -> [S, out] float32.

    An expert id outside [0, E) gives NaNs in its slot instead of reading out of bounds.
    """
    check_blocks(blocks, type_id, in_features, 3, 3)
    _check_x(x, in_features, blocks)
    slots, rows = check_expert_ids(expert_ids, blocks, x.shape[0]), x.shape[0]
    n_experts, n_out = blocks.shape[0], blocks.shape[1]
    if n_experts == 0:
        raise Qwen35Error("the expert blocks hold no experts")
    if n_out == 0:
        return torch.zeros((slots, 0), dtype=torch.float32, device=x.device)
    tiles = tiles or pick_tiles(slots / n_experts, grouped=True)
    sorted_slots, group_counts = _sorted_slot_layout(expert_ids, n_experts, tiles.block_m)
    m_blocks = sorted_slots.shape[0] // tiles.block_m
    # Most blocks of the worst-case layout stay empty: split K by the blocks that can be busy.
    busy_m_blocks = min(m_blocks, triton.cdiv(slots, tiles.block_m) + min(n_experts, slots))
    return _launch(blocks, type_id, x, in_features, n_out, slots, m_blocks, busy_m_blocks, tiles,
                   (sorted_slots, group_counts), n_experts, slots // rows)


# ---------------------------------------------------------------- benchmark


def benchmark_dot(type_id: int, out_features: int, in_features: int, rows: int, device: str = "cuda",
                  tiles: DotTiles | None = None) -> dict:
    """Median time of one dot_matmul over random valid blocks, the bytes it must move per second
    (blocks, x, out) and its TFLOP/s (2 rows out in).

    "ms" is triton.testing.do_bench's median (launch overheads included: the bf16 cast of x and,
    with split-K, the sum of the splits); "graph_ms" replays the call from a CUDA graph, which
    also checks that it captures without a host sync.
    """
    blocks = random_blocks(type_id, (out_features,), in_features, device=device)
    x = torch.randn(rows, in_features, dtype=torch.float32, device=device)
    bytes_moved = blocks.numel() + x.numel() * 4 + rows * out_features * 4
    flops = 2.0 * rows * out_features * in_features

    def call():
        return dot_matmul(blocks, type_id, x, in_features, tiles=tiles)

    ms = triton.testing.do_bench(call, return_mode="median")
    graph_ms = triton.testing.do_bench_cudagraph(call, return_mode="median")
    return {"ms": ms, "GB/s": bytes_moved / (ms * 1e-3) / 1e9, "TFLOP/s": flops / (ms * 1e-3) / 1e12,
            "graph_ms": graph_ms, "graph_GB/s": bytes_moved / (graph_ms * 1e-3) / 1e9,
            "tiles": tiles or pick_tiles(rows)}
