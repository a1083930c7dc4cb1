"""Gated DeltaNet's decode on the GPU, in Triton: the twin of csrc/deltanet_decode.cpp.

`recurrent_delta_rule_` runs the gated delta rule token by token (delta_rule.py's
`recurrent_gated_delta_rule`, same head-major layouts) for one or a few tokens per row.
`deltanet_decode_` runs a whole DeltaNet decode step between in_proj and out_proj
(GatedDeltaNet's causal_conv -> delta_rule_inputs -> delta rule -> gated_norm) in one launch,
since a decode step on the GPU is bound by its launches: one program per (row, value head).
A program convolves (+ SiLU) the channels it needs straight from the projections and the conv
state (its value head's v channels and the q and k channels of its key head, l2-normed), then
computes the gates, one delta-rule step and the gated RMS norm; the RMS norm needs the head's
whole output, so a program holds the head's whole [d_k, d_v] state.

The v channels' conv state is one program's own, which shifts it in place. A key head's q and k
channels are read by n_v / n_k programs, so their conv state may move only once all of them have
read it: the "last program to finish" pattern of triton_gguf_gemv.py. Each program, having read, counts
itself in on its (row, key head) arrival counter (triton_arrivals.py; an atomic add,
acq_rel, after a barrier); the one that completes the count shifts those channels (it holds the
newest inputs) and sets the count back to 0 for the next call or graph replay.

Both functions update the given state tensors in place and never wait on the host, so a decode
step can be captured in a CUDA graph. The recurrent state is memory-bound work: each program reads
its slice of the state once and writes it once; everything is computed in fp32 whatever the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.kernels.triton_arrivals import arrival_counters, last_to_arrive, reset_count
from qwen35.kernels.triton_checks import (
    check_delta_rule, check_device, check_dtype, require,
)
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel

# Value columns per program of the recurrent kernel: a [d_k, 32] fp32 slice of the state in registers,
# 64 values a thread (2 warps for d_k 128). Measured on an H200 against 8 to 128 columns and 1 to 8
# warps: the best or within 10% of it from 1 row to 32 (narrower slices lose at large batches).
_RECURRENT_BLOCK_V = 32
_RECURRENT_VALUES_PER_THREAD = 64
# The decode step holds a head's whole [d_k, d_v] state: 4 warps for 128 x 128 beat 8 and 16 by 20-40%
# (measured before the conv joined the step's launch; with it, 255 registers a thread and no spills).
_STEP_VALUES_PER_THREAD = 128


def _warps(tile_elements: int, values_per_thread: int) -> int:
    """Warps (1 to 8) for a program holding a tile of that many values, so many of them a thread."""
    return max(1, min(8, tile_elements // (32 * values_per_thread)))


def _step_warps(block_k: int, block_v: int) -> int:
    """Warps for a decode-step program: 2 at least, as one warp holding a 64 x 64 state and the conv's
    q and k (replicated along the state's rows) spills registers on an H100."""
    return max(2, _warps(block_k * block_v, _STEP_VALUES_PER_THREAD))


@triton.jit
def _softplus(x):
    # torch's softplus: x itself past 20; log(1 + e^x) written so that e^x cannot overflow.
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))


@triton.jit
def _recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, state_ptr, out_ptr,
    q_s0, q_s1, q_s2, q_s3, k_s0, k_s1, k_s2, k_s3, v_s0, v_s1, v_s2, v_s3,
    g_s0, g_s1, g_s2, beta_s0, beta_s1, beta_s2, state_s0, state_s1, state_s2, state_s3,
    heads,
    LENGTH: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    # Program (row * heads + head, column block): state[row, head, :, columns] stays in registers
    # through the tokens; the output is contiguous [B, H, T, d_v]. T is a compile-time constant: decode
    # feeds one token, or a few (speculative drafts), and each count is its own captured graph anyway.
    row_head = tl.program_id(0)
    row, head = row_head // heads, row_head % heads
    keys = tl.arange(0, BLOCK_K)
    columns = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    key_mask, column_mask = keys < D_K, columns < D_V
    tile_mask = key_mask[:, None] & column_mask[None, :]
    state_at = state_ptr + row * state_s0 + head * state_s1 + keys[:, None] * state_s2 + columns[None, :] * state_s3
    state = tl.load(state_at, mask=tile_mask, other=0.0)
    q_row, k_row = q_ptr + row * q_s0 + head * q_s1, k_ptr + row * k_s0 + head * k_s1
    v_row = v_ptr + row * v_s0 + head * v_s1
    g_row, beta_row = g_ptr + row * g_s0 + head * g_s1, beta_ptr + row * beta_s0 + head * beta_s1
    out_row = out_ptr + row_head * LENGTH * D_V
    for t in range(LENGTH):
        q = tl.load(q_row + t * q_s2 + keys * q_s3, mask=key_mask, other=0.0).to(tl.float32)
        k = tl.load(k_row + t * k_s2 + keys * k_s3, mask=key_mask, other=0.0).to(tl.float32)
        v = tl.load(v_row + t * v_s2 + columns * v_s3, mask=column_mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + t * g_s2).to(tl.float32)
        beta = tl.load(beta_row + t * beta_s2).to(tl.float32)
        state = state * tl.exp(g)
        delta = beta * (v - tl.sum(state * k[:, None], axis=0))
        state = state + k[:, None] * delta[None, :]
        tl.store(out_row + t * D_V + columns, tl.sum(state * q[:, None], axis=0), mask=column_mask)
    tl.debug_barrier()  # every thread has read its state before any writes it back
    tl.store(state_at, state, mask=tile_mask)


def recurrent_delta_rule_(q, k, v, g, beta, state) -> torch.Tensor:
    """The gated delta rule over T tokens: q, k [B, H, T, d_k], v [B, H, T, d_v], g, beta [B, H, T],
    state [B, H, d_k, d_v] fp32, updated in place to the final state. Returns the output
    [B, H, T, d_v] fp32. Queries and keys come normed and scaled, key heads matched to value heads."""
    name = "recurrent_delta_rule_"
    batch, heads, length, key_dim, value_dim = check_delta_rule(name, q, k, v, g, beta, state)

    out = torch.empty(batch, heads, length, value_dim, dtype=torch.float32, device=state.device)
    if batch * heads == 0:
        return out
    block_k = triton.next_power_of_2(key_dim)
    block_v = min(triton.next_power_of_2(value_dim), _RECURRENT_BLOCK_V)
    grid = (batch * heads, triton.cdiv(value_dim, block_v))
    _recurrent_kernel[grid](
        q, k, v, g, beta, state, out, *q.stride(), *k.stride(), *v.stride(), *g.stride(), *beta.stride(),
        *state.stride(), heads,
        LENGTH=length, D_K=key_dim, D_V=value_dim, BLOCK_K=block_k, BLOCK_V=block_v,
        num_warps=_warps(block_k * block_v, _RECURRENT_VALUES_PER_THREAD),
        **pdl_options(q.device),
    )
    return out


@triton.jit
def _convolve(projected_at, held_at, weight_at, conv_s2, weight_s1, mask, KEPT: tl.constexpr):
    """Causal conv + SiLU of some channels, in fp32: each channel's window is its KEPT held inputs
    (oldest first), then the newest, the taps summed in that order as GatedDeltaNet.causal_conv sums
    them. Returns the SiLU output and the newest inputs as loaded (for the conv state)."""
    oldest = tl.load(held_at, mask=mask, other=0.0).to(tl.float32)
    mixed = oldest * tl.load(weight_at, mask=mask, other=0.0).to(tl.float32)
    for tap in tl.static_range(1, KEPT):
        held = tl.load(held_at + tap * conv_s2, mask=mask, other=0.0).to(tl.float32)
        mixed = mixed + held * tl.load(weight_at + tap * weight_s1, mask=mask, other=0.0).to(tl.float32)
    newest = tl.load(projected_at, mask=mask, other=0.0)
    mixed = mixed + newest.to(tl.float32) * tl.load(weight_at + KEPT * weight_s1, mask=mask, other=0.0).to(tl.float32)
    return mixed * tl.sigmoid(mixed), newest


@triton.jit
def _l2_normed(x, l2_eps):
    return x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) + l2_eps))


@triton.jit
def _shift_conv_state(held_at, newest, mask, conv_s2, KEPT: tl.constexpr, BLOCK_KEPT: tl.constexpr):
    """Moves some channels' conv state one place: the oldest input out, the newest in. All of it is
    read before the barrier: a thread may not overwrite a held input that another thread holding the
    same channel still reads."""
    taps = tl.arange(0, BLOCK_KEPT)
    kept_mask = mask[:, None] & (taps[None, :] >= 1) & (taps[None, :] < KEPT)
    tile_at = held_at[:, None] + taps[None, :] * conv_s2
    kept = tl.load(tile_at, mask=kept_mask, other=0.0)
    tl.debug_barrier()
    tl.store(tile_at - conv_s2, kept, mask=kept_mask)
    tl.store(held_at + (KEPT - 1) * conv_s2, newest.to(held_at.dtype.element_ty), mask=mask)


@triton.jit
def _decode_step_kernel(
    projected_ptr, a_ptr, b_ptr, z_ptr, conv_state_ptr, conv_weight_ptr, dt_bias_ptr, decay_rate_ptr, norm_weight_ptr,
    state_ptr, y_ptr, counter_ptr,
    projected_s0, projected_s2, a_s0, a_s2, b_s0, b_s2, z_s0, z_s2, conv_s0, conv_s1, conv_s2, weight_s0, weight_s1,
    state_s0, state_s1, state_s2, state_s3, q_scale, l2_eps, rms_eps,
    N_K: tl.constexpr, N_V: tl.constexpr, D_K: tl.constexpr, D_V: tl.constexpr, KEPT: tl.constexpr,
    GROUPED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_KEPT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    # Program row * n_v + head: the conv of the head's q | k | v channels, the gates, one delta-rule step
    # over the head's whole state, then the head's output RMS-normed, times the norm weight and silu(z),
    # into y [B, 1, n_v * d_v].
    unit = tl.program_id(0)
    row, head = unit // N_V, unit % N_V
    if GROUPED:  # value head j reads key head j // (n_v / n_k)
        key_head = head // (N_V // N_K)
    else:  # tiled: key head j % n_k
        key_head = head % N_K
    keys, columns = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V)
    key_mask, column_mask = keys < D_K, columns < D_V
    projected_row = projected_ptr + row * projected_s0
    held_row = conv_state_ptr + row * conv_s0
    q_channels = key_head * D_K + keys
    k_channels = q_channels + N_K * D_K
    v_channels = 2 * N_K * D_K + head * D_V + columns
    q_held, k_held, v_held = (held_row + q_channels * conv_s1, held_row + k_channels * conv_s1,
                              held_row + v_channels * conv_s1)
    q, q_newest = _convolve(projected_row + q_channels * projected_s2, q_held, conv_weight_ptr + q_channels * weight_s0,
                            conv_s2, weight_s1, key_mask, KEPT)
    k, k_newest = _convolve(projected_row + k_channels * projected_s2, k_held, conv_weight_ptr + k_channels * weight_s0,
                            conv_s2, weight_s1, key_mask, KEPT)
    v, v_newest = _convolve(projected_row + v_channels * projected_s2, v_held, conv_weight_ptr + v_channels * weight_s0,
                            conv_s2, weight_s1, column_mask, KEPT)
    q = _l2_normed(q, l2_eps) * q_scale
    k = _l2_normed(k, l2_eps)

    # The v channels' conv state is this program's own; the q and k channels' is read by every value
    # head of the key head, so the last of them to count itself in shifts it (it holds the newest inputs)
    # and sets the count back to 0 for the next call.
    counter = counter_ptr + row * N_K + key_head
    if last_to_arrive(counter, N_V // N_K):  # every thread has read its conv state before the count
        _shift_conv_state(q_held, q_newest, key_mask, conv_s2, KEPT, BLOCK_KEPT)
        _shift_conv_state(k_held, k_newest, key_mask, conv_s2, KEPT, BLOCK_KEPT)
        reset_count(counter)
    _shift_conv_state(v_held, v_newest, column_mask, conv_s2, KEPT, BLOCK_KEPT)

    a = tl.load(a_ptr + row * a_s0 + head * a_s2).to(tl.float32)
    b = tl.load(b_ptr + row * b_s0 + head * b_s2).to(tl.float32)
    g = tl.load(decay_rate_ptr + head).to(tl.float32) * _softplus(a + tl.load(dt_bias_ptr + head).to(tl.float32))
    beta = tl.sigmoid(b)
    tile_mask = key_mask[:, None] & column_mask[None, :]
    state_at = state_ptr + row * state_s0 + head * state_s1 + keys[:, None] * state_s2 + columns[None, :] * state_s3
    state = tl.load(state_at, mask=tile_mask, other=0.0) * tl.exp(g)
    delta = beta * (v - tl.sum(state * k[:, None], axis=0))
    state = state + k[:, None] * delta[None, :]
    out = tl.sum(state * q[:, None], axis=0)
    tl.debug_barrier()  # every thread has read its state before any writes it back
    tl.store(state_at, state, mask=tile_mask)

    z = tl.load(z_ptr + row * z_s0 + (head * D_V + columns) * z_s2, mask=column_mask, other=0.0).to(tl.float32)
    weight = tl.load(norm_weight_ptr + columns, mask=column_mask, other=0.0).to(tl.float32)
    inverse_rms = 1.0 / tl.sqrt(tl.sum(out * out, axis=0) / D_V + rms_eps)
    gated = out * inverse_rms * weight * (z * tl.sigmoid(z))
    tl.store(y_ptr + unit * D_V + columns, gated, mask=column_mask)


def deltanet_decode_(
    projected, a, b, z, conv_state, conv_weight, dt_bias, decay_rate, norm_weight, recurrent,
    n_k: int, d_k: int, n_v: int, d_v: int, grouped: bool, l2_eps: float, rms_eps: float,
) -> torch.Tensor:
    """One DeltaNet decode step (one token per row) between in_proj and out_proj, in one launch.

    projected [B, 1, 2 n_k d_k + n_v d_v] (q | k | v), a, b [B, 1, n_v], z [B, 1, n_v d_v] (fp32 or
    bf16; rows may be strided column slices); conv_state [B, conv_dim, K-1] (oldest input first) and
    recurrent [B, n_v, d_k, d_v] fp32 are updated in place; conv_weight [conv_dim, K]; dt_bias,
    decay_rate [n_v]; norm_weight [d_v]. Value head j reads key head j // (n_v / n_k) when `grouped`,
    else j % n_k. Returns y [B, 1, n_v d_v] fp32, the gated-normed output before out_proj.
    """
    name = "deltanet_decode_"
    require(
        min(n_k, d_k, n_v, d_v) >= 1 and n_v % n_k == 0,
        f"{name}: head counts and sizes must be positive and n_v ({n_v}) a multiple of n_k ({n_k})",
    )
    require(projected.dim() == 3, f"{name}: projected must be [B, 1, conv_dim], got {tuple(projected.shape)}")
    batch, key_width, value_width = projected.shape[0], n_k * d_k, n_v * d_v
    conv_dim = 2 * key_width + value_width
    token_rows = (("projected", projected, conv_dim), ("a", a, n_v), ("b", b, n_v), ("z", z, value_width))
    for tensor_name, tensor, width in token_rows:
        require(
            tensor.shape == (batch, 1, width),
            f"{name}: {tensor_name} must be [{batch}, 1, {width}] (one token per row), got {tuple(tensor.shape)}",
        )
        check_dtype(name, tensor_name, tensor)
    require(
        conv_weight.dim() == 2 and conv_weight.shape[0] == conv_dim and conv_weight.shape[1] >= 2,
        f"{name}: conv_weight must be [{conv_dim}, K] with K >= 2, got {tuple(conv_weight.shape)}",
    )
    kept = conv_weight.shape[1] - 1
    require(
        conv_state.shape == (batch, conv_dim, kept),
        f"{name}: conv_state must be [{batch}, {conv_dim}, {kept}], got {tuple(conv_state.shape)}",
    )
    require(
        recurrent.shape == (batch, n_v, d_k, d_v),
        f"{name}: recurrent must be [{batch}, {n_v}, {d_k}, {d_v}], got {tuple(recurrent.shape)}",
    )
    require(recurrent.dtype == torch.float32, f"{name}: recurrent must be float32, got {recurrent.dtype}")
    head_weights = (("dt_bias", dt_bias, n_v), ("decay_rate", decay_rate, n_v), ("norm_weight", norm_weight, d_v))
    for tensor_name, tensor, size in head_weights:
        require(tensor.shape == (size,), f"{name}: {tensor_name} must be [{size}], got {tuple(tensor.shape)}")
    for tensor_name, tensor in (("conv_state", conv_state), ("conv_weight", conv_weight), ("dt_bias", dt_bias),
                                ("decay_rate", decay_rate), ("norm_weight", norm_weight)):
        check_dtype(name, tensor_name, tensor)
    device = check_device(name, {
        "recurrent": recurrent, "projected": projected, "a": a, "b": b, "z": z, "conv_state": conv_state,
        "conv_weight": conv_weight, "dt_bias": dt_bias, "decay_rate": decay_rate, "norm_weight": norm_weight,
    })

    y = torch.empty(batch, 1, value_width, dtype=torch.float32, device=device)
    if batch == 0:
        return y
    block_k, block_v = triton.next_power_of_2(d_k), triton.next_power_of_2(d_v)
    _decode_step_kernel[(batch * n_v,)](
        projected, a, b, z, conv_state, conv_weight, dt_bias.contiguous(), decay_rate.contiguous(),
        norm_weight.contiguous(), recurrent, y, arrival_counters(device, batch * n_k),
        projected.stride(0), projected.stride(2), a.stride(0), a.stride(2), b.stride(0), b.stride(2), z.stride(0),
        z.stride(2), *conv_state.stride(), *conv_weight.stride(), *recurrent.stride(), d_k**-0.5, l2_eps, rms_eps,
        N_K=n_k, N_V=n_v, D_K=d_k, D_V=d_v, KEPT=kept, GROUPED=bool(grouped), BLOCK_K=block_k, BLOCK_V=block_v,
        BLOCK_KEPT=triton.next_power_of_2(kept), num_warps=_step_warps(block_k, block_v),
        **pdl_options(projected.device),
    )
    return y
