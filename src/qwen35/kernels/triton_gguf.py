"""Triton kernels that compute straight from GGUF quantized blocks (no re-packing): the public calls.

The blocks and how kernels read them are described in triton_gguf_blocks.py; `dequantize`
here is bit-equal to the plain reference (`qwen35.kernels.dequant`) in float32.

`gemv` and `expert_gemv`, decode's matrix-vector products with what they fold into the same
launch (a second weight, SwiGLU, the MoE's combining of expert slots, the residual add and the
next RMS norm), check their arguments here and launch the kernel of triton_gguf_gemv.py, which
holds that kernel, its launch shapes and why it is written as it is.

Without a GPU, Triton's interpreter runs the kernels on CPU tensors (set TRITON_INTERPRET=1
before importing this module).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen35.errors import Qwen35Error
from qwen35.kernels.triton_gguf_blocks import (  # noqa: F401  (SUPPORTED_TYPES, supports, random_blocks: this module's API too)
    HAS_MIN_TYPES, STEP, STEP_ELEMENTS, SUPPORTED_TYPES, aligned, check_blocks, check_expert_ids, fetch_q6_k,
    load_step, part_elements, q6_k_quarter, random_blocks, supports, weights_of,
)
from qwen35.kernels.triton_gguf_gemv import launch_gemv
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel

MAX_GEMV_ROWS = 16  # the most rows of x one gemv call takes (decode-sized batches)

# ---------------------------------------------------------------- kernels


@triton.jit
def _store_weights(out_ptr, row, row_ok, col, in_features, w):
    """Stores float32 weights [N, G, L] at columns col [1, G, L] as the output's dtype."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        # Round to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates.
        # (Weights from blocks with finite fp16 scales are finite, so no NaN payload to keep.)
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        w = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    tl.store(out_ptr + row * in_features + col, w.to(out_ptr.dtype.element_ty), mask=row_ok & (col < in_features))


@triton.jit
def _dequantize_kernel(
    w_ptr, out_ptr, n_rows, row_bytes, in_features, n_blocks,
    QTYPE: tl.constexpr, HAS_MIN: tl.constexpr, G: tl.constexpr, L: tl.constexpr, P: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    pid_n = tl.program_id(0)
    step = tl.program_id(1)
    row = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[:, None, None]
    row_ok = row < n_rows
    rows = w_ptr + row * row_bytes
    # The planes are interleaved back into element order (join, then reshape) so that the
    # stores are contiguous.
    col = step * STEP + part_elements(QTYPE, G, L)[None, :, :]
    if QTYPE == 14:
        low_a, low_b, high, d, block, mask = fetch_q6_k(rows, step, n_blocks, row_ok, G, L)
        for quarter in tl.static_range(4):
            q0, q1, q2, q3, scale, offset = q6_k_quarter(low_a, low_b, high, d, block, mask, quarter, G)
            w = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q1, scale, offset, HAS_MIN))
            _store_weights(out_ptr, row, row_ok, col + 32 * quarter, in_features, tl.reshape(w, (BLOCK_N, G, L)))
    else:
        q0, q1, q2, q3, scale, offset = load_step(rows, step, n_blocks, row_ok, QTYPE, G, L)
        if P == 4:  # element 4w + 2a + b
            even = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q2, scale, offset, HAS_MIN))
            odd = tl.join(weights_of(q1, scale, offset, HAS_MIN), weights_of(q3, scale, offset, HAS_MIN))
            w = tl.join(even, odd)
        else:
            w = tl.join(weights_of(q0, scale, offset, HAS_MIN), weights_of(q1, scale, offset, HAS_MIN))
        _store_weights(out_ptr, row, row_ok, col, in_features, tl.reshape(w, (BLOCK_N, G, L)))


# ---------------------------------------------------------------- host side


def _check_x(x: torch.Tensor, in_features: int, blocks: torch.Tensor, max_rows: int | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != in_features:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise Qwen35Error(f"x must be a float32 tensor [rows, {in_features}], got {shape}")
    if max_rows is not None and not 1 <= x.shape[0] <= max_rows:
        raise Qwen35Error(f"gemv takes 1 to {max_rows} rows of x, got {x.shape[0]}")
    if x.device != blocks.device:
        raise Qwen35Error(f"x is on {x.device} but the weight blocks are on {blocks.device}")


def dequantize(
    blocks: torch.Tensor, type_id: int, in_features: int, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Blocks [..., rows, row_bytes] -> weights [..., rows, in_features] of `dtype`.

    In float32 the result is bit-equal to `qwen35.kernels.dequant.dequantize`.
    """
    n_blocks, row_bytes, (groups, length, planes) = check_blocks(blocks, type_id, in_features, 1, 8)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Qwen35Error(f"dequantize makes float32, float16 or bfloat16, not {dtype}")
    out = torch.empty((*blocks.shape[:-1], in_features), dtype=dtype, device=blocks.device)
    n_rows = blocks.numel() // row_bytes
    if n_rows == 0:
        return out
    n_steps = triton.cdiv(in_features, STEP_ELEMENTS)
    # Triton's interpreter pays per program, not per element: there, far fewer, larger programs.
    block_n = 4 if blocks.is_cuda else 64
    grid = (triton.cdiv(n_rows, block_n), n_steps)
    qtype = int(type_id)
    _dequantize_kernel[grid](
        aligned(blocks, type_id), out, n_rows, row_bytes, in_features, n_blocks,
        QTYPE=qtype, HAS_MIN=qtype in HAS_MIN_TYPES, G=groups, L=length, P=planes, BLOCK_N=block_n,
        num_warps=4, enable_fp_fusion=False,  # a * q + b rounded twice, as the reference does
        **pdl_options(out.device),
    )
    return out


def _check_add_norm(add_norm, rows: int, width: int, device: torch.device) -> None:
    if add_norm is None:
        return
    residual, weight, _ = add_norm
    if (not isinstance(residual, torch.Tensor) or residual.dtype != torch.float32 or residual.shape != (rows, width)
            or not residual.is_contiguous() or not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32
            or weight.numel() != width or residual.device != device or weight.device != device):
        raise Qwen35Error(f"add_norm takes (residual, norm weight, eps): a contiguous float32 residual [{rows}, "
                          f"{width}] and a float32 weight [{width}], on {device}")


def gemv(blocks: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int, swiglu: bool = False,
         second: tuple[torch.Tensor, int] | None = None,
         add_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None):
    """x [M, in_features] float32 (M <= 16) times W^T -> [M, out_features] float32; W is read once.

    With swiglu, x is [M, 2 * in_features], gate then up, and the product is silu(gate) * up times W^T
    (an MLP's down projection without a launch for the SwiGLU).
    With second = (blocks2, type_id2), a second weight (of any supported type) on the same x, in the
    same launch: -> [M, out_features + out_features2], its outputs after the first's.
    With add_norm = (residual [M, out], norm weight [out], eps): -> (product + residual, its RMS norm),
    also in the same launch (a layer's output projection, residual add and next norm)."""
    check_blocks(blocks, type_id, in_features, 2, 2)
    _check_x(x, in_features * (2 if swiglu else 1), blocks, MAX_GEMV_ROWS)
    if second is not None and (not isinstance(second, tuple) or len(second) != 2
                               or not isinstance(second[0], torch.Tensor) or second[0].device != blocks.device):
        raise Qwen35Error(f"second must be (blocks, type id) with the blocks on {blocks.device}")
    if second is not None and add_norm is not None:
        raise Qwen35Error("gemv takes a second weight or add_norm, not both")
    _check_add_norm(add_norm, x.shape[0], blocks.shape[0], blocks.device)
    x = x.contiguous()
    block_m = triton.next_power_of_2(x.shape[0])
    return launch_gemv(blocks, type_id, x, in_features, blocks.shape[0], 1, None, 0, 0, block_m, x.shape[0], swiglu,
                       second=second, add_norm=add_norm)


def expert_gemv(
    blocks: torch.Tensor, type_id: int, x: torch.Tensor, expert_ids: torch.Tensor, in_features: int,
    swiglu: bool = False, slot_weights: torch.Tensor | None = None,
    add_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
):
    """Slot s computes x[s // (S // R)] . W[expert_ids[s]]^T: blocks [E, out, row_bytes], x [R, in],
    expert_ids [S] (on the device; read by the kernel, never by the host) -> [S, out] float32.
    With swiglu, x is [R, 2 * in] (gate, up) and silu(gate) * up is the input, as for gemv.
    With slot_weights [N, S / N] (float32, each token's consecutive slots), the slots are also combined
    in the same launch: -> [N, out], sum_j slot_weights[t, j] * (slot t * S / N + j) (an MoE's output);
    and with add_norm = (residual [N, out], norm weight [out], eps) too: -> (that + residual, its RMS norm).

    An expert id outside [0, E) gives NaNs in its slot instead of reading out of bounds.
    """
    check_blocks(blocks, type_id, in_features, 3, 3)
    _check_x(x, in_features * (2 if swiglu else 1), blocks, None)
    slots = check_expert_ids(expert_ids, blocks, x.shape[0])
    if slot_weights is not None and (
            not isinstance(slot_weights, torch.Tensor) or slot_weights.dtype != torch.float32
            or slot_weights.dim() != 2 or slot_weights.numel() != slots or slot_weights.device != blocks.device):
        raise Qwen35Error(f"slot_weights must be a float32 tensor [tokens, slots per token] holding the {slots} "
                          f"slots' weights, on {blocks.device}")
    n_experts, n_out = blocks.shape[0], blocks.shape[1]
    if add_norm is not None and slot_weights is None:
        raise Qwen35Error("expert_gemv's add_norm applies to combined slots: it needs slot_weights")
    _check_add_norm(add_norm, 0 if slot_weights is None else slot_weights.shape[0], n_out, blocks.device)
    x = x.contiguous()
    return launch_gemv(
        blocks, type_id, x, in_features, n_out, slots, expert_ids.contiguous(), n_experts,
        n_out * blocks.shape[2], 1, 1, swiglu, None if slot_weights is None else slot_weights.contiguous(),
        add_norm=add_norm,
    )


# ---------------------------------------------------------------- benchmark


def benchmark_gemv(type_id: int, out_features: int, in_features: int, device: str = "cuda", rows: int = 1) -> dict:
    """Median time of one gemv over random valid blocks, and the bytes it reads per second.

    "ms" is triton.testing.do_bench's median (launch overhead included when the kernel is
    shorter than the host's launch path); "graph_ms" replays the call from a CUDA graph, as
    decode runs it, which also checks that the call captures without a host sync.
    """
    blocks = random_blocks(type_id, (out_features,), in_features, device=device)
    x = torch.randn(rows, in_features, dtype=torch.float32, device=device)
    bytes_read = blocks.numel() + x.numel() * 4

    def call():
        return gemv(blocks, type_id, x, in_features)

    ms = triton.testing.do_bench(call, return_mode="median")
    graph_ms = triton.testing.do_bench_cudagraph(call, return_mode="median")
    return {"ms": ms, "GB/s": bytes_read / (ms * 1e-3) / 1e9, "graph_ms": graph_ms,
            "graph_GB/s": bytes_read / (graph_ms * 1e-3) / 1e9}
