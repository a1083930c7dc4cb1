"""The matrix-vector product (GEMV) straight from GGUF quantized blocks: its kernel, the steps it
folds into its launch, its launch shapes and the launch itself. The public calls, `triton_gguf.gemv`
and `triton_gguf.expert_gemv`, check their arguments and then call `launch_gemv` here.

The GEMV kernels are written for memory-bound decode on the GPU, where the instructions
spent per weight, not the bytes, are what limit a kernel like this: codes become floats
by an exponent trick instead of integer conversions, with one row of x the products
accumulate element-wise and are reduced once at the end (offsets contribute -b * sum(x)
per group), and a program covers 32 or 64 rows so that each thread reuses its x values.
Many programs run over output rows, with split-K when the matrix is too skinny to fill the
machine. Accumulation is fp32.

A decode step is bound by its launches as much as by its bytes, so one launch does what
would otherwise take several, with the "last program to arrive" pattern (triton_arrivals.py):
split-K (the last split of a tile adds the partials in split order, so results are
deterministic), the MoE's combining of a token's expert slots, and the residual add with the
next RMS norm after an output projection. Besides:
a second weight of another block type on the same x (PAIR), and an MLP's SwiGLU read
inside the down product (SWIGLU). Nothing syncs with the host (expert ids are read inside
the kernel), so the calls can be captured in CUDA graphs.

The launch shapes (GEMV_CONFIG, GEMV_BLOCK_N, PROGRAMS_PER_PROCESSOR) are globals of this module,
read at every launch, so that a benchmark can assign others here (benchmarks/gpu_bench.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from qwen35.kernels.triton_arrivals import arrival_counters, last_to_arrive, reset_count
from qwen35.kernels.triton_gguf_blocks import (
    HAS_MIN_TYPES, STEP, STEP_ELEMENTS, aligned, check_blocks, fetch_q6_k, load_step, part_elements, q6_k_quarter,
)
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel

# ---------------------------------------------------------------- kernel


@triton.jit
def _load_x(x_rows, mi, col, n_x_rows, in_features, SWIGLU: tl.constexpr):
    """Row mi of x at columns col; with SWIGLU, x's rows are [gate | up] and x = silu(gate) * up."""
    mask = (mi < n_x_rows) & (col < in_features)
    if SWIGLU:
        row = x_rows + mi * 2 * in_features
        gate = tl.load(row + col, mask=mask, other=0.0)
        up = tl.load(row + in_features + col, mask=mask, other=0.0)
        return gate / (1.0 + tl.exp(-gate)) * up  # triton_decode.silu_mul's form
    return tl.load(x_rows + mi * in_features + col, mask=mask, other=0.0)


@triton.jit
def _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col, n_x_rows, in_features, which_m,
                G: tl.constexpr, L: tl.constexpr, P: tl.constexpr, HAS_MIN: tl.constexpr, BLOCK_M: tl.constexpr,
                SWIGLU: tl.constexpr):
    """Adds one part's products with every row of x (weights stay in registers for all rows)."""
    for mi in tl.static_range(BLOCK_M):
        # x is loaded as a contiguous [G, L] tile, split into its P planes [G, L / P] and broadcast
        # over the rows: of lower rank, the planes take the weight tile's layout (a small
        # conversion), never the reverse.
        x = _load_x(x_rows, mi, col, n_x_rows, in_features, SWIGLU)
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
def _sum_splits(acc, partial_ptr, out_ptr, counter_ptr, tile, split, offsets, ok, plane, SPLITS: tl.constexpr):
    """Split-K without a second launch: every split stores its partial sums and counts itself in;
    the last to arrive adds the partials in split order (the same sum whichever program is last)
    and writes the output, then sets the count back to 0 for the next call."""
    tl.store(partial_ptr + split * plane + offsets, acc, mask=ok)
    last = last_to_arrive(counter_ptr + tile, SPLITS)
    if last:
        total = tl.zeros_like(acc)
        for s in range(SPLITS):
            # .cg: from L2, where the other programs' stores are, never a stale L1 line.
            total += tl.load(partial_ptr + s * plane + offsets, mask=ok, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + offsets, total, mask=ok)
        reset_count(counter_ptr + tile)
    return last  # whether this program finished the tile


_ROW_BLOCK = tl.constexpr(512)  # columns a finishing program (combine, add and norm) takes at a time


@triton.jit
def _add_rms_norm_row(source_ptr, residual_ptr, norm_weight_ptr, total_ptr, normed_ptr, width, eps,
                      STEPS: tl.constexpr, BLOCK_C: tl.constexpr):
    """total = source + residual and normed = total * rsqrt(mean(total^2) + eps) * weight over one row
    (triton_decode.add_rms_norm's maths, in chunks: one program does it after the row's product)."""
    squares = tl.zeros([BLOCK_C], dtype=tl.float32)
    for step in range(STEPS):
        columns = step * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = columns < width
        total = (tl.load(source_ptr + columns, mask=mask, other=0.0, cache_modifier=".cg")
                 + tl.load(residual_ptr + columns, mask=mask, other=0.0))
        tl.store(total_ptr + columns, total, mask=mask)
        squares += total * total
    scale = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / width + eps)
    for step in range(STEPS):  # each thread reads back the columns it wrote
        columns = step * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = columns < width
        total = tl.load(total_ptr + columns, mask=mask, other=0.0)
        weight = tl.load(norm_weight_ptr + columns, mask=mask, other=0.0)
        tl.store(normed_ptr + columns, total * scale * weight, mask=mask)


@triton.jit
def _finish_tile(out_ptr, combined_ptr, slot_weights_ptr, counter_ptr, residual_ptr, norm_weight_ptr, total_ptr,
                 normed_ptr, eps, slot, n_out, n_x_rows, BLOCK_M: tl.constexpr, COMBINE: tl.constexpr,
                 SLOTS_PER_TOKEN: tl.constexpr, ADD_NORM: tl.constexpr, WIDTH_STEPS: tl.constexpr):
    """After a program has finished its output tile. COMBINE: it counts in for its token, and the token's
    last tile writes the weighted sum of the token's slots, sum_s weight[s] * out[s] (triton_decode.
    moe_combine's loop without its launch). ADD_NORM: the last tile of a row (of a token, with COMBINE)
    then adds the residual and applies the next RMS norm (no launch for add_rms_norm either).
    counter_ptr: this launch's row counts (after split-K's tile counts, where there are those)."""
    tiles = tl.num_programs(0) * tl.num_programs(2)
    if COMBINE:
        token = (slot // SLOTS_PER_TOKEN).to(tl.int64)
        counter = counter_ptr + token
        if last_to_arrive(counter, tl.num_programs(0) * SLOTS_PER_TOKEN):
            first_slot = token * SLOTS_PER_TOKEN
            for step in range(WIDTH_STEPS):
                columns = step * _ROW_BLOCK + tl.arange(0, _ROW_BLOCK)
                total = tl.zeros([_ROW_BLOCK], dtype=tl.float32)
                for s in range(SLOTS_PER_TOKEN):
                    weight = tl.load(slot_weights_ptr + first_slot + s)
                    total += weight * tl.load(out_ptr + (first_slot + s) * n_out + columns, mask=columns < n_out,
                                              other=0.0, cache_modifier=".cg")
                tl.store(combined_ptr + token * n_out + columns, total, mask=columns < n_out)
            if ADD_NORM:
                _add_rms_norm_row(combined_ptr + token * n_out, residual_ptr + token * n_out, norm_weight_ptr,
                                  total_ptr + token * n_out, normed_ptr + token * n_out, n_out, eps, WIDTH_STEPS,
                                  _ROW_BLOCK)
            reset_count(counter)
    elif ADD_NORM:  # one count for the launch: every row of x is in every tile
        if last_to_arrive(counter_ptr, tiles):
            for m in tl.static_range(BLOCK_M):
                if m < n_x_rows:
                    _add_rms_norm_row(out_ptr + m * n_out, residual_ptr + m * n_out, norm_weight_ptr,
                                      total_ptr + m * n_out, normed_ptr + m * n_out, n_out, eps, WIDTH_STEPS,
                                      _ROW_BLOCK)
            reset_count(counter_ptr)


@triton.jit
def _gemv_tile(
    w_ptr, x_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr, combined_ptr, slot_weights_ptr,
    residual_ptr, norm_weight_ptr, total_ptr, normed_ptr, eps, pid_n, tile,
    n_out, out_width, out_column, in_features, n_blocks, row_bytes, expert_bytes, n_experts, n_x_rows, slots_per_x,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDS: tl.constexpr, STEPS: tl.constexpr,
    SPLITS: tl.constexpr, SWIGLU: tl.constexpr, NUM_STAGES: tl.constexpr,
    COMBINE: tl.constexpr, SLOTS_PER_TOKEN: tl.constexpr, ADD_NORM: tl.constexpr, WIDTH_STEPS: tl.constexpr,
):
    """Output rows pid_n * BLOCK_N.. of one weight (or, with ids, one slot's), written at columns
    out_column.. of out's rows of out_width: this split's share of x[m] . W[n], the whole sum once
    the last split is in. COMBINE (with ids): also combined[t] = sum over token t's slots of weight * out."""
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
    x_rows = x_ptr + x_first.to(tl.int64) * (2 * in_features if SWIGLU else in_features)
    element = part_elements(QTYPE, G, L)
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
        col = step * STEP + element
        if QTYPE == 14:
            low_a, low_b, high, d, block, mask = fetch_q6_k(rows, step, n_blocks, row_ok, G, L)
            for quarter in tl.static_range(4):
                q0, q1, q2, q3, scale, offset = q6_k_quarter(low_a, low_b, high, d, block, mask, quarter, G)
                acc, acc_min = _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col + 32 * quarter,
                                           n_x_rows, in_features, which_m, G, L, P, HAS_MIN, BLOCK_M, SWIGLU)
        else:
            q0, q1, q2, q3, scale, offset = load_step(rows, step, n_blocks, row_ok, QTYPE, G, L)
            acc, acc_min = _accumulate(acc, acc_min, q0, q1, q2, q3, scale, offset, x_rows, col,
                                       n_x_rows, in_features, which_m, G, L, P, HAS_MIN, BLOCK_M, SWIGLU)
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
    offsets = out_m.to(tl.int64) * out_width + out_column + out_n
    ok = (tl.arange(0, BLOCK_M)[:, None] < n_x_rows) & (out_n < n_out)
    if SPLITS == 1:
        tl.store(out_ptr + offsets, acc, mask=ok)
        if COMBINE or ADD_NORM:
            _finish_tile(out_ptr, combined_ptr, slot_weights_ptr, counter_ptr, residual_ptr, norm_weight_ptr,
                         total_ptr, normed_ptr, eps, slot, n_out, n_x_rows, BLOCK_M, COMBINE, SLOTS_PER_TOKEN,
                         ADD_NORM, WIDTH_STEPS)  # no split-K counts: the row counts start at 0
    else:
        if _sum_splits(acc, partial_ptr, out_ptr, counter_ptr, tile, split, offsets, ok,
                       out_rows.to(tl.int64) * out_width, SPLITS):
            if COMBINE or ADD_NORM:
                _finish_tile(out_ptr, combined_ptr, slot_weights_ptr,
                             counter_ptr + tl.num_programs(0) * tl.num_programs(2), residual_ptr, norm_weight_ptr,
                             total_ptr, normed_ptr, eps, slot, n_out, n_x_rows, BLOCK_M, COMBINE, SLOTS_PER_TOKEN,
                             ADD_NORM, WIDTH_STEPS)


@triton.jit
def _gemv_kernel(
    w_ptr, w2_ptr, x_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr, combined_ptr, slot_weights_ptr,
    residual_ptr, norm_weight_ptr, total_ptr, normed_ptr, eps, n_out, n_out2, in_features, n_blocks, n_blocks2, row_bytes, row_bytes2, expert_bytes, n_experts, n_x_rows,
    slots_per_x,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    NUM_STAGES: tl.constexpr, QTYPE2: tl.constexpr, HAS_MIN2: tl.constexpr, G2: tl.constexpr, L2: tl.constexpr,
    P2: tl.constexpr, NUM_STAGES2: tl.constexpr, PAIR: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, HAS_IDS: tl.constexpr, STEPS: tl.constexpr,
    SPLITS: tl.constexpr, SWIGLU: tl.constexpr,
    COMBINE: tl.constexpr, SLOTS_PER_TOKEN: tl.constexpr, ADD_NORM: tl.constexpr, WIDTH_STEPS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """out[m, n] = x[m] . W[n] (or, with ids, one slot per program), over SPLITS programs along K. With
    PAIR, a second weight of another block type (w2, n_out2 rows) on the same x: its rows are the
    programs after the first's, its outputs the columns after the first's (two products, one launch)."""
    wait_for_previous_kernel(USE_PDL)
    pid_n = tl.program_id(0)
    tile = tl.program_id(2) * tl.num_programs(0) + pid_n
    first_programs = tl.cdiv(n_out, BLOCK_N)
    if PAIR and pid_n >= first_programs:
        _gemv_tile(w2_ptr, x_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr, combined_ptr, slot_weights_ptr,
                   residual_ptr, norm_weight_ptr, total_ptr, normed_ptr, eps, pid_n - first_programs, tile, n_out2, n_out + n_out2, n_out, in_features, n_blocks2, row_bytes2,
                   expert_bytes, n_experts, n_x_rows, slots_per_x, QTYPE2, HAS_MIN2, G2, L2, P2, BLOCK_N, BLOCK_M,
                   HAS_IDS, STEPS, SPLITS, SWIGLU, NUM_STAGES2, COMBINE, SLOTS_PER_TOKEN, ADD_NORM, WIDTH_STEPS)
    else:
        _gemv_tile(w_ptr, x_ptr, out_ptr, partial_ptr, counter_ptr, ids_ptr, combined_ptr, slot_weights_ptr,
                   residual_ptr, norm_weight_ptr, total_ptr, normed_ptr, eps, pid_n, tile, n_out, n_out + n_out2, 0, in_features, n_blocks, row_bytes,
                   expert_bytes, n_experts, n_x_rows, slots_per_x, QTYPE, HAS_MIN, G, L, P, BLOCK_N, BLOCK_M,
                   HAS_IDS, STEPS, SPLITS, SWIGLU, NUM_STAGES, COMBINE, SLOTS_PER_TOKEN, ADD_NORM, WIDTH_STEPS)


# ---------------------------------------------------------------- launch


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


def launch_gemv(blocks, type_id, x, in_features, n_out, slots, expert_ids, n_experts, expert_bytes, block_m,
                n_x_rows, swiglu, slot_weights=None, second=None, add_norm=None):
    """One launch of _gemv_kernel, over arguments that triton_gguf.gemv or expert_gemv has checked; `second`:
    (blocks, type id) of a pair's second weight [n_out2, row_bytes2]; `add_norm`: (residual, norm weight, eps),
    and then (result + residual, its RMS norm) is returned."""
    n_blocks, row_bytes, (groups, length, planes) = check_blocks(blocks, type_id, in_features, 2, 3)
    types = [int(type_id)] + ([int(second[1])] if second is not None else [])
    if block_m == 1:
        configs = [GEMV_CONFIG[T(t)] for t in types]
        # A pair shares its programs' shape: the smaller row tile, the larger warp count; stages are per type.
        block_n, num_warps, num_stages = min(c[0] for c in configs), max(c[1] for c in configs), configs[0][2]
        second_stages = configs[-1][2]
    else:
        block_n, num_warps, num_stages, second_stages = GEMV_BLOCK_N[block_m], 4, 1, 1
    if second is not None:
        second_blocks, second_type = second
        n_blocks2, row_bytes2, (groups2, length2, planes2) = check_blocks(second_blocks, second_type, in_features, 2, 2)
        n_out2 = second_blocks.shape[0]
        second_blocks = aligned(second_blocks, second_type)
    else:
        second_blocks, n_out2, n_blocks2, row_bytes2, (groups2, length2, planes2) = blocks, 0, 1, 1, (1, 1, 1)
    width = n_out + n_out2
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    row_programs = triton.cdiv(n_out, block_n) + triton.cdiv(n_out2, block_n)
    splits, steps_per_split = _plan(row_programs * block_n, n_steps, slots, block_n, blocks.device)
    out_rows = slots if expert_ids is not None else n_x_rows
    out = torch.empty((out_rows, width), dtype=torch.float32, device=blocks.device)
    grid = (row_programs, splits, slots)
    partial = (torch.empty((splits, out_rows, width), dtype=torch.float32, device=blocks.device)
               if splits > 1 else out)
    # Split-K's tile counts (tiles < 4 x processors when split), then the finished rows' counts.
    tokens = slot_weights.shape[0] if slot_weights is not None else 0
    finished = tokens or (1 if add_norm is not None else 0)
    split_counts = grid[0] * slots if splits > 1 else 0
    counters = arrival_counters(blocks.device, split_counts + finished) if split_counts or finished else out
    combined = torch.empty((tokens, width), dtype=torch.float32, device=blocks.device) if tokens else out
    if add_norm is not None:
        residual, norm_weight, eps = add_norm
        total, normed = torch.empty_like(residual), torch.empty_like(residual)
    else:
        residual = norm_weight = total = normed = out
        eps = 0.0
    _gemv_kernel[grid](
        aligned(blocks, type_id), second_blocks, x, out, partial, counters,
        expert_ids if expert_ids is not None else x, combined, slot_weights if tokens else out,
        residual, norm_weight, total, normed, float(eps), n_out, n_out2, in_features, n_blocks, n_blocks2, row_bytes, row_bytes2, expert_bytes, n_experts, n_x_rows,
        max(slots // max(x.shape[0], 1), 1),
        QTYPE=types[0], HAS_MIN=types[0] in HAS_MIN_TYPES, G=groups, L=length, P=planes, NUM_STAGES=num_stages,
        QTYPE2=types[-1], HAS_MIN2=types[-1] in HAS_MIN_TYPES, G2=groups2, L2=length2, P2=planes2,
        NUM_STAGES2=second_stages, PAIR=second is not None,
        BLOCK_N=block_n, BLOCK_M=block_m, HAS_IDS=expert_ids is not None, STEPS=steps_per_split, SPLITS=splits,
        SWIGLU=swiglu, COMBINE=bool(tokens), SLOTS_PER_TOKEN=slot_weights.shape[1] if tokens else 1,
        ADD_NORM=add_norm is not None, WIDTH_STEPS=triton.cdiv(width, _ROW_BLOCK.value) if finished else 1,
        num_warps=num_warps,
        **pdl_options(x.device),
    )
    if add_norm is not None:
        return total, normed
    return combined if tokens else out

