"""The gated full-attention decode step on the GPU, in Triton: the twin of csrc/attention_decode.cpp.

`attention_decode_` runs everything of Attention.__call__ between qkv_proj and o_proj for one new
token per row: q/k RMS norms per head, partial rotate-half RoPE, the K/V cache write at each row's
own slot, single-query GQA attention and the sigmoid output gate. One launch (flash-decoding):

One program per (row, kv head, split). It norms and rotates the query heads of its kv head's group
(held together: each K/V tile it loads serves all of them) and the new K, and runs an online
softmax over its share of the row's cached slots, in tiles of BLOCK_N slots. Each row's slots
0..starts[b]-1 are cut into `splits` even ranges by the row's own length, read from `starts` on
the device. The new token itself is never read back from the cache: split 0 starts its softmax
with it (K and V rounded to the storage's type, as the reference reads them back) and writes it to
slot starts[b], which no program reads, so the write races with nothing. With a single split the
program gates its output itself. Otherwise each split stores its partial softmax (maxima, sums,
weighted V rows) and counts itself in on its (row, kv head)'s arrival counter; the last split to
arrive merges the group's pieces in split order (the same bits whichever split is last), applies
sigmoid(gate) and sets the counter back to 0 for the next call (no second launch for the merge).

Nothing waits on the host, so a decode step can be captured in a CUDA graph: the split count
depends only on the kv heads, the storage's capacity and the GPU's SM count (not on the batch: a
row's result is the same bits whatever shares its batch), and the rows' lengths may change from
replay to replay. Everything is computed in fp32 (products of ~fp32 accuracy on the tensor cores).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from qwen35.errors import Qwen35Error
from qwen35.kernels.triton_arrivals import arrival_counters, last_to_arrive, reset_count
from qwen35.kernels.triton_checks import INPUT_DTYPES, INTERPRETED, check_device, require
from qwen35.kernels.triton_kv_blocks import FLOAT, load_tile
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel

# Set (by tests/conftest.py) where there is no GPU: the kernels then run on CPU tensors.
_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOG2_E = 1.4426950408889634
# Untuned first choices: no GPU was at hand when this was written, only Triton's compiler for sm_90
# (ptxas' register counts, head_dim 256, group 8); benchmark() sweeps them on a GPU.
# Slots per tile: at 8 warps a bf16 cache's program holds 128 registers a thread, no spills, and
# 93 KB of shared memory (its K/V loads pipelined): two programs an SM on an H100. tf32x3 products
# (other caches) need ~250 registers and spill at 32 slots: 16 for them.
_BLOCK_N = {"split_bf16": 32, "tf32x3": 16, "ieee": 16}
# tl.dot needs 16 rows at least: a group of 8 query heads is padded to 16.
_MIN_DOT_ROWS = 16
# How the tiles' products run (the reference's are fp32; plain tf32 or bf16 would cost ~1e-3 relative).
# A bf16 cache: "split_bf16", the fp32 side as three bf16 parts on the tensor cores, K and V as they
# are stored. Other caches: "tf32x3" (tensor cores, ~fp32 accuracy: 254 registers, no spills).
# "ieee" (fp32 FMAs) spilled ~2.8 KB a thread.
_DOT_MODES = ("split_bf16", "tf32x3", "ieee")
# Splits: enough (kv head, split) programs of one row for ~2 waves of the GPU's SMs, but each split
# at least this many slots of a full cache (shorter ones cost more in the merge than they save).
# Splits past a short row's length load no tile; a large batch's long rows pay for the merge's
# partial results (~6% of the K/V bytes at 64 rows of 4096 tokens, 16 heads of 256).
_MIN_SPLIT_SLOTS = 128
_MAX_SPLITS = 64
_WAVES = 2
# Splits whose pieces the merging program has in flight at once (8 keeps the kernel at the main loop's
# 128 registers a thread for a bf16 cache).
_MERGE_UNROLL = 8
# The interpreter has no SMs; this many makes the tests' calls split their rows.
INTERPRETED_SM_COUNT = 4


@triton.jit
def _norm_rotate(rows_at, row_mask, weight_ptr, cols, partner, col_mask, cos, sign_sin, D: tl.constexpr, eps):
    # Rows [R, D] at rows_at[:, None] + column: x * rsqrt(mean(x^2) + eps) * weight, then the rotate-half
    # RoPE: x*cos + rotate_half(x)*sin, with rotate_half(x)[i] = -x[i + half] (i < half) or x[i - half].
    # Columns past rotary_dim have cos 1 and sin 0: they pass unchanged.
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(rows_at[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(rows_at[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    weight_partner = tl.load(weight_ptr + partner, mask=col_mask, other=0.0).to(tl.float32)
    normed = x * inverse_rms[:, None] * weight[None, :]
    normed_partner = x_partner * inverse_rms[:, None] * weight_partner[None, :]
    return normed * cos[None, :] + normed_partner * sign_sin[None, :]


@triton.jit
def _to_storage(x, storage_type: tl.constexpr, BF16_STORAGE: tl.constexpr):
    # fp32 -> the storage's type, rounded to nearest even as torch's .to() rounds. bf16 in integers:
    # the interpreter's cast to bf16 truncates (the GPU's rounds), so both take this path.
    if BF16_STORAGE:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)  # NaN stays NaN, as torch's
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(storage_type)


@triton.jit
def _split_bf16(x):
    # fp32 x as high + mid + low bf16 parts: 24 significant bits, x to fp32's accuracy. Each residual
    # is exact in fp32, however the conversions round (the interpreter's truncate).
    high = x.to(tl.bfloat16)
    rest = x - high.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    low = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return high, mid, low


@triton.jit
def _dot(a_high, a_mid, a_low, b, DOT_MODE: tl.constexpr, INTERPRETED: tl.constexpr):
    # a (fp32) @ b (the storage's type) in fp32. "split_bf16" (bf16 storage: b is exact in bf16): a's
    # three bf16 parts times b on the tensor cores, smallest first, each product exact, summed in fp32.
    # Otherwise a_high is a itself and tl.dot runs with that input precision.
    if DOT_MODE == "split_bf16":
        if INTERPRETED:  # its dot would multiply bf16 values' raw bits: the same products in fp32
            b = b.to(tl.float32)
            out = tl.dot(a_low.to(tl.float32), b)
            out = tl.dot(a_mid.to(tl.float32), b, acc=out)
            out = tl.dot(a_high.to(tl.float32), b, acc=out)
        else:
            out = tl.dot(a_low, b)
            out = tl.dot(a_mid, b, acc=out)
            out = tl.dot(a_high, b, acc=out)
    else:
        out = tl.dot(a_high, b.to(tl.float32), input_precision=DOT_MODE)
    return out


@triton.jit
def _load_tile(at, positions, slot_stride, cols, tile_mask, TYPE: tl.constexpr):
    # A tile [slots, cols] of K or V: as stored (a float pool), or GGUF blocks as float32 (triton_kv_blocks).
    if TYPE == FLOAT:
        return tl.load(at + positions.to(tl.int64)[:, None] * slot_stride + cols[None, :], mask=tile_mask, other=0.0)
    else:
        return load_tile(at, positions * slot_stride, cols, tile_mask, TYPE)  # within one page: int32


@triton.jit
def _attend_tile(q_high, q_mid, q_low, maximum, total, acc, keys_at, values_at, key_stride, value_stride, first, end,
                 slots, cols, col_mask, DOT_MODE: tl.constexpr, INTERPRETED: tl.constexpr, KEY_TYPE: tl.constexpr,
                 VALUE_TYPE: tl.constexpr):
    # One tile of slots first .. first + BLOCK_N - 1 (those below `end`) into the online softmax, in
    # base 2 (q carries scale * log2(e)). A tile may hold no slot at all (the interpreter's loop runs
    # past `end`): then it changes nothing, and no -inf - -inf is ever taken.
    positions = first + slots
    slot_mask = positions < end
    tile_mask = slot_mask[:, None] & col_mask[None, :]
    k = _load_tile(keys_at, positions, key_stride, cols, tile_mask, KEY_TYPE)
    scores = _dot(q_high, q_mid, q_low, tl.trans(k), DOT_MODE, INTERPRETED)  # [BLOCK_G, BLOCK_N]
    scores = tl.where(slot_mask[None, :], scores, float("-inf"))
    new_maximum = tl.maximum(maximum, tl.max(scores, axis=1))
    shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
    rescale = tl.exp2(maximum - shift)
    weights = tl.exp2(scores - shift[:, None])
    if DOT_MODE == "split_bf16":
        w_high, w_mid, w_low = _split_bf16(weights)
    else:
        w_high, w_mid, w_low = weights, weights, weights
    v = _load_tile(values_at, positions, value_stride, cols, tile_mask, VALUE_TYPE)
    acc = acc * rescale[:, None] + _dot(w_high, w_mid, w_low, v, DOT_MODE, INTERPRETED)
    return new_maximum, total * rescale + tl.sum(weights, axis=1), acc


@triton.jit
def _new_token_values(q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_gate_s0, k_s0, v_s0,
                      cos_s0, sin_s0, row64, kv_head, eps, qk_scale, GROUP: tl.constexpr, D: tl.constexpr,
                      ROTARY: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The group's query heads [BLOCK_G, BLOCK_D] (normed, rotated, scaled; padding rows zeros) and the
    new token's K [1, BLOCK_D] (normed, rotated) and V [BLOCK_D], float32."""
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    half: tl.constexpr = ROTARY // 2
    rotary_mask = cols < ROTARY
    partner = tl.where(cols < half, cols + half, tl.where(rotary_mask, cols - half, cols))
    cos = tl.load(cos_ptr + row64 * cos_s0 + cols, mask=rotary_mask, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + row64 * sin_s0 + cols, mask=rotary_mask, other=0.0).to(tl.float32)
    sign_sin = tl.where(cols < half, -sin, sin)

    group_rows = tl.arange(0, BLOCK_G)
    group_mask = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    q_at = q_gate_ptr + row64 * q_gate_s0 + heads * (2 * D)
    q = _norm_rotate(q_at, group_mask, q_norm_ptr, cols, partner, col_mask, cos, sign_sin, D, eps) * qk_scale
    one_row = tl.arange(0, 1)
    k_at = k_ptr + row64 * k_s0 + kv_head * D + one_row
    k_new = _norm_rotate(k_at, one_row < 1, k_norm_ptr, cols, partner, col_mask, cos, sign_sin, D, eps)
    v_new = tl.load(v_ptr + row64 * v_s0 + kv_head * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    return cols, col_mask, group_mask, heads, q, k_new, v_new


@triton.jit
def _new_token(q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, q_gate_s0, k_s0, v_s0,
               cos_s0, sin_s0, row64, kv_head, eps, qk_scale, GROUP: tl.constexpr, D: tl.constexpr,
               ROTARY: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BF16_STORAGE: tl.constexpr):
    """`_new_token_values`, K and V as a float storage keeps them."""
    cols, col_mask, group_mask, heads, q, k_new, v_new = _new_token_values(
        q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_gate_s0, k_s0, v_s0, cos_s0, sin_s0,
        row64, kv_head, eps, qk_scale, GROUP, D, ROTARY, BLOCK_G, BLOCK_D)
    storage_type: tl.constexpr = keys_ptr.dtype.element_ty
    k_stored = _to_storage(k_new, storage_type, BF16_STORAGE)  # [1, BLOCK_D]
    v_stored = _to_storage(v_new, storage_type, BF16_STORAGE)
    return cols, col_mask, group_mask, heads, q, k_stored, v_stored


@triton.jit
def _softmax_start(q, k_stored, v_stored, owns_new_token, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Split 0's softmax begins with the new token, the others' with nothing: (maximum, total, acc)."""
    new_score = tl.sum(q * k_stored.to(tl.float32), axis=1)
    maximum = tl.where(owns_new_token, new_score, float("-inf"))
    total = tl.where(owns_new_token, 1.0, 0.0) + tl.zeros([BLOCK_G], tl.float32)
    acc = tl.where(owns_new_token, v_stored.to(tl.float32)[None, :], 0.0) + tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    return maximum, total, acc


@triton.jit
def _merge_some(acc, maximum, partial_acc_ptr, partial_max_ptr, first_piece, rows, rows_mask, first, cols, col_mask,
                D: tl.constexpr, GROUP: tl.constexpr, SPLITS: tl.constexpr, MERGE_UNROLL: tl.constexpr):
    # Splits first .. first + MERGE_UNROLL - 1 (those that exist) into acc [MERGE_G, BLOCK_D], one after
    # the other; their loads do not wait on acc, so the GPU has them all in flight at once. A split's
    # maxima are loaded as scalars (each thread the same words) and set into a column where the tile's
    # rows are: a vector of them would be laid out otherwise, and moved through shared memory.
    for step in tl.static_range(MERGE_UNROLL):
        split = first + step
        exists = split < SPLITS
        piece_max = tl.zeros_like(maximum)
        for head in tl.static_range(GROUP):
            at = partial_max_ptr + first_piece + head * SPLITS + split
            piece_max = tl.where(rows == head, tl.load(at, mask=exists, other=0.0, cache_modifier=".cg"), piece_max)
        pieces = first_piece + rows * SPLITS + split
        piece_acc = tl.load(partial_acc_ptr + pieces * D + cols[None, :], mask=(rows_mask & col_mask[None, :]) & exists,
                            other=0.0, cache_modifier=".cg")
        acc = tl.where(exists, acc + tl.exp2(piece_max - maximum) * piece_acc, acc)
    return acc


@triton.jit
def _merge_splits(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, q_gate_s0, row64, kv_head,
                  cols, col_mask, N_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, MERGE_G: tl.constexpr, MERGE_W: tl.constexpr,
                  MERGE_UNROLL: tl.constexpr, INTERPRETED: tl.constexpr):
    # Each of the group's query heads (a row of the tile, MERGE_G of them: no padding to the products'
    # 16): its splits' softmaxes as one (split 0 holds the new token, so the largest maximum is finite;
    # empty splits have maximum -inf and weigh 0), then the gate. The weighted V rows are summed in
    # split order, whichever split runs this. Loads are .cg: from L2, where the other programs' stores
    # are, never a stale L1 line.
    rows = tl.arange(0, MERGE_G)
    rows_mask = rows < GROUP
    heads = kv_head * GROUP + rows
    head_rows = row64 * (N_KV * GROUP) + heads
    first_piece = (row64 * N_KV + kv_head) * (GROUP * SPLITS)  # the group's first head's split 0
    splits = tl.arange(0, BLOCK_S)
    at = first_piece + rows[:, None] * SPLITS + splits[None, :]
    split_mask = rows_mask[:, None] & (splits < SPLITS)[None, :]
    maxima = tl.load(partial_max_ptr + at, mask=split_mask, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(partial_sum_ptr + at, mask=split_mask, other=0.0, cache_modifier=".cg")
    # The sum of the splits' weighted sums over one split a lane (the order the merge summed in when it
    # was a launch of its own).
    maximum = tl.where(rows_mask, tl.max(maxima, axis=1), 0.0)  # padding rows: no -inf - -inf
    total = tl.sum(tl.exp2(maxima - maximum[:, None]) * sums, axis=1)
    # The same largest maxima for the loop, from a load as wide as the tile, which takes the tile's
    # layout: with the narrow one's, each split's weights went through shared memory.
    wide = tl.arange(0, MERGE_W)
    wide_mask = rows_mask[:, None] & (wide < SPLITS)[None, :]
    wide_maxima = tl.load(partial_max_ptr + first_piece + rows[:, None] * SPLITS + wide[None, :], mask=wide_mask,
                          other=float("-inf"), cache_modifier=".cg")
    row_maximum = tl.where(rows_mask, tl.max(wide_maxima, axis=1), 0.0)[:, None]
    acc = tl.zeros([MERGE_G, BLOCK_D], tl.float32)
    if INTERPRETED:  # the interpreter's range() takes no bound but a constant
        for first in range(0, SPLITS, MERGE_UNROLL):
            acc = _merge_some(acc, row_maximum, partial_acc_ptr, partial_max_ptr, first_piece, rows[:, None],
                              rows_mask[:, None], first, cols, col_mask, D, GROUP, SPLITS, MERGE_UNROLL)
    else:  # to a bound ptxas does not know (SPLITS, the grid's): to SPLITS, it unrolled the loop whole (150
        # registers at 32 splits, one program an SM)
        for first in tl.range(0, tl.num_programs(1), MERGE_UNROLL):
            acc = _merge_some(acc, row_maximum, partial_acc_ptr, partial_max_ptr, first_piece, rows[:, None],
                              rows_mask[:, None], first, cols, col_mask, D, GROUP, SPLITS, MERGE_UNROLL)
    tile_mask = rows_mask[:, None] & col_mask[None, :]
    gate_at = q_gate_ptr + row64 * q_gate_s0 + heads[:, None] * (2 * D) + D + cols[None, :]
    gate = tl.load(gate_at, mask=tile_mask, other=0.0)
    out = acc / tl.where(rows_mask, total, 1.0)[:, None] * tl.sigmoid(gate.to(tl.float32))
    tl.store(out_ptr + head_rows[:, None] * D + cols[None, :], out, mask=tile_mask)


@triton.jit
def _row_start(starts_ptr, row64, starts_s0, capacity):
    """(start, whether it lies in the storage, slots cached before it, clamped to the storage). A start
    outside the storage (a caller's bug: checking it here would wait on the GPU) writes nothing and
    reads only the storage's slots."""
    start = tl.load(starts_ptr + row64 * starts_s0)
    return start, (start >= 0) & (start < capacity), tl.minimum(tl.maximum(start, 0), capacity).to(tl.int32)


@triton.jit
def _finish(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr, q_gate_s0, row64,
            unit, split, heads, group_mask, cols, col_mask, maximum, total, acc, N_KV: tl.constexpr,
            GROUP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_S: tl.constexpr, MERGE_G: tl.constexpr, MERGE_UNROLL: tl.constexpr, INTERPRETED: tl.constexpr):
    """One split: the gated output; or its partial softmax, and the (row, kv head)'s last split to
    arrive (counted at counter_ptr + unit) merges them all and sets the count back to 0."""
    head_rows = row64 * (N_KV * GROUP) + heads  # (row, query head) pairs
    tile_mask = group_mask[:, None] & col_mask[None, :]
    if SPLITS == 1:
        gate_at = q_gate_ptr + row64 * q_gate_s0 + heads[:, None] * (2 * D) + D + cols[None, :]
        gate = tl.load(gate_at, mask=tile_mask, other=0.0).to(tl.float32)
        out = acc / total[:, None] * tl.sigmoid(gate)
        tl.store(out_ptr + head_rows[:, None] * D + cols[None, :], out, mask=tile_mask)
    else:
        pieces = head_rows * SPLITS + split
        tl.store(partial_acc_ptr + pieces[:, None] * D + cols[None, :], acc, mask=tile_mask)
        tl.store(partial_max_ptr + pieces, maximum, mask=group_mask)
        tl.store(partial_sum_ptr + pieces, total, mask=group_mask)
        if last_to_arrive(counter_ptr + unit, SPLITS):
            _merge_splits(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, q_gate_s0, row64,
                          unit % N_KV, cols, col_mask, N_KV, GROUP, D, SPLITS, BLOCK_D, BLOCK_S, MERGE_G,
                          max(BLOCK_D, BLOCK_S), MERGE_UNROLL, INTERPRETED)
            reset_count(counter_ptr + unit)


@triton.jit
def _split_range(cached, split, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """This split's share of the cached slots 0 .. cached - 1, in whole tiles: (begin, end, tile slots)."""
    share = tl.cdiv(tl.cdiv(cached, SPLITS), BLOCK_N) * BLOCK_N
    begin = split * share
    end = tl.minimum(begin + share, cached)
    slots = tl.arange(0, BLOCK_N)
    return begin, end, slots


@triton.jit
def _query_parts(q, DOT_MODE: tl.constexpr):
    """q as the dot mode multiplies it: three bf16 parts for split_bf16, else q itself three times."""
    if DOT_MODE == "split_bf16":
        q_high, q_mid, q_low = _split_bf16(q)
    else:
        q_high, q_mid, q_low = q, q, q
    return q_high, q_mid, q_low


@triton.jit
def _attend_kernel(
    q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, starts_ptr,
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr,
    q_gate_s0, k_s0, v_s0, cos_s0, sin_s0, starts_s0, cache_s0, cache_s1, cache_s2,
    capacity, eps, qk_scale,
    N_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, ROTARY: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_G: tl.constexpr, MERGE_UNROLL: tl.constexpr, INTERPRETED_SPAN: tl.constexpr, DOT_MODE: tl.constexpr,
    BF16_STORAGE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    unit, split = tl.program_id(0), tl.program_id(1)
    row, kv_head = unit // N_KV, unit % N_KV
    row64 = row.to(tl.int64)
    start, start_in_range, cached = _row_start(starts_ptr, row64, starts_s0, capacity)

    cols, col_mask, group_mask, heads, q, k_stored, v_stored = _new_token(
        q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, q_gate_s0, k_s0, v_s0, cos_s0,
        sin_s0, row64, kv_head, eps, qk_scale, GROUP, D, ROTARY, BLOCK_G, BLOCK_D, BF16_STORAGE)
    row_at = row64 * cache_s0 + kv_head * cache_s2
    slot_at = row_at + start * cache_s1 + cols
    owns_new_token = split == 0
    tl.store(keys_ptr + slot_at[None, :], k_stored, mask=(col_mask & start_in_range & owns_new_token)[None, :])
    tl.store(values_ptr + slot_at, v_stored, mask=col_mask & start_in_range & owns_new_token)

    maximum, total, acc = _softmax_start(q, k_stored, v_stored, owns_new_token, BLOCK_G, BLOCK_D)

    # This split's share of the cached slots 0 .. start - 1, whole tiles of them.
    begin, end, slots = _split_range(cached, split, SPLITS, BLOCK_N)
    keys_at, values_at = keys_ptr + row_at, values_ptr + row_at
    q_high, q_mid, q_low = _query_parts(q, DOT_MODE)
    if INTERPRETED_SPAN == 0:
        for first in tl.range(begin, end, BLOCK_N):
            maximum, total, acc = _attend_tile(q_high, q_mid, q_low, maximum, total, acc, keys_at, values_at,
                                               cache_s1, cache_s1, first, end, slots, cols, col_mask, DOT_MODE, False,
                                               FLOAT, FLOAT)
    else:  # the interpreter's range() takes no loaded bound: the largest share, tiles past `end` masked
        for offset in range(0, INTERPRETED_SPAN, BLOCK_N):
            maximum, total, acc = _attend_tile(q_high, q_mid, q_low, maximum, total, acc, keys_at, values_at,
                                               cache_s1, cache_s1, begin + offset, end, slots, cols, col_mask,
                                               DOT_MODE, True, FLOAT, FLOAT)

    _finish(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr, q_gate_s0, row64,
            unit, split, heads, group_mask, cols, col_mask, maximum, total, acc, N_KV, GROUP, D, SPLITS, BLOCK_D,
            BLOCK_S, MERGE_G, MERGE_UNROLL, INTERPRETED_SPAN > 0)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETED_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(n_kv: int, capacity: int, sm_count: int) -> int:
    """Splits per (row, kv head): ~_WAVES waves of programs for one row, each split at least
    _MIN_SPLIT_SLOTS slots of a full cache, at most _MAX_SPLITS. From shapes only, so a captured graph
    keeps it; and not from the batch, so a row's result is the same bits whatever shares its batch."""
    wanted = math.ceil(_WAVES * sm_count / n_kv)
    return max(1, min(wanted, math.ceil(capacity / _MIN_SPLIT_SLOTS), _MAX_SPLITS))


def check_token_inputs(name, q_gate, k, v, q_norm, k_norm, cos, sin, starts, n_q, n_kv, head_dim) -> int:
    """The new token's inputs' shapes and dtypes (never the values: that would wait on the GPU); returns
    the batch."""
    require(
        n_q >= 1 and n_kv >= 1 and n_q % n_kv == 0 and head_dim >= 1,
        f"{name}: n_q ({n_q}) must be a positive multiple of n_kv ({n_kv}), and head_dim ({head_dim}) positive",
    )
    require(q_gate.dim() == 3, f"{name}: q_gate must be [B, 1, n_q * 2 * head_dim], got {tuple(q_gate.shape)}")
    batch = q_gate.shape[0]
    for tensor_name, tensor, width in (("q_gate", q_gate, 2 * n_q * head_dim), ("k", k, n_kv * head_dim),
                                       ("v", v, n_kv * head_dim)):
        require(
            tensor.shape == (batch, 1, width),
            f"{name}: {tensor_name} must be [{batch}, 1, {width}] (one token per row), got {tuple(tensor.shape)}",
        )
        require(tensor.stride(2) == 1, f"{name}: {tensor_name}'s last dimension must be contiguous")
    require(
        cos.dim() == 3 and cos.shape[:2] == (batch, 1) and cos.shape[2] % 2 == 0 and cos.shape[2] <= head_dim,
        f"{name}: cos must be [{batch}, 1, rotary_dim] with an even rotary_dim <= {head_dim}, got {tuple(cos.shape)}",
    )
    require(sin.shape == cos.shape, f"{name}: sin must be shaped like cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    for tensor_name, tensor in (("cos", cos), ("sin", sin)):
        require(tensor.stride(2) == 1 or tensor.shape[2] <= 1,
                 f"{name}: {tensor_name}'s last dimension must be contiguous")
    for tensor_name, tensor in (("q_norm", q_norm), ("k_norm", k_norm)):
        require(tensor.shape == (head_dim,), f"{name}: {tensor_name} must be [{head_dim}], got {tuple(tensor.shape)}")
    for tensor_name, tensor in (("q_gate", q_gate), ("k", k), ("v", v), ("q_norm", q_norm), ("k_norm", k_norm),
                                ("cos", cos), ("sin", sin)):
        require(tensor.dtype in INPUT_DTYPES,
                 f"{name}: {tensor_name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    require(
        starts.shape == (batch,) and starts.dtype == torch.int64,
        f"{name}: starts must be int64 [{batch}], got {starts.dtype} {tuple(starts.shape)}",
    )
    return batch


def _check_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, n_q, n_kv, head_dim):
    """Shapes, dtypes and devices (never the values: that would wait on the GPU); returns the device."""
    name = "attention_decode_"
    batch = check_token_inputs(name, q_gate, k, v, q_norm, k_norm, cos, sin, starts, n_q, n_kv, head_dim)
    require(
        keys.dtype in _STORAGE_DTYPES and values.dtype == keys.dtype,
        f"{name}: the K/V storage must be float32, bfloat16 or float16, both alike (got {keys.dtype}, {values.dtype})",
    )
    require(
        keys.dim() == 4 and keys.shape == values.shape and keys.stride() == values.stride()
        and keys.shape[0] >= batch and keys.shape[1] >= 1 and keys.shape[2:] == (n_kv, head_dim)
        and keys.stride(3) == 1,
        f"{name}: keys and values must be alike [rows >= {batch}, capacity >= 1, {n_kv}, {head_dim}] storage "
        f"with a contiguous last dimension, got {tuple(keys.shape)} and {tuple(values.shape)}",
    )
    return check_device(name, {"keys": keys, "values": values, "q_gate": q_gate, "k": k, "v": v, "q_norm": q_norm,
                                "k_norm": k_norm, "cos": cos, "sin": sin, "starts": starts})


def _attend_config(n_q, n_kv, head_dim, rotary_dim, storage_dtype, capacity, splits, block_n=None,
                   num_warps=None, dot_mode=None) -> dict:
    """The kernel's compile-time constants, num_warps included (the same for every call of those shapes:
    what a captured graph and an ahead-of-time compile see)."""
    block_d = max(_MIN_DOT_ROWS, triton.next_power_of_2(head_dim))
    if dot_mode is None:
        dot_mode = "split_bf16" if storage_dtype == torch.bfloat16 else "tf32x3"
    if dot_mode not in _DOT_MODES or (dot_mode == "split_bf16" and storage_dtype != torch.bfloat16):
        raise Qwen35Error(f"attention_decode_: no dot mode {dot_mode!r} for a {storage_dtype} cache")
    block_n = block_n or _BLOCK_N[dot_mode]
    attend = dict(
        N_KV=n_kv, GROUP=n_q // n_kv, D=head_dim, ROTARY=rotary_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        BLOCK_G=max(_MIN_DOT_ROWS, triton.next_power_of_2(n_q // n_kv)), SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), MERGE_G=triton.next_power_of_2(n_q // n_kv),
        MERGE_UNROLL=min(_MERGE_UNROLL, splits), DOT_MODE=dot_mode,
        # The interpreter's loop runs over the largest share a split can have, in whole tiles.
        INTERPRETED_SPAN=triton.cdiv(triton.cdiv(capacity, splits), block_n) * block_n if INTERPRETED else 0,
        BF16_STORAGE=storage_dtype == torch.bfloat16,
        num_warps=num_warps if num_warps is not None else 8 if block_d >= 256 else 4,
    )
    return attend


def _partials(out: torch.Tensor, n_q: int, n_kv: int, head_dim: int, splits: int):
    """Each split's softmax pieces for the merge and the (row, kv head) arrival counters (with one
    split, nothing: `out` stands in, untouched)."""
    if splits == 1:
        return out, out, out, out
    pieces = out.shape[0] * n_q * splits
    partial_max = torch.empty(pieces, dtype=torch.float32, device=out.device)
    return (torch.empty(pieces, head_dim, dtype=torch.float32, device=out.device), partial_max,
            torch.empty_like(partial_max), arrival_counters(out.device, out.shape[0] * n_kv))


def _launch(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, n_q, n_kv, head_dim, eps, scale,
            splits, block_n=None, num_warps=None, dot_mode=None):
    """The launch, inputs already checked."""
    batch, capacity, device = q_gate.shape[0], keys.shape[1], keys.device
    attend = _attend_config(n_q, n_kv, head_dim, cos.shape[2], keys.dtype, capacity, splits, block_n, num_warps,
                            dot_mode)
    out = torch.empty(batch, 1, n_q * head_dim, dtype=torch.float32, device=device)
    if batch == 0:
        return out
    partial_acc, partial_max, partial_sum, counters = _partials(out, n_q, n_kv, head_dim, splits)
    _attend_kernel[(batch * n_kv, splits)](
        q_gate, k, v, q_norm.contiguous(), k_norm.contiguous(), cos, sin, keys, values, starts, out,
        partial_acc, partial_max, partial_sum, counters,
        q_gate.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), starts.stride(0),
        keys.stride(0), keys.stride(1), keys.stride(2), capacity, float(eps), float(scale) * _LOG2_E, **attend,
        **pdl_options(q_gate.device),
    )
    return out


def attention_decode_(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts,
                      n_q: int, n_kv: int, head_dim: int, eps: float, scale: float) -> torch.Tensor:
    """One gated full-attention decode step (one token per row) between qkv_proj and o_proj.

    q_gate [B, 1, n_q * 2 * head_dim] (per head: head_dim query values, then head_dim gate values), k, v
    [B, 1, n_kv * head_dim] (fp32/bf16/fp16; rows may be strided column slices); q_norm, k_norm [head_dim];
    cos, sin [B, 1, rotary_dim]; keys, values: the whole K/V storage [rows >= B, capacity, n_kv, head_dim]
    (fp32, bf16 or fp16); starts [B] int64, each below the capacity. Row b's new K (normed and rotated)
    and V go to slot starts[b] of row b of keys/values, in place, cast to the storage's type; the token
    attends to that row's slots 0..starts[b], query head h to kv head h // (n_q / n_kv). Returns
    attention * sigmoid(gate), [B, 1, n_q * head_dim] float32. Never waits on the host.
    """
    device = _check_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, n_q, n_kv, head_dim)
    splits = split_count(n_kv, keys.shape[1], _sm_count(device))
    return _launch(q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, n_q, n_kv, head_dim, eps, scale,
                   splits)


def benchmark(batch: int = 1, context: int = 4096, n_q: int = 16, n_kv: int = 2, head_dim: int = 256,
              device: str = "cuda") -> dict:
    """Milliseconds per call (do_bench medians) on random inputs with every row `context` tokens long in a
    bf16 cache of that capacity: the public call, its CUDA-graph replay, the plain torch steps, and the
    kernels for other tiles, warps, dot precisions and split counts; plus each variant's largest
    difference from the public call's output (relative to its largest value) and the bytes read per second."""
    from qwen35.model.qwen35 import _single_query_attention, apply_rotary, rms_norm

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    rotary_dim, eps, scale = 2 * (head_dim // 8), 1e-6, head_dim**-0.5  # 64 of 256, as the models rotate
    q_gate = randn(batch, 1, 2 * n_q * head_dim)
    k, v = randn(batch, 1, n_kv * head_dim), randn(batch, 1, n_kv * head_dim)
    q_norm, k_norm = 1 + 0.1 * randn(head_dim), 1 + 0.1 * randn(head_dim)
    angles = randn(batch, 1, rotary_dim // 2).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    keys, values = (randn(batch, context, n_kv, head_dim).bfloat16() for _ in range(2))
    starts = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
    args = (q_gate, k, v, q_norm, k_norm, cos, sin, keys, values, starts, n_q, n_kv, head_dim, eps, scale)
    splits = split_count(n_kv, context, _sm_count(torch.device(device)))
    expected = attention_decode_(*args)
    bytes_read = 2 * keys.numel() * keys.element_size()

    def plain():
        qg = q_gate.view(batch, 1, n_q, 2 * head_dim)
        q = apply_rotary(rms_norm(qg[..., :head_dim], q_norm, eps), cos, sin)
        new_k = apply_rotary(rms_norm(k.view(batch, 1, n_kv, head_dim), k_norm, eps), cos, sin)
        keys[torch.arange(batch, device=device), starts] = new_k[:, 0].to(keys.dtype)
        values[torch.arange(batch, device=device), starts] = v.view(batch, n_kv, head_dim).to(values.dtype)
        mask = torch.ones(batch, 1, context, dtype=torch.bool, device=device)
        out = _single_query_attention(q, keys, values, mask, scale)
        return out * torch.sigmoid(qg[..., head_dim:].reshape(batch, 1, -1))

    ms = triton.testing.do_bench(lambda: attention_decode_(*args), return_mode="median")
    results = {
        "shape": dict(batch=batch, context=context, n_q=n_q, n_kv=n_kv, head_dim=head_dim, splits=splits),
        "ms": ms, "GB/s": bytes_read / (ms * 1e-3) / 1e9,
        "graph_ms": triton.testing.do_bench_cudagraph(lambda: attention_decode_(*args), return_mode="median"),
        "plain_torch_ms": triton.testing.do_bench(plain, return_mode="median"),
        "plain_torch_difference": _relative_difference(plain(), expected),
    }
    modes = ("split_bf16", "tf32x3", "ieee") if keys.dtype == torch.bfloat16 else ("tf32x3", "ieee")
    variants = [dict(block_n=n, num_warps=w, dot_mode=m, splits=splits) for n in (16, 32, 64) for w in (4, 8)
                for m in modes]
    variants += [dict(block_n=None, num_warps=None, dot_mode=None, splits=s)
                 for s in sorted({1, max(1, splits // 2), min(_MAX_SPLITS, 2 * splits), _MAX_SPLITS} - {splits})]
    for variant in variants:
        name = "n{block_n}_w{num_warps}_{dot_mode}_s{splits}".format(**variant)
        results[f"{name}_ms"] = triton.testing.do_bench(lambda: _launch(*args, **variant), return_mode="median")
        results[f"{name}_difference"] = _relative_difference(_launch(*args, **variant), expected)
    return results


def _relative_difference(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).abs().max() / expected.abs().max())
