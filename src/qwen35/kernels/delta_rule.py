"""The gated delta rule (Gated DeltaNet's recurrence), in a recurrent and a chunked form.

Per head, with state S [d_k, d_v] and, for each token, a query q, key k, value v,
log-decay g (<= 0) and write strength beta in (0, 1):

    S = exp(g) * S
    delta = beta * (v - S^T k)
    S = S + k delta^T
    o = S^T q

`recurrent_gated_delta_rule` runs that loop token by token (decode, and the plain
reference). `chunked_gated_delta_rule` computes the same thing a chunk of tokens
at a time: inside a chunk the deltas solve one unit-lower-triangular system, so
prefill costs a few matmuls per chunk instead of a loop per token.

All tensors are head-major and fp32: q, k [B, H, T, d_k]; v [B, H, T, d_v];
g, beta [B, H, T]; state [B, H, d_k, d_v]. Queries and keys come already
normalised and scaled, with key heads already matched to value heads.

`gated_delta_rule` runs each form as one C++ call per layer where the fast CPU
kernels are available (csrc/delta_rule_cpu.cpp, csrc/delta_rule_chunked_cpu.cpp);
the Python forms here stay their reference (tests/test_delta_rule.py pins them
together).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-by-token form. Returns (output [B, H, T, d_v], final state)."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        # Broadcast-and-sum rather than batched matmuls: one token's products are tiny,
        # and tiny matmuls pay a thread start-up each.
        predicted = (state * k[:, :, t, :, None]).sum(dim=-2)  # S^T k, [B, H, d_v]
        delta = beta[:, :, t, None] * (v[:, :, t] - predicted)
        state = state + k[:, :, t, :, None] * delta[:, :, None, :]
        outputs.append((state * q[:, :, t, :, None]).sum(dim=-2))
    return torch.stack(outputs, dim=2), state


def chunk_terms(q, k, v, g, beta, chunk_size: int = CHUNK_SIZE) -> dict[str, torch.Tensor]:
    """Every chunk's state-independent terms, batched over all chunks (the chunked form's parallel part).

    Within a chunk, with G the running sum of g and S0 the state at its start:
        S_t = exp(G_t) S0 + sum_{s<=t} exp(G_t - G_s) k_s delta_s^T
    so the deltas satisfy (I + A) delta = beta*v - beta*exp(G)*(K S0), where
    A[t, s] = beta_t exp(G_t - G_s) k_t.k_s for s < t; both right-hand parts are solved here once.
    Returns fp32: values_part [B, H, N, C, d_v]; state_reader, decayed_q, key_to_end [B, H, N, C, d_k];
    intra_attention [B, H, N, C, C]; chunk_decay_factor [B, H, N] (exp of a chunk's summed log-decay).
    """
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    batch, heads, length, _ = q.shape
    pad = -length % chunk_size
    if pad:
        # Padded steps have g = 0 (no decay), beta = 0 and k = 0: they change nothing.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    n_chunks = q.shape[2] // chunk_size
    q, k, v, g, beta = (x.reshape(batch, heads, n_chunks, chunk_size, *x.shape[3:]) for x in (q, k, v, g, beta))

    log_decay = g.cumsum(dim=-1)  # G, [B, H, N, C]
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # exp(G_t - G_s) for s <= t, and 0 above the diagonal (masked before exp: no overflow).
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    k_beta = k * beta[..., None]
    system = ((k_beta @ k.transpose(-1, -2)) * pair_decay).tril(-1)
    system = system + torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    decay = log_decay.exp()[..., None]
    chunk_decay = log_decay[..., -1]  # G at the chunk's last step, [B, H, N]
    return {
        # delta = values_part - state_reader @ S0
        "values_part": torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True),
        "state_reader": torch.linalg.solve_triangular(system, k_beta * decay, upper=False, unitriangular=True),
        "intra_attention": (q @ k.transpose(-1, -2)) * pair_decay,
        "decayed_q": q * decay,
        "key_to_end": k * (chunk_decay[..., None] - log_decay).exp()[..., None],
        "chunk_decay_factor": chunk_decay.exp(),
    }


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-parallel form (`chunk_terms`, then one short step per chunk); the recurrent form's
    results up to rounding."""
    batch, heads, length, _ = q.shape
    terms = chunk_terms(q, k, v, g, beta, chunk_size)
    outputs = []
    for i in range(terms["values_part"].shape[2]):
        delta = terms["values_part"][:, :, i] - terms["state_reader"][:, :, i] @ state
        outputs.append(terms["decayed_q"][:, :, i] @ state + terms["intra_attention"][:, :, i] @ delta)
        state = (state * terms["chunk_decay_factor"][:, :, i, None, None]
                 + terms["key_to_end"][:, :, i].transpose(-1, -2) @ delta)
    output = torch.stack(outputs, dim=2).reshape(batch, heads, -1, v.shape[-1])
    return output[:, :, :length], state


@functools.cache
def fast_ops():
    """The C++ kernels (torch.ops.qwen35_ggml) where fast_cpu can build them here, else None."""
    from qwen35.kernels import fast_cpu

    return torch.ops.qwen35_ggml if fast_cpu.available() else None


def gated_delta_rule(q, k, v, g, beta, state, chunk_size: int = CHUNK_SIZE):
    """The form that suits the length: recurrent for a token or two, chunked otherwise."""
    fast = fast_ops() if q.device.type == "cpu" else None
    if q.shape[2] <= 2:
        if fast is not None:
            return fast.recurrent_delta_rule(q, k, v, g, beta, state)
        return recurrent_gated_delta_rule(q, k, v, g, beta, state)
    if fast is not None:
        return fast.chunked_delta_rule(q, k, v, g, beta, state, chunk_size)
    return chunked_gated_delta_rule(q, k, v, g, beta, state, chunk_size)
