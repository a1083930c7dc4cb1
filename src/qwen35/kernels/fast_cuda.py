"""The Triton GPU kernels as "fast" mode for weights on a CUDA device.

`install()` registers, for device type "cuda":
- QuantLinear: a matrix-vector product straight from the GGUF blocks for a few rows
  (decode: the weight is read once, as blocks), and for more rows (prefill) the weight
  dequantized to bf16 by a Triton kernel, then a cuBLAS product; F32/F16/BF16 weights
  are used as they are;
- QuantExperts: for a few slots, one launch that reads each slot's expert from the
  blocks (expert ids stay on the device); for more, one grouped tensor-core product over
  the slots sorted by expert that decodes the blocks in its K loop (triton_gguf_dot.py:
  no bf16 copy of the experts, which for the 35B's 256 experts would be 1.6 GB a layer);
- fused LinearGroups of two block types: both products in one launch (linear_pair);
- the embedding rows, dequantized bit-equal to the reference.

model/fused.py's GPU steps also call the decode forms that fold more into one launch:
swiglu_linear / swiglu_experts (the down product reads gate and up; for experts, also the
combining of each token's slots) and linear_add_norm (an output projection with the residual
add and the next RMS norm); each falls back to separate launches where the blocks are not
read by the matrix-vector kernel.

Decode's kernels never read device values on the host, so a whole decode step can be
captured in a CUDA graph (engine/cuda_graphs.py). The plain references of each kernel
are the reference mode's (dequant.py); tests/test_triton_*.py pin them together.
"""

from __future__ import annotations

import functools
import os

import torch
from gguf import GGMLQuantizationType as T

from qwen35.kernels import quant_linear

# Up to this many input rows, a weight is read as blocks by the matrix-vector kernel;
# beyond, dequantizing it once and running a matrix product is faster.
GEMV_MAX_ROWS = 16
# From this many rows (up to GEMV_MAX_ROWS), a plain product reads the blocks on tensor cores at
# float32's accuracy instead (triton_gguf_dot's precise form: the weights decoded once for all rows,
# where the matrix-vector kernel pays per row), and the forms that fold more into the matrix-vector
# launch (pairs, SwiGLU, add and norm) run as separate launches; GEMV_MAX_ROWS + 1 turns that off.
# Unmeasured: gpu_bench.py times batch-8 decode both ways.
PRECISE_DOT_MIN_ROWS = 2
# Expert slots (tokens x experts per token) per expert up to which each slot reads its expert's
# blocks (an expert chosen twice is read twice); beyond, the grouped tensor-core product reads each
# used expert's blocks once per 16 to 64 of its slots. Unmeasured: benchmarks/gpu_kernels.py times both.
EXPERT_GEMV_SLOTS_PER_EXPERT = 2

_DENSE = {int(T.F32): torch.float32, int(T.F16): torch.float16, int(T.BF16): torch.bfloat16}


@functools.cache
def available() -> bool:
    """A CUDA device and Triton, and no QWEN35_NO_FAST_KERNELS in the environment."""
    if os.environ.get("QWEN35_NO_FAST_KERNELS") or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _gguf():
    from qwen35.kernels import triton_gguf

    return triton_gguf


def _dense_weight(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor:
    return blocks.view(_DENSE[type_id]).reshape(*blocks.shape[:-1], in_features)


def matmul(weights: torch.Tensor, type_id: int, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """x [M, in] float32 @ W^T -> [M, out] float32, W as GGUF blocks on the GPU."""
    if type_id in _DENSE:
        weight = _dense_weight(weights, type_id, in_features)
        return x @ weight.t() if weight.dtype == torch.float32 else (x.to(weight.dtype) @ weight.t()).float()
    if PRECISE_DOT_MIN_ROWS <= x.shape[0] <= GEMV_MAX_ROWS:
        from qwen35.kernels import triton_gguf_dot

        return triton_gguf_dot.dot_matmul(weights, type_id, x, in_features, precise=True)
    if x.shape[0] <= GEMV_MAX_ROWS:
        return _gguf().gemv(weights, type_id, x, in_features)
    weight = _gguf().dequantize(weights, type_id, in_features, torch.bfloat16)
    return (x.to(torch.bfloat16) @ weight.t()).float()


def expert_matmul(weights: torch.Tensor, type_id: int, x: torch.Tensor, expert_ids: torch.Tensor,
                  in_features: int, out_features: int) -> torch.Tensor | None:
    """A whole QuantExperts call: x [R, in] float32, expert_ids [S] on the device -> [S, out] float32."""
    from qwen35.kernels import triton_moe

    if type_id in _DENSE:
        experts = _dense_weight(weights, type_id, in_features).to(torch.bfloat16)
        return triton_moe.grouped_expert_matmul(x, experts, expert_ids)
    if expert_ids.numel() <= EXPERT_GEMV_SLOTS_PER_EXPERT * weights.shape[0]:
        return _gguf().expert_gemv(weights, type_id, x, expert_ids, in_features)
    from qwen35.kernels import triton_gguf_dot

    return triton_gguf_dot.grouped_dot_matmul(weights, type_id, x, expert_ids, in_features)


def linear_pair(first: quant_linear.QuantLinear, second: quant_linear.QuantLinear, x: torch.Tensor):
    """first(x) and second(x) side by side from one matrix-vector launch (two block types, as a DeltaNet
    layer's Q6_K qkv and Q4_K gate projections); None where the blocks are not read that way."""
    if not (_reads_blocks(first, x.shape[0]) and _reads_blocks(second, x.shape[0])):
        return None
    return _gguf().gemv(first.blocks, first.type_id, x, first.in_features, second=(second.blocks, second.type_id))


def dense_weight(layer: quant_linear.QuantLinear) -> torch.Tensor | None:
    """A float32/float16/bfloat16 layer's weight [out, in] as it is stored; None for block types."""
    if layer.type_id not in _DENSE:
        return None
    return _dense_weight(layer.blocks, layer.type_id, layer.in_features)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    from qwen35.kernels import triton_decode

    return triton_decode.silu_mul(*gate_up.chunk(2, dim=-1))


def _reads_blocks(layer, rows: int) -> bool:
    """Whether the matrix-vector kernel takes `rows` rows of x for this layer (fast mode, a block type it
    reads, and not a batch that the tensor-core product takes: see PRECISE_DOT_MIN_ROWS)."""
    return (layer.mode == "fast" and _gguf().supports(layer.type_id)
            and rows <= GEMV_MAX_ROWS and rows < PRECISE_DOT_MIN_ROWS)


def _add_norm(add_norm, out: torch.Tensor):
    """(residual + out, its RMS norm) for add_norm = (residual, norm weight, eps), as its own launch."""
    from qwen35.kernels import triton_decode

    residual, weight, eps = add_norm
    return triton_decode.add_rms_norm(residual, out.reshape(residual.shape), weight, eps)


def linear_add_norm(layer: quant_linear.QuantLinear, y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float):
    """(residual + layer(y), its RMS norm) in the layer's matrix-vector launch, for y [M, in], residual
    [M, out]; None where the layer is not read that way."""
    if not _reads_blocks(layer, y.shape[0]):
        return None
    return _gguf().gemv(layer.blocks, layer.type_id, y.float(), layer.in_features,
                        add_norm=(residual.float().contiguous(), weight.float(), eps))


def swiglu_linear(layer: quant_linear.QuantLinear, gate_up: torch.Tensor, add_norm=None):
    """layer(silu(gate) * up) for gate_up [..., 2 * in] (gate, then up): an MLP's down projection.
    Read from the blocks, the SwiGLU is part of the product's launch; otherwise it is one launch before.
    With add_norm = (residual [M, out], norm weight, eps): (residual + that, its RMS norm), also in the
    product's launch where it reads blocks."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    if _reads_blocks(layer, rows.shape[0]):
        norm = None if add_norm is None else (add_norm[0].float().contiguous(), add_norm[1].float(), add_norm[2])
        out = _gguf().gemv(layer.blocks, layer.type_id, rows.float(), layer.in_features, swiglu=True, add_norm=norm)
        return out if add_norm is not None else out.reshape(*gate_up.shape[:-1], layer.out_features)
    out = layer(_silu_mul(gate_up))
    return out if add_norm is None else _add_norm(add_norm, out)


def swiglu_experts(experts: quant_linear.QuantExperts, gate_up: torch.Tensor, expert_ids: torch.Tensor,
                   slot_weights: torch.Tensor | None = None, add_norm=None):
    """experts(silu(gate) * up, expert_ids) for gate_up [N, k, 2 * in], one row per slot: the routed
    experts' down projection, with the SwiGLU in the product's launch where the slots read blocks.
    With slot_weights [N, k]: each token's slots weighted and summed, [N, out] (the MoE's output), and
    with add_norm = (residual [N, out], norm weight, eps) as well: (residual + that, its RMS norm), all
    in that launch."""
    slots = expert_ids.numel()
    if (experts.mode == "fast" and _gguf().supports(experts.type_id)
            and slots <= EXPERT_GEMV_SLOTS_PER_EXPERT * experts.n_experts):
        norm = None if add_norm is None else (add_norm[0].float().contiguous(), add_norm[1].float(), add_norm[2])
        out = _gguf().expert_gemv(experts.blocks, experts.type_id, gate_up.reshape(slots, -1).float(),
                                  expert_ids.reshape(-1), experts.in_features, swiglu=True,
                                  slot_weights=None if slot_weights is None else slot_weights.float(), add_norm=norm)
        return out if slot_weights is not None else out.reshape(*expert_ids.shape, experts.out_features)
    down = experts(_silu_mul(gate_up), expert_ids)
    if slot_weights is None:
        return down
    from qwen35.kernels import triton_decode

    combined = triton_decode.moe_combine(down, slot_weights)
    return combined if add_norm is None else _add_norm(add_norm, combined)


def dequantize_rows(blocks: torch.Tensor, type_id: int, in_features: int) -> torch.Tensor | None:
    """Embedding rows [N, row_bytes] -> [N, in] float32, bit-equal to the reference; None for other types."""
    if type_id in _DENSE:
        return _dense_weight(blocks, type_id, in_features).float()
    if not _gguf().supports(type_id):
        return None
    return _gguf().dequantize(blocks, type_id, in_features, torch.float32)


def install() -> bool:
    """Register the kernels above for weights on CUDA; False (nothing registered) where they cannot run."""
    if not available():
        return False
    gguf_kernels = _gguf()
    quant_linear.register_fast_dequantizer(dequantize_rows, device="cuda")
    quant_linear.register_fast_pair_kernel(linear_pair, device="cuda")
    for type_id in (*_DENSE, *gguf_kernels.SUPPORTED_TYPES):
        quant_linear.register_fast_kernel(type_id, matmul, device="cuda")
        quant_linear.register_fast_expert_kernel(type_id, expert_matmul, device="cuda")
    return True
