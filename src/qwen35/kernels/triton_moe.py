"""Grouped mixture-of-experts matrix product on NVIDIA GPUs, in one Triton matmul launch.

Given token rows x [R, K], expert weights W [E, N, K] (bfloat16, already dequantized)
and expert_ids [S] with S a multiple of R, slot s uses expert expert_ids[s] on input row
s // (S // R):

    out[s] = x[s // (S // R)] @ W[expert_ids[s]].T          out: [S, N] float32

(In the model R tokens each pick k = S / R experts; the caller weights and sums the k slots.)

How (like vLLM's fused_moe): two small kernels count the slots per expert and place each
slot into its expert's group of a sorted slot list, every group padded to whole blocks of
BLOCK_M entries, in a list of fixed worst-case length. Then one kernel runs over (blocks,
N tiles): a program finds its block's expert from the counts, gathers its slots' input
rows, multiplies them by the expert's weights tile by tile over K (bf16 operands, fp32
accumulation) and scatters the results to its slots' output rows; blocks nobody uses
return at once. Four launches in all (a memset and three kernels; for prefill, a cast of
float32 x too); nothing reads a device value back to the host and every shape follows from
the input shapes, so a call can be captured in a CUDA graph.

float32 x is rounded to bfloat16 (tl.dot takes bf16 operands; by torch before the launch
for prefill, in the kernel for decode), so the result is x.bfloat16() @ W.T summed in fp32,
not float32 x @ W.T. `grouped_expert_matmul_reference` is the plain definition in float32.

Expert ids outside [0, E) cannot be rejected without a host sync; their output rows are
NaN, so the mistake shows instead of reading another expert's weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from qwen35.errors import Qwen35Error

# Triton reads this switch when a kernel is defined, i.e. when this module is imported. Its
# interpreter (Triton 3.6) multiplies bf16 tiles as their raw uint16 bits and rounds fp32 to
# bf16 by truncation, so there torch rounds x to bf16 before the launch and the kernel widens
# its bf16 operands to fp32 before tl.dot, which gives the GPU's sums.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # blocks that walk the N tiles together, so one weight tile serves them all from L2
    num_warps: int
    num_stages: int


# Decode (a few slots per expert): small M tiles waste little on padding, and BLOCK_N 64 gives
# enough programs to keep every SM streaming weights. Prefill: 64 x 128 tiles feed Hopper's
# warpgroup MMA. Measured on an H200 (4096 tokens, 8 of 256 experts, N 1024, K 2048): three
# stages 0.49 ms, four 0.52, five 0.59; eight warps or GROUP_M 4/16 no better; 64 x 64 tiles 0.70.
_DECODE_TILES = TileConfig(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=5)
_MIDDLE_TILES = TileConfig(block_m=32, block_n=64, block_k=64, group_m=4, num_warps=4, num_stages=4)
_PREFILL_TILES = TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=3)


def pick_tiles(slots: int, experts: int) -> TileConfig:
    """Tiles for S slots over E experts, from the mean slots per expert (shapes only, no data)."""
    mean_slots_per_expert = slots / experts
    if mean_slots_per_expert <= 16:
        return _DECODE_TILES
    if mean_slots_per_expert <= 48:
        return _MIDDLE_TILES
    return _PREFILL_TILES


def _check_inputs(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> tuple[int, int, int, int]:
    """Validate shapes and dtypes; returns (rows R, slots S, experts E, out features N)."""
    if x.dim() != 2:
        raise Qwen35Error(f"grouped expert matmul: x must be [rows, in_features], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise Qwen35Error(f"grouped expert matmul: x must be float32 or bfloat16, got {x.dtype}")
    if weights.dim() != 3:
        raise Qwen35Error(
            f"grouped expert matmul: weights must be [experts, out_features, in_features], "
            f"got shape {tuple(weights.shape)}"
        )
    if weights.dtype != torch.bfloat16:
        raise Qwen35Error(f"grouped expert matmul: weights must be bfloat16, got {weights.dtype}")
    if expert_ids.dim() != 1:
        raise Qwen35Error(f"grouped expert matmul: expert_ids must be 1-D, got shape {tuple(expert_ids.shape)}")
    if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
        raise Qwen35Error(f"grouped expert matmul: expert_ids must be integers, got {expert_ids.dtype}")
    rows, in_features = x.shape
    experts, out_features, weight_in = weights.shape
    slots = expert_ids.shape[0]
    if weight_in != in_features:
        raise Qwen35Error(
            f"grouped expert matmul: x has {in_features} input features but the weights take {weight_in}"
        )
    if experts == 0:
        raise Qwen35Error("grouped expert matmul: the weights hold no experts")
    if (rows == 0) != (slots == 0) or (rows and slots % rows):
        raise Qwen35Error(
            f"grouped expert matmul: {slots} expert slots cannot be shared evenly by {rows} input rows"
        )
    if not x.device == weights.device == expert_ids.device:
        raise Qwen35Error(
            f"grouped expert matmul: x, weights and expert_ids must be on one device, got "
            f"{x.device}, {weights.device} and {expert_ids.device}"
        )
    return rows, slots, experts, out_features


def grouped_expert_matmul_reference(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """The plain definition, one expert at a time in float32: [S, N] float32."""
    rows, slots, experts, out_features = _check_inputs(x, weights, expert_ids)
    if slots and bool(((expert_ids < 0) | (expert_ids >= experts)).any()):
        raise Qwen35Error(f"grouped expert matmul: expert ids must lie in [0, {experts})")
    input_rows = torch.arange(slots, device=x.device) // max(slots // max(rows, 1), 1)
    out = torch.zeros(slots, out_features, dtype=torch.float32, device=x.device)
    for expert in range(experts):
        chosen = (expert_ids == expert).nonzero().squeeze(1)
        if chosen.numel():
            out[chosen] = x[input_rows[chosen]].float() @ weights[expert].float().T
    return out


# Slots each layout program handles: a [LAYOUT_BLOCK, groups] comparison stays in registers.
_LAYOUT_BLOCK = 64


@triton.jit
def _expert_group(expert_ids_ptr, offs, in_slots, experts):
    """Each slot's group: its expert, or the extra group E that collects out-of-range ids."""
    ids = tl.load(expert_ids_ptr + offs, mask=in_slots, other=0)
    return tl.where((ids >= 0) & (ids < experts), ids, experts).to(tl.int32)


@triton.jit
def _padded_group_ends(counts_ptr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr):
    """Where each group's run of whole BLOCK_M blocks ends in the sorted slot list (groups in order)."""
    counts = tl.load(counts_ptr + tl.arange(0, GROUPS))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    return tl.cumsum(padded, 0), padded


@triton.jit
def _count_slots_kernel(expert_ids_ptr, counts_ptr, sorted_slots_ptr, slots, capacity, experts, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_slots = offs < slots
    groups = _expert_group(expert_ids_ptr, offs, in_slots, experts)
    tl.atomic_add(counts_ptr + groups, 1, mask=in_slots)
    # Every entry starts as padding (slot index S); the placing kernel overwrites the used ones.
    tl.store(sorted_slots_ptr + offs, tl.full((BLOCK,), slots, tl.int32), mask=offs < capacity)


@triton.jit
def _place_slots_kernel(
    expert_ids_ptr,
    counts_ptr,
    cursors_ptr,
    sorted_slots_ptr,
    slots,
    experts,
    BLOCK_M: tl.constexpr,
    GROUPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_slots = offs < slots
    groups = _expert_group(expert_ids_ptr, offs, in_slots, experts)
    ends, padded = _padded_group_ends(counts_ptr, BLOCK_M, GROUPS)
    # A slot's group starts after the padded runs of all lower groups.
    lower = tl.arange(0, GROUPS)[None, :] < groups[:, None]
    group_starts = tl.sum(tl.where(lower, padded[None, :], 0), axis=1)
    # The order inside a group is whatever the atomics give; each slot's result does not depend on it.
    rank = tl.atomic_add(cursors_ptr + groups, 1, mask=in_slots)
    tl.store(sorted_slots_ptr + group_starts + rank, offs.to(tl.int32), mask=in_slots)


def _layout_groups(experts: int) -> int:
    return triton.next_power_of_2(experts + 1)


def _layout_capacity(slots: int, experts: int, block_m: int) -> int:
    """Worst-case sorted list length: S slots in at most min(E + 1, S) groups, each wasting under a block."""
    return triton.cdiv(slots + min(experts + 1, slots) * (block_m - 1), block_m) * block_m


def _sorted_slot_layout(expert_ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots grouped by expert, each group padded to whole blocks, in two small launches.

    Returns (sorted_slots [capacity] int32, group_counts [GROUPS] int32). Groups are the experts
    in order, then one for out-of-range ids, then empty ones up to a power of two; group g's
    slots fill the blocks from sum over lower groups of round_up(count, block_m). Padding
    entries hold S (no slot).
    """
    expert_ids = expert_ids.contiguous()  # the kernels index it as a flat array
    slots = expert_ids.shape[0]
    groups = _layout_groups(experts)
    capacity = _layout_capacity(slots, experts, block_m)
    counters = torch.zeros(2 * groups, dtype=torch.int32, device=expert_ids.device)
    counts, cursors = counters[:groups], counters[groups:]
    sorted_slots = torch.empty(capacity, dtype=torch.int32, device=expert_ids.device)
    _count_slots_kernel[(triton.cdiv(capacity, 1024),)](
        expert_ids, counts, sorted_slots, slots, capacity, experts, BLOCK=1024
    )
    _place_slots_kernel[(triton.cdiv(slots, _LAYOUT_BLOCK),)](
        expert_ids, counts, cursors, sorted_slots, slots, experts, BLOCK_M=block_m, GROUPS=groups, BLOCK=_LAYOUT_BLOCK
    )
    return sorted_slots, counts


@triton.jit
def _grouped_expert_matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    sorted_slots_ptr,
    group_counts_ptr,
    num_blocks,
    experts,
    slots,
    slots_per_row,
    N,
    stride_x_row,
    stride_x_k,
    stride_w_expert,
    stride_w_n,
    stride_w_k,
    stride_out_slot,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    GROUPS: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Grouped order: GROUP_M consecutive blocks (mostly one expert's) take each N tile in turn.
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_block = (pid // programs_per_group) * GROUP_M
    group_blocks = tl.minimum(num_blocks - first_block, GROUP_M)
    block = first_block + (pid % programs_per_group) % group_blocks
    tile_n = (pid % programs_per_group) // group_blocks

    # The block's group is the number of groups whose padded run ends at or before the block's
    # start (empty groups end where they start, so they are skipped).
    ends, _ = _padded_group_ends(group_counts_ptr, BLOCK_M, GROUPS)
    expert = tl.sum((ends <= block * BLOCK_M).to(tl.int32), 0)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_slots_ptr + offs_m)
    slot_used = slot < slots
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + slot.to(tl.int64)[:, None] * stride_out_slot + offs_n[None, :]
    out_mask = slot_used[:, None] & (offs_n[None, :] < N)

    if expert >= experts:
        # Slots with an out-of-range expert id, or a block past the used ones (nothing stored).
        tl.store(out_ptrs, tl.full((BLOCK_M, BLOCK_N), float("nan"), tl.float32), mask=out_mask)
        return

    offs_k = tl.arange(0, BLOCK_K)
    # Wrapping the N offsets keeps the weight loads in bounds without a mask; the extra
    # columns are dropped at the store.
    offs_w_n = offs_n % N
    row = (slot // slots_per_row).to(tl.int64)
    x_ptrs = x_ptr + row[:, None] * stride_x_row + offs_k[None, :] * stride_x_k
    w_ptrs = (
        w_ptr
        + expert.to(tl.int64) * stride_w_expert
        + offs_w_n[None, :].to(tl.int64) * stride_w_n
        + offs_k[:, None] * stride_w_k
    )

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K is a compile-time constant (a model has two or three widths): the loop's trip count is
    # known, and Triton's interpreter cannot loop to a runtime bound under numpy 2.4.
    for k_start in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=slot_used[:, None], other=0.0)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k_start
            a = tl.load(x_ptrs, mask=slot_used[:, None] & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a = a.to(tl.bfloat16)
        if DOT_IN_FP32:
            # bf16-valued operands: fp32 products are exact, so the sums are the bf16 dot's.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_x_k
        w_ptrs += BLOCK_K * stride_w_k

    tl.store(out_ptrs, acc, mask=out_mask)


def _require_runnable_device(device: torch.device) -> None:
    if device.type != "cuda" and not _INTERPRETED:
        raise Qwen35Error(
            f"grouped expert matmul runs on a CUDA device (or in Triton's interpreter with "
            f"TRITON_INTERPRET=1), not on {device}"
        )


def grouped_expert_matmul(
    x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, tiles: TileConfig | None = None
) -> torch.Tensor:
    """out[s] = x[s // (S // R)] @ weights[expert_ids[s]].T as [S, N] float32, in one Triton launch.

    x [R, K] float32 or bfloat16 (float32 is rounded to bfloat16), weights [E, N, K] bfloat16,
    expert_ids [S] integers on the same device, S a multiple of R. `tiles` overrides
    `pick_tiles` (for tests and tuning).
    """
    rows, slots, experts, out_features = _check_inputs(x, weights, expert_ids)
    in_features = x.shape[1]
    out = torch.empty(slots, out_features, dtype=torch.float32, device=x.device)
    if slots == 0 or out_features == 0:
        return out
    if in_features == 0:
        # Empty sums; ids can only be checked on the device, so out-of-range ones are not marked here.
        return out.zero_()
    _require_runnable_device(x.device)
    tiles = tiles or pick_tiles(slots, experts)
    if x.dtype == torch.float32 and (_INTERPRETED or tiles.block_m > _DECODE_TILES.block_m):
        # Each input row is read once per N tile and per slot: with many slots per expert,
        # reading float32 made the product ~20% slower (H200, 4096 tokens) than rounding once here.
        x = x.to(torch.bfloat16)
    sorted_slots, group_counts = _sorted_slot_layout(expert_ids, experts, tiles.block_m)
    num_blocks = sorted_slots.shape[0] // tiles.block_m
    grid = (num_blocks * triton.cdiv(out_features, tiles.block_n),)
    _grouped_expert_matmul_kernel[grid](
        x,
        weights,
        out,
        sorted_slots,
        group_counts,
        num_blocks,
        experts,
        slots,
        slots // rows,
        out_features,
        x.stride(0),
        x.stride(1),
        weights.stride(0),
        weights.stride(1),
        weights.stride(2),
        out.stride(0),
        K=in_features,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        GROUPS=group_counts.shape[0],
        EVEN_K=in_features % tiles.block_k == 0,
        DOT_IN_FP32=_INTERPRETED,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )
    return out


def benchmark(
    tokens: int = 4096,
    k: int = 8,
    experts: int = 256,
    n: int = 1024,
    kk: int = 2048,
    device: str = "cuda",
    tiles: TileConfig | None = None,
) -> dict:
    """Median time of one grouped_expert_matmul on random bf16 data (k distinct experts per token).

    Returns the shape, the milliseconds, TFLOP/s (2 S N K flops) and the GB/s of weights and
    activations the call must at least move (each used expert's weights once, x once, out once).
    """
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, kk, device=device, dtype=torch.bfloat16, generator=generator)
    weights = (torch.randn(experts, n, kk, device=device, generator=generator) * kk**-0.5).to(torch.bfloat16)
    scores = torch.rand(tokens, experts, device=device, generator=generator)
    expert_ids = scores.topk(k, dim=1).indices.reshape(-1).to(torch.int32)
    used_experts = int(torch.unique(expert_ids).numel())
    milliseconds = triton.testing.do_bench(
        lambda: grouped_expert_matmul(x, weights, expert_ids, tiles=tiles), return_mode="median"
    )
    slots = tokens * k
    flops = 2.0 * slots * n * kk
    min_bytes = used_experts * n * kk * 2 + tokens * kk * 2 + slots * n * 4
    return {
        "tokens": tokens,
        "k": k,
        "experts": experts,
        "n": n,
        "kk": kk,
        "tiles": tiles or pick_tiles(slots, experts),
        "ms": milliseconds,
        "tflops": flops / (milliseconds * 1e-3) / 1e12,
        "min_gb_per_s": min_bytes / (milliseconds * 1e-3) / 1e9,
    }
