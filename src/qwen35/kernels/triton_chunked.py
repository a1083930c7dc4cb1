"""Gated DeltaNet's chunked delta rule for prefill on the GPU: the chunk loop as one Triton launch.

delta_rule.py's `chunked_gated_delta_rule` (the plain reference, and the maths) has two parts:
everything that does not depend on the running state is batched torch over all chunks at once
(cumulative decays, the unit-lower-triangular solves, the intra-chunk attention), and the rest
is a Python loop over chunks with three small matmuls each. On a GPU that loop costs about six
launches per chunk per layer (an 8K-token prompt: 128 chunks x 30 layers, ~23K launches).

`chunked_delta_rule` keeps the batched torch part (`delta_rule.chunk_terms`, a fixed ~20 launches whatever
the length) and runs the loop as a single launch: program (row * heads + head, column block)
holds state[row, head, :, columns] in registers and walks the chunks in order,

    delta  = values_part[i] - state_reader[i] @ S
    out[i] = decayed_q[i] @ S + intra_attention[i] @ delta
    S      = S * exp(chunk_decay[i]) + key_to_end[i]^T @ delta

writing the outputs straight into [B, H, T, d_v] (padded steps dropped) and the final state into
a new tensor. Nothing waits on the host, so a prefill can be captured in a CUDA graph.

The matmuls run in true fp32 (`input_precision="ieee"`): tf32 would keep only 10 mantissa bits of
each operand, and the rounding of S is carried from chunk to chunk (see `_DOT_PRECISION`).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen35.kernels.delta_rule import chunk_terms
from qwen35.kernels.triton_checks import INTERPRETED, check_delta_rule, require

# Set (by tests/conftest.py) where there is no GPU: the kernel then runs on CPU tensors.
# tl.dot wants every side of its tiles to be at least 16.
_MIN_DOT_SIDE = 16
# A program holds a [d_k, BLOCK_V] state slice, [chunk, d_k] operand tiles and a [chunk, chunk]
# attention tile in registers: past these sizes they would spill.
_MAX_KEY_DIM = 256
_MAX_CHUNK = 128
# Value columns per program, warps and pipeline stages, chosen from ptxas's report for d 128 on sm_90
# (not yet timed on a GPU: `benchmark` times the alternatives). tl.dot in ieee fp32 runs on FMA units
# and holds whole operand rows per thread: ptxas spills 0.7 KiB a thread per chunk at 16 columns and
# 8 warps, 1.6-1.8 KiB at 32 columns / 8 warps or 16 columns / 4 warps, and 18-20 KiB at 32 columns /
# 4 warps (it then drops to 32 registers). One stage: 52 KiB of shared memory; Triton's default of three
# would ask 256 KiB at 32 columns, more than an H100 or H200 SM has. 16 columns give B*H*8 programs.
_BLOCK_V = 16
_NUM_WARPS = 8
_NUM_STAGES = 1
# "ieee": true fp32 products (FMA units). "tf32" rounds both operands of every product to 10 mantissa
# bits (tensor cores): emulated on the CPU for d 128, T 8192 (128 chunks), outputs and the final state
# moved by 4e-4 to 5e-4 of their largest value (fp32: 2e-7 to 5e-7), without growing over the chunks.
# "tf32x3" (three tensor-core products per one, splitting each operand in high and low tf32 halves)
# emulated within 5e-7, as fp32 does: the candidate if ieee proves slow (see `benchmark`).
_DOT_PRECISION = "ieee"


def _validate(q, k, v, g, beta, state, chunk_size) -> None:
    name = "chunked_delta_rule"
    key_dim = q.shape[-1] if q.dim() == 4 else 0
    require(
        key_dim <= _MAX_KEY_DIM,
        f"{name}: d_k {key_dim} is over {_MAX_KEY_DIM}, the most a program's state slice can hold in registers",
    )
    check_delta_rule(name, q, k, v, g, beta, state)
    require(
        isinstance(chunk_size, int) and 1 <= chunk_size <= _MAX_CHUNK,
        f"{name}: chunk_size must be an integer from 1 to {_MAX_CHUNK}, got {chunk_size!r}",
    )


@triton.jit
def _chunk_loop_kernel(
    values_part_ptr, state_reader_ptr, decayed_q_ptr, intra_attention_ptr, key_to_end_ptr, decay_factor_ptr,
    state_ptr, out_ptr, new_state_ptr,
    state_s0, state_s1, state_s2, state_s3,
    heads, length, n_chunks,
    D_K: tl.constexpr, D_V: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
    INTERPRETED_CHUNKS: tl.constexpr,
):
    # Program (row * heads + head, column block). The chunk terms are contiguous
    # [B*H, N, CHUNK, width]; rows past CHUNK and columns past d_k/d_v load as 0, so padded tile
    # rows give delta 0 and add nothing to the state.
    row_head = tl.program_id(0)
    row, head = row_head // heads, row_head % heads
    steps, keys = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_K)
    columns = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    step_mask, key_mask, column_mask = steps < CHUNK, keys < D_K, columns < D_V
    key_tile_mask = step_mask[:, None] & key_mask[None, :]
    value_tile_mask = step_mask[:, None] & column_mask[None, :]

    state = tl.load(
        state_ptr + row * state_s0 + head * state_s1 + keys[:, None] * state_s2 + columns[None, :] * state_s3,
        mask=key_mask[:, None] & column_mask[None, :], other=0.0,
    )
    first_step = row_head.to(tl.int64) * n_chunks * CHUNK  # 64-bit: B*H*T*d can pass 2^31
    key_rows = steps[:, None] * D_K + keys[None, :]
    value_rows = steps[:, None] * D_V + columns[None, :]
    pair_rows = steps[:, None] * CHUNK + steps[None, :]
    out_row = out_ptr + row_head.to(tl.int64) * length * D_V
    # On the GPU the chunk count is a runtime value (one compiled kernel for every prompt length);
    # Triton's interpreter cannot loop to a runtime bound under numpy 2.4, so there it comes as a constant.
    for chunk in range(n_chunks if INTERPRETED_CHUNKS == 0 else INTERPRETED_CHUNKS):
        step0 = first_step + chunk * CHUNK
        reader = tl.load(state_reader_ptr + step0 * D_K + key_rows, mask=key_tile_mask, other=0.0)
        values = tl.load(values_part_ptr + step0 * D_V + value_rows, mask=value_tile_mask, other=0.0)
        delta = values - tl.dot(reader, state, input_precision=PRECISION)

        decayed_q = tl.load(decayed_q_ptr + step0 * D_K + key_rows, mask=key_tile_mask, other=0.0)
        attention = tl.load(
            intra_attention_ptr + step0 * CHUNK + pair_rows, mask=step_mask[:, None] & step_mask[None, :], other=0.0
        )
        out = tl.dot(decayed_q, state, input_precision=PRECISION)
        out = tl.dot(attention, delta, out, input_precision=PRECISION)
        times = chunk * CHUNK + steps
        tl.store(
            out_row + times[:, None] * D_V + columns[None, :], out,
            mask=(step_mask & (times < length))[:, None] & column_mask[None, :],
        )

        key_to_end = tl.load(key_to_end_ptr + step0 * D_K + key_rows, mask=key_tile_mask, other=0.0)
        decay = tl.load(decay_factor_ptr + row_head.to(tl.int64) * n_chunks + chunk)
        state = tl.dot(tl.trans(key_to_end), delta, state * decay, input_precision=PRECISION)
    tl.store(
        new_state_ptr + row_head.to(tl.int64) * D_K * D_V + keys[:, None] * D_V + columns[None, :], state,
        mask=key_mask[:, None] & column_mask[None, :],
    )


def _launch_chunk_loop(
    terms, state, length, block_v=_BLOCK_V, num_warps=_NUM_WARPS, num_stages=_NUM_STAGES, precision=_DOT_PRECISION
):
    """The sequential part as one launch; returns (output [B, H, T, d_v], new final state)."""
    batch, heads, key_dim, value_dim = state.shape
    n_chunks, chunk_size = terms["values_part"].shape[2:4]
    out = torch.empty(batch, heads, length, value_dim, dtype=torch.float32, device=state.device)
    new_state = torch.empty(batch, heads, key_dim, value_dim, dtype=torch.float32, device=state.device)
    block_v = max(_MIN_DOT_SIDE, min(triton.next_power_of_2(value_dim), block_v))
    grid = (batch * heads, triton.cdiv(value_dim, block_v))
    _chunk_loop_kernel[grid](
        terms["values_part"], terms["state_reader"], terms["decayed_q"], terms["intra_attention"],
        terms["key_to_end"], terms["chunk_decay_factor"], state, out, new_state,
        *state.stride(), heads, length, n_chunks,
        D_K=key_dim, D_V=value_dim, CHUNK=chunk_size,
        BLOCK_C=max(_MIN_DOT_SIDE, triton.next_power_of_2(chunk_size)),
        BLOCK_K=max(_MIN_DOT_SIDE, triton.next_power_of_2(key_dim)), BLOCK_V=block_v, PRECISION=precision,
        INTERPRETED_CHUNKS=n_chunks if INTERPRETED else 0, num_warps=num_warps, num_stages=num_stages,
    )
    return out, new_state


def chunked_delta_rule(q, k, v, g, beta, state, chunk_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule over a prompt, a chunk at a time: delta_rule.chunked_gated_delta_rule's contract.

    q, k [B, H, T, d_k] (normed and scaled, key heads matched to value heads), v [B, H, T, d_v],
    g (log-decays <= 0) and beta [B, H, T], state [B, H, d_k, d_v] fp32. Inputs may be bf16/fp16;
    all maths is fp32. Returns (output [B, H, T, d_v] fp32, final state as a new fp32 tensor);
    the given state is left as it was.
    """
    _validate(q, k, v, g, beta, state, chunk_size)
    batch, heads, length, _ = q.shape
    if batch * heads == 0 or length == 0:
        return q.new_zeros(batch, heads, length, v.shape[3], dtype=torch.float32), state.clone()
    terms = {name: term.contiguous() for name, term in chunk_terms(q, k, v, g, beta, chunk_size).items()}
    return _launch_chunk_loop(terms, state, length)


def benchmark(B: int = 1, H: int = 32, T: int = 8192, d: int = 128, device: str = "cuda") -> dict:
    """Milliseconds per call on random inputs (normed q, k; log-decays in [-0.1, 0]): the torch reference,
    ours, the batched chunk terms alone, and the chunk loop alone for each dot precision, column block,
    warp count and stage count (None where it did not compile or fit the GPU); plus the largest output and
    state differences from the reference per precision, relative to their largest values."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from qwen35.kernels.delta_rule import chunked_gated_delta_rule

    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    q = F.normalize(randn(B, H, T, d), dim=-1) * d**-0.5
    k = F.normalize(randn(B, H, T, d), dim=-1)
    v = randn(B, H, T, d)
    g = -torch.rand(B, H, T, generator=generator, device=device) * 0.1
    beta = torch.sigmoid(randn(B, H, T))
    state = randn(B, H, d, d) * 0.1
    inputs = (q, k, v, g, beta, state)

    on_gpu = torch.device(device).type == "cuda"
    results: dict = {"shape": dict(B=B, H=H, T=T, d=d), "device": torch.cuda.get_device_name(device) if on_gpu else device}
    reference_out, reference_state = chunked_gated_delta_rule(*inputs)
    results["reference_ms"] = triton.testing.do_bench(lambda: chunked_gated_delta_rule(*inputs))
    results["triton_ms"] = triton.testing.do_bench(lambda: chunked_delta_rule(*inputs))
    results["chunk_terms_ms"] = triton.testing.do_bench(lambda: chunk_terms(q, k, v, g, beta, 64))
    terms = {name: term.contiguous() for name, term in chunk_terms(q, k, v, g, beta, 64).items()}

    def worst_relative(ours, reference):
        return ((ours - reference).abs().max() / reference.abs().max()).item()

    for precision in ("ieee", "tf32x3", "tf32"):
        for block_v, num_warps in ((16, 4), (16, 8), (32, 4), (32, 8), (64, 8)):
            for num_stages in (1, 2):
                config = (block_v, num_warps, num_stages, precision)
                try:
                    milliseconds = triton.testing.do_bench(lambda: _launch_chunk_loop(terms, state, T, *config))
                except (OutOfResources, CompilationError):
                    milliseconds = None
                results[f"loop_ms_{precision}_block_v{block_v}_warps{num_warps}_stages{num_stages}"] = milliseconds
        out, final_state = _launch_chunk_loop(terms, state, T, precision=precision)
        results[f"{precision}_output_error"] = worst_relative(out, reference_out)
        results[f"{precision}_state_error"] = worst_relative(final_state, reference_state)
    return results
