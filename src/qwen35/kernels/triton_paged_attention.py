"""The gated full-attention decode step over a paged K/V cache (engine/paged_kv.py), in Triton.

`paged_attention_decode_` is kernels/triton_attention.py's `attention_decode_` with the K/V storage
swapped for a page pool [n_pages, P, n_kv, d] and a page table [rows, pages a row] int32: row b's
slot s is slot s % P of page page_table[b, s // P]. The maths, the split over the context
(flash-decoding) with its in-launch merge (the last split of a (row, kv head) to arrive merges the
pieces, one launch) and the argument checks are triton_attention's, imported: only where the new
token is written and where each tile of slots is read differ.
A tile of BLOCK_N slots (a power of two, dividing P) starts at a multiple of BLOCK_N, so it lies in
one page; its page id is one scalar load, then the tile is triton_attention's `_attend_tile` over
that page. A page id outside the pool (a caller's bug: checking it would wait on the GPU) reads and
writes nothing. Nothing waits on the host: a step can be captured in a CUDA graph, and the splits
follow the table's width (the slots a row can address), never the batch or the rows' lengths.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_attention import (
    _LOG2_E, _attend_config, _attend_tile, _check_inputs, _finish, _new_token, _partials, _row_start,
    _query_parts, _sm_count, _softmax_start, _split_range, split_count,
)
from qwen35.kernels.triton_checks import require
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel


@triton.jit
def _attend_page_tile(q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, head_at,
                      page_stride, slot_stride, n_pages, first, end, slots, cols, col_mask, P: tl.constexpr,
                      DOT_MODE: tl.constexpr, INTERPRETED: tl.constexpr):
    # Slots first .. first + BLOCK_N - 1 (those below `end`), all in the table's page first // P: that
    # page's slots from first % P, in the page's own coordinates. A tile past `end` loads no page id.
    page_index = first // P
    page = tl.load(table_row_at + page_index, mask=first < end, other=-1)
    usable = (page >= 0) & (page < n_pages)
    page_start = page_index * P
    page_at = tl.where(usable, page, 0).to(tl.int64) * page_stride + head_at
    local_end = tl.where(usable, end - page_start, 0)
    return _attend_tile(q_high, q_mid, q_low, maximum, total, acc, keys_ptr + page_at, values_ptr + page_at,
                        slot_stride, first - page_start, local_end, slots, cols, col_mask, DOT_MODE, INTERPRETED)


# The table's width and the pool's size vary from cache to cache: specialized (Triton compiles apart for
# values divisible by 16), a graph's warm-up on a scratch cache might not compile what its capture runs.
@triton.jit(do_not_specialize=["table_s0", "table_width", "n_pages"])
def _paged_attend_kernel(
    q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, table_ptr, starts_ptr,
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr,
    q_gate_s0, k_s0, v_s0, cos_s0, sin_s0, starts_s0, pool_s0, pool_s1, pool_s2, table_s0,
    table_width, n_pages, eps, qk_scale,
    P: tl.constexpr, N_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, ROTARY: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_G: tl.constexpr, MERGE_UNROLL: tl.constexpr, INTERPRETED_SPAN: tl.constexpr, DOT_MODE: tl.constexpr,
    BF16_STORAGE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    # triton_attention._attend_kernel, but for the new token's page and each tile's page.
    unit, split = tl.program_id(0), tl.program_id(1)
    row, kv_head = unit // N_KV, unit % N_KV
    row64 = row.to(tl.int64)
    start, start_in_range, cached = _row_start(starts_ptr, row64, starts_s0, table_width * P)
    table_row_at = table_ptr + row64 * table_s0

    cols, col_mask, group_mask, heads, q, k_stored, v_stored = _new_token(
        q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, q_gate_s0, k_s0, v_s0, cos_s0,
        sin_s0, row64, kv_head, eps, qk_scale, GROUP, D, ROTARY, BLOCK_G, BLOCK_D, BF16_STORAGE)

    # The new token goes to slot start % P of the row's page start // P (split 0 writes it; nobody reads it).
    owns_new_token = split == 0
    page = tl.load(table_row_at + start // P, mask=start_in_range, other=-1)
    writes = start_in_range & (page >= 0) & (page < n_pages) & owns_new_token
    head_at = kv_head * pool_s2
    slot_at = tl.where(writes, page, 0).to(tl.int64) * pool_s0 + (start % P) * pool_s1 + head_at + cols
    tl.store(keys_ptr + slot_at[None, :], k_stored, mask=(col_mask & writes)[None, :])
    tl.store(values_ptr + slot_at, v_stored, mask=col_mask & writes)

    maximum, total, acc = _softmax_start(q, k_stored, v_stored, owns_new_token, BLOCK_G, BLOCK_D)

    begin, end, slots = _split_range(cached, split, SPLITS, BLOCK_N)
    q_high, q_mid, q_low = _query_parts(q, DOT_MODE)
    if INTERPRETED_SPAN == 0:
        for first in tl.range(begin, end, BLOCK_N):
            maximum, total, acc = _attend_page_tile(
                q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, head_at, pool_s0,
                pool_s1, n_pages, first, end, slots, cols, col_mask, P, DOT_MODE, False)
    else:  # the interpreter's range() takes no loaded bound: the largest share, tiles past `end` masked
        for offset in range(0, INTERPRETED_SPAN, BLOCK_N):
            maximum, total, acc = _attend_page_tile(
                q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, head_at, pool_s0,
                pool_s1, n_pages, begin + offset, end, slots, cols, col_mask, P, DOT_MODE, True)

    _finish(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr, q_gate_s0, row64,
            unit, split, heads, group_mask, cols, col_mask, maximum, total, acc, N_KV, GROUP, D, SPLITS, BLOCK_D,
            BLOCK_S, MERGE_G, MERGE_UNROLL, INTERPRETED_SPAN > 0)


def _check_paged_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts,
                        n_q, n_kv, head_dim):
    """triton_attention's checks (its storage check on the pool's first page, a storage of one row of
    P slots), then the pool's and the table's own; returns the device."""
    name = "paged_attention_decode_"
    batch = q_gate.shape[0] if q_gate.dim() == 3 else 0
    require(
        key_pool.dim() == 4 and key_pool.shape == value_pool.shape and key_pool.stride() == value_pool.stride()
        and key_pool.shape[0] >= 1 and key_pool.shape[2:] == (n_kv, head_dim),
        f"{name}: the K and V pools must be alike [n_pages >= 1, page_size, {n_kv}, {head_dim}], "
        f"got {tuple(key_pool.shape)} and {tuple(value_pool.shape)}",
    )
    page_size = key_pool.shape[1]
    require(page_size >= 16 and page_size & (page_size - 1) == 0,
            f"{name}: the page size must be a power of two of 16 slots or more, got {page_size}")
    require(
        page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.shape[0] >= batch
        and page_table.shape[1] >= 1 and page_table.stride(1) == 1,
        f"{name}: page_table must be int32 [rows >= {batch}, pages a row >= 1] with contiguous rows, "
        f"got {page_table.dtype} {tuple(page_table.shape)}",
    )
    # The first page, repeated for each row, stands for a contiguous storage of page_size slots.
    def first_page(pool):
        return pool[:1].expand(max(batch, 1), *pool.shape[1:])

    device = _check_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, first_page(key_pool), first_page(value_pool),
                           starts, n_q, n_kv, head_dim)
    require(page_table.device == device, f"{name}: page_table is on {page_table.device}, the others on {device}")
    return device


def _launch_paged(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts, n_q, n_kv,
                  head_dim, eps, scale, splits, block_n=None, num_warps=None, dot_mode=None):
    """The launch, inputs already checked."""
    batch, page_size, device = q_gate.shape[0], key_pool.shape[1], key_pool.device
    capacity = page_table.shape[1] * page_size
    attend = _attend_config(n_q, n_kv, head_dim, cos.shape[2], key_pool.dtype, capacity, splits, block_n,
                            num_warps, dot_mode)
    if attend["BLOCK_N"] > page_size:  # a tile must lie in one page: recount the interpreter's span for less
        attend = _attend_config(n_q, n_kv, head_dim, cos.shape[2], key_pool.dtype, capacity, splits, page_size,
                                num_warps, dot_mode)
    out = torch.empty(batch, 1, n_q * head_dim, dtype=torch.float32, device=device)
    if batch == 0:
        return out
    partial_acc, partial_max, partial_sum, counters = _partials(out, n_q, n_kv, head_dim, splits)
    _paged_attend_kernel[(batch * n_kv, splits)](
        q_gate, k, v, q_norm.contiguous(), k_norm.contiguous(), cos, sin, key_pool, value_pool, page_table, starts,
        out, partial_acc, partial_max, partial_sum, counters,
        q_gate.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), starts.stride(0),
        key_pool.stride(0), key_pool.stride(1), key_pool.stride(2), page_table.stride(0),
        page_table.shape[1], key_pool.shape[0], float(eps), float(scale) * _LOG2_E, P=page_size, **attend,
        **pdl_options(q_gate.device),
    )
    return out


def paged_attention_decode_(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts,
                            n_q: int, n_kv: int, head_dim: int, eps: float, scale: float) -> torch.Tensor:
    """One gated full-attention decode step (one token per row) between qkv_proj and o_proj, over pages.

    As `attention_decode_` (q_gate [B, 1, n_q * 2 * head_dim], k, v [B, 1, n_kv * head_dim], q_norm,
    k_norm [head_dim], cos, sin [B, 1, rotary_dim], starts [B] int64), but K/V live in key_pool,
    value_pool [n_pages, P, n_kv, head_dim] (fp32, bf16 or fp16; P a power of two >= 16) and
    page_table [rows >= B, pages a row] int32: row b's new K (normed and rotated) and V go to
    pool[page_table[b, s // P], s % P] with s = starts[b], in place, and the token attends to that row's
    slots 0..s through the table. Returns attention * sigmoid(gate), [B, 1, n_q * head_dim] float32.
    Never waits on the host.
    """
    device = _check_paged_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts,
                                 n_q, n_kv, head_dim)
    splits = split_count(n_kv, page_table.shape[1] * key_pool.shape[1], _sm_count(device))
    return _launch_paged(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts, n_q, n_kv,
                         head_dim, eps, scale, splits)
