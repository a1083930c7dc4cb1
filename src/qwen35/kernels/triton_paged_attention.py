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
K and V may each be a pool of GGUF blocks (-ctk/-ctv q8_0 ...): the new token is quantized in the kernel as
gguf-py quantizes it and attends as it will be read back, and tiles are read as float32 (tf32x3 products, as
for a float32 pool; kernels/triton_kv_blocks.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_attention import (
    _LOG2_E, _STORAGE_DTYPES, _attend_config, _attend_tile, _finish, _new_token_values, _partials, _row_start,
    _query_parts, _sm_count, _softmax_start, _split_range, _to_storage, check_token_inputs, split_count,
)
from qwen35.kernels.triton_checks import check_device, require
from qwen35.kernels.triton_kv_blocks import FLOAT, TYPE_IDS, quantize_store, row_bytes
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel


@triton.jit
def _attend_page_tile(q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, key_head_at,
                      value_head_at, key_page_stride, value_page_stride, key_slot_stride, value_slot_stride, n_pages,
                      first, end, slots, cols, col_mask, P: tl.constexpr, DOT_MODE: tl.constexpr,
                      INTERPRETED: tl.constexpr, KEY_TYPE: tl.constexpr, VALUE_TYPE: tl.constexpr):
    # Slots first .. first + BLOCK_N - 1 (those below `end`), all in the table's page first // P: that
    # page's slots from first % P, in the page's own coordinates. A tile past `end` loads no page id.
    page_index = first // P
    page = tl.load(table_row_at + page_index, mask=first < end, other=-1)
    usable = (page >= 0) & (page < n_pages)
    page_start = page_index * P
    page64 = tl.where(usable, page, 0).to(tl.int64)
    local_end = tl.where(usable, end - page_start, 0)
    return _attend_tile(q_high, q_mid, q_low, maximum, total, acc, keys_ptr + page64 * key_page_stride + key_head_at,
                        values_ptr + page64 * value_page_stride + value_head_at, key_slot_stride, value_slot_stride,
                        first - page_start, local_end, slots, cols, col_mask, DOT_MODE, INTERPRETED, KEY_TYPE,
                        VALUE_TYPE)


@triton.jit
def _store_new(x, pool_ptr, at, cols, col_mask, writes, BLOCK_D: tl.constexpr, D: tl.constexpr, TYPE: tl.constexpr,
               BF16_STORAGE: tl.constexpr):
    # The new token's V [BLOCK_D] written at pool_ptr + at (where `writes`), as the pool keeps it; returns the
    # values as they will be read back (in the pool's dtype, or float32 from blocks).
    if TYPE == FLOAT:
        stored = _to_storage(x, pool_ptr.dtype.element_ty, BF16_STORAGE)
        tl.store(pool_ptr + at + cols, stored, mask=col_mask & writes)
        return stored
    else:
        return quantize_store(x, pool_ptr + at, writes, BLOCK_D, D, TYPE)


# The table's width and the pool's size vary from cache to cache: specialized (Triton compiles apart for
# values divisible by 16), a graph's warm-up on a scratch cache might not compile what its capture runs.
@triton.jit(do_not_specialize=["table_s0", "table_width", "n_pages"])
def _paged_attend_kernel(
    q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, table_ptr, starts_ptr,
    out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr,
    q_gate_s0, k_s0, v_s0, cos_s0, sin_s0, starts_s0, pool_s0, pool_s1, pool_s2, value_pool_s0, value_pool_s1,
    value_pool_s2, table_s0, table_width, n_pages, eps, qk_scale,
    P: tl.constexpr, N_KV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, ROTARY: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
    MERGE_G: tl.constexpr, MERGE_UNROLL: tl.constexpr, INTERPRETED_SPAN: tl.constexpr, DOT_MODE: tl.constexpr,
    BF16_STORAGE: tl.constexpr, KEY_TYPE: tl.constexpr, VALUE_TYPE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    # triton_attention._attend_kernel, but for the new token's page and each tile's page, and K and V each
    # in its own pool: a float dtype, or GGUF blocks (KEY_TYPE / VALUE_TYPE, triton_kv_blocks).
    unit, split = tl.program_id(0), tl.program_id(1)
    row, kv_head = unit // N_KV, unit % N_KV
    row64 = row.to(tl.int64)
    start, start_in_range, cached = _row_start(starts_ptr, row64, starts_s0, table_width * P)
    table_row_at = table_ptr + row64 * table_s0

    cols, col_mask, group_mask, heads, q, k_new, v_new = _new_token_values(
        q_gate_ptr, k_ptr, v_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_gate_s0, k_s0, v_s0, cos_s0,
        sin_s0, row64, kv_head, eps, qk_scale, GROUP, D, ROTARY, BLOCK_G, BLOCK_D)

    # The new token goes to slot start % P of the row's page start // P (split 0 writes it; nobody reads it).
    owns_new_token = split == 0
    page = tl.load(table_row_at + start // P, mask=start_in_range, other=-1)
    writes = start_in_range & (page >= 0) & (page < n_pages) & owns_new_token
    page64 = tl.where(writes, page, 0).to(tl.int64)
    key_head_at, value_head_at = kv_head * pool_s2, kv_head * value_pool_s2
    key_at = page64 * pool_s0 + (start % P) * pool_s1 + key_head_at
    if KEY_TYPE == FLOAT:  # K stays [1, BLOCK_D], as _norm_rotate gives it (no layout change on the float path)
        k_kept = _to_storage(k_new, keys_ptr.dtype.element_ty, BF16_STORAGE)
        tl.store(keys_ptr + key_at + cols[None, :], k_kept, mask=(col_mask & writes)[None, :])
    else:
        k_kept = quantize_store(tl.reshape(k_new, (BLOCK_D,)), keys_ptr + key_at, writes, BLOCK_D, D, KEY_TYPE)[None, :]
    v_kept = _store_new(v_new, values_ptr, page64 * value_pool_s0 + (start % P) * value_pool_s1 + value_head_at,
                        cols, col_mask, writes, BLOCK_D, D, VALUE_TYPE, BF16_STORAGE)

    maximum, total, acc = _softmax_start(q, k_kept, v_kept, owns_new_token, BLOCK_G, BLOCK_D)

    begin, end, slots = _split_range(cached, split, SPLITS, BLOCK_N)
    q_high, q_mid, q_low = _query_parts(q, DOT_MODE)
    if INTERPRETED_SPAN == 0:
        for first in tl.range(begin, end, BLOCK_N):
            maximum, total, acc = _attend_page_tile(
                q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, key_head_at,
                value_head_at, pool_s0, value_pool_s0, pool_s1, value_pool_s1, n_pages, first, end, slots, cols,
                col_mask, P, DOT_MODE, False, KEY_TYPE, VALUE_TYPE)
    else:  # the interpreter's range() takes no loaded bound: the largest share, tiles past `end` masked
        for offset in range(0, INTERPRETED_SPAN, BLOCK_N):
            maximum, total, acc = _attend_page_tile(
                q_high, q_mid, q_low, maximum, total, acc, keys_ptr, values_ptr, table_row_at, key_head_at,
                value_head_at, pool_s0, value_pool_s0, pool_s1, value_pool_s1, n_pages, begin + offset, end, slots,
                cols, col_mask, P, DOT_MODE, True, KEY_TYPE, VALUE_TYPE)

    _finish(q_gate_ptr, out_ptr, partial_acc_ptr, partial_max_ptr, partial_sum_ptr, counter_ptr, q_gate_s0, row64,
            unit, split, heads, group_mask, cols, col_mask, maximum, total, acc, N_KV, GROUP, D, SPLITS, BLOCK_D,
            BLOCK_S, MERGE_G, MERGE_UNROLL, INTERPRETED_SPAN > 0)


def _pool_type(pool: torch.Tensor, cache_type: str | None, head_dim: int, which: str) -> int:
    """The kernel's type id of a pool: FLOAT for a float dtype (cache_type None), else its block type's."""
    name = "paged_attention_decode_"
    if cache_type is None:
        require(pool.dtype in _STORAGE_DTYPES,
                f"{name}: a float {which} pool must be float32, bfloat16 or float16, got {pool.dtype}")
        require(pool.dim() == 4 and pool.shape[3] == head_dim,
                f"{name}: the {which} pool must be [n_pages, page_size, n_kv, {head_dim}], got {tuple(pool.shape)}")
        return FLOAT.value
    require(cache_type in TYPE_IDS, f"{name}: no {which} cache type {cache_type!r} (f32/bf16/fp16 pools, or "
                                    f"one of {', '.join(TYPE_IDS)})")
    require(head_dim % 32 == 0, f"{name}: a {cache_type} {which} pool needs head_dim a multiple of 32, not {head_dim}")
    width = row_bytes(TYPE_IDS[cache_type], head_dim)
    require(pool.dtype == torch.uint8 and pool.dim() == 4 and pool.shape[3] == width,
            f"{name}: a {cache_type} {which} pool must be uint8 [n_pages, page_size, n_kv, {width}] "
            f"({head_dim} values as blocks), got {pool.dtype} {tuple(pool.shape)}")
    return TYPE_IDS[cache_type]


def _check_paged_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts,
                        n_q, n_kv, head_dim, key_type=None, value_type=None):
    """triton_attention's checks of the new token, then the pools' and the table's own; returns the
    device and the pools' type ids."""
    name = "paged_attention_decode_"
    batch = check_token_inputs(name, q_gate, k, v, q_norm, k_norm, cos, sin, starts, n_q, n_kv, head_dim)
    require(
        key_pool.dim() == 4 and value_pool.dim() == 4 and key_pool.shape[:3] == value_pool.shape[:3]
        and key_pool.shape[0] >= 1 and key_pool.shape[2] == n_kv,
        f"{name}: the K and V pools must be alike [n_pages >= 1, page_size, {n_kv}, ...], "
        f"got {tuple(key_pool.shape)} and {tuple(value_pool.shape)}",
    )
    types = (_pool_type(key_pool, key_type, head_dim, "K"), _pool_type(value_pool, value_type, head_dim, "V"))
    floats = [pool.dtype for pool, type_id in zip((key_pool, value_pool), types) if type_id == FLOAT.value]
    require(len(set(floats)) <= 1, f"{name}: float K and V pools must share one dtype, got {floats}")
    for pool in (key_pool, value_pool):
        require(pool.stride(3) == 1 and pool.stride(2) == pool.shape[3] and pool.stride(1) == n_kv * pool.shape[3],
                f"{name}: each page of a pool must be contiguous")
    page_size = key_pool.shape[1]
    require(page_size >= 16 and page_size & (page_size - 1) == 0,
            f"{name}: the page size must be a power of two of 16 slots or more, got {page_size}")
    require(
        page_table.dim() == 2 and page_table.dtype == torch.int32 and page_table.shape[0] >= batch
        and page_table.shape[1] >= 1 and page_table.stride(1) == 1,
        f"{name}: page_table must be int32 [rows >= {batch}, pages a row >= 1] with contiguous rows, "
        f"got {page_table.dtype} {tuple(page_table.shape)}",
    )
    device = check_device(name, {"key_pool": key_pool, "value_pool": value_pool, "page_table": page_table,
                                 "q_gate": q_gate, "k": k, "v": v, "q_norm": q_norm, "k_norm": k_norm, "cos": cos,
                                 "sin": sin, "starts": starts})
    return device, types


def _launch_paged(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts, n_q, n_kv,
                  head_dim, eps, scale, splits, block_n=None, num_warps=None, dot_mode=None, types=(0, 0)):
    """The launch, inputs already checked; `types`: the K and V pools' type ids (FLOAT or a block type)."""
    batch, page_size, device = q_gate.shape[0], key_pool.shape[1], key_pool.device
    capacity = page_table.shape[1] * page_size
    blocks = any(type_id != FLOAT.value for type_id in types)
    floats = [pool.dtype for pool, type_id in zip((key_pool, value_pool), types) if type_id == FLOAT.value]
    # Blocks are read as float32 tiles: the products of a float32 cache.
    products_dtype = torch.float32 if blocks else key_pool.dtype
    attend = _attend_config(n_q, n_kv, head_dim, cos.shape[2], products_dtype, capacity, splits, block_n,
                            num_warps, dot_mode)
    if attend["BLOCK_N"] > page_size:  # a tile must lie in one page: recount the interpreter's span for less
        attend = _attend_config(n_q, n_kv, head_dim, cos.shape[2], products_dtype, capacity, splits, page_size,
                                num_warps, dot_mode)
    attend["BF16_STORAGE"] = torch.bfloat16 in floats
    out = torch.empty(batch, 1, n_q * head_dim, dtype=torch.float32, device=device)
    if batch == 0:
        return out
    partial_acc, partial_max, partial_sum, counters = _partials(out, n_q, n_kv, head_dim, splits)
    # gguf-py rounds a product before adding to it: quantizing a new token bit for bit needs no fused
    # multiply-adds (triton_kv_blocks).
    fusion = {"enable_fp_fusion": False} if blocks else {}
    _paged_attend_kernel[(batch * n_kv, splits)](
        q_gate, k, v, q_norm.contiguous(), k_norm.contiguous(), cos, sin, key_pool, value_pool, page_table, starts,
        out, partial_acc, partial_max, partial_sum, counters,
        q_gate.stride(0), k.stride(0), v.stride(0), cos.stride(0), sin.stride(0), starts.stride(0),
        key_pool.stride(0), key_pool.stride(1), key_pool.stride(2), value_pool.stride(0), value_pool.stride(1),
        value_pool.stride(2), page_table.stride(0), page_table.shape[1], key_pool.shape[0], float(eps),
        float(scale) * _LOG2_E, P=page_size, KEY_TYPE=types[0], VALUE_TYPE=types[1], **attend,
        **pdl_options(q_gate.device), **fusion,
    )
    return out


def paged_attention_decode_(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts,
                            n_q: int, n_kv: int, head_dim: int, eps: float, scale: float,
                            key_type: str | None = None, value_type: str | None = None) -> torch.Tensor:
    """One gated full-attention decode step (one token per row) between qkv_proj and o_proj, over pages.

    As `attention_decode_` (q_gate [B, 1, n_q * 2 * head_dim], k, v [B, 1, n_kv * head_dim], q_norm,
    k_norm [head_dim], cos, sin [B, 1, rotary_dim], starts [B] int64), but K/V live in key_pool,
    value_pool [n_pages, P, n_kv, head_dim] (fp32, bf16 or fp16, both alike; P a power of two >= 16) and
    page_table [rows >= B, pages a row] int32: row b's new K (normed and rotated) and V go to
    pool[page_table[b, s // P], s % P] with s = starts[b], in place, and the token attends to that row's
    slots 0..s through the table. `key_type`/`value_type` name a GGUF block type ("q8_0", "q4_0", "q4_1",
    "q5_0", "q5_1") where that pool holds blocks, uint8 [n_pages, P, n_kv, head_dim / 32 * block bytes]:
    the new token is quantized as gguf-py quantizes, and tiles are read as float32.
    Returns attention * sigmoid(gate), [B, 1, n_q * head_dim] float32. Never waits on the host.
    """
    device, types = _check_paged_inputs(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table,
                                        starts, n_q, n_kv, head_dim, key_type, value_type)
    splits = split_count(n_kv, page_table.shape[1] * key_pool.shape[1], _sm_count(device))
    return _launch_paged(q_gate, k, v, q_norm, k_norm, cos, sin, key_pool, value_pool, page_table, starts, n_q, n_kv,
                         head_dim, eps, scale, splits, types=types)
