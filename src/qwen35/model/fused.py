"""The network's steps fused per device, behind one interface.

`fused_steps(x)` gives the fused forms for the device `x` is on: the C++ calls on the CPU
(kernels/csrc, through torch.ops.qwen35_ggml and kernels/fast_cpu.py) or the Triton launches
on a GPU (kernels/triton_*.py); None where neither runs, and then the model file's plain maths
runs. That plain maths is each fused form's reference (the tests pin them together). A
method may also return None to decline one call (the CPU's MLP kernels need packed weights).

Both forms of a step take the same arguments. They differ in what they leave behind: the CPU's
DeltaNet step gives new state tensors, the GPU's writes them in place (a CUDA graph replays over
fixed addresses), into copies unless the cache is pinned (`DeltaNetState.in_place`).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from qwen35.engine.quantized_kv import BLOCK_TYPES, TypedAttentionKV
from qwen35.kernels import fast_cpu, fast_cuda
from qwen35.kernels.delta_rule import fast_ops, gated_delta_rule

# Tensors on these device types take the GPU's steps. Tests add "cpu" to run them in Triton's
# interpreter on a machine without a GPU (tests/test_fast_cuda.py).
GPU_DEVICE_TYPES = {"cuda"}
L2_NORM_EPS = 1e-6
# The ggml type ids of llama.cpp's K/V cache types, as the CPU's attention_decode_blocks takes them.
_GGML_KV_TYPES = {"f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
                  "bf16": GGMLQuantizationType.BF16, **BLOCK_TYPES}
# The cache types CpuSteps.attention_decode reads and writes (K and V each any one of them): all of
# TypedAttentionKV's, so that no CPU store takes the plain path, which dequantizes the whole cache.
CPU_BLOCK_KV_TYPES = frozenset(_GGML_KV_TYPES)


def fused_steps(x: torch.Tensor):
    if x.device.type in GPU_DEVICE_TYPES and fast_cuda.available():
        return GPU_STEPS
    if x.device.type == "cpu" and fast_ops() is not None:
        return CPU_STEPS
    return None


def _deltanet_shape(c) -> tuple:
    return (c.linear_num_key_heads, c.linear_key_head_dim, c.linear_num_value_heads, c.linear_value_head_dim,
            c.value_head_order == "grouped")


class CpuSteps:
    """One C++ call per step (csrc/layer_ops.cpp, attention_decode.cpp, deltanet_*.cpp, mlp_cpu.cpp)."""

    def rms_norm(self, x, scale, eps):
        return fast_ops().rms_norm(x.float(), scale, eps)

    def add_rms_norm(self, x, residual, scale, eps):
        return fast_ops().add_rms_norm(x.float(), residual.float(), scale, eps)

    def attention_decode(self, kv, q_gate, k, v, q_norm, k_norm, cos, sin, *rest):
        inputs = (q_gate.float(), k.float(), v.float(), q_norm, k_norm, cos, sin, *kv.storage, *rest)
        if isinstance(kv, TypedAttentionKV):  # K and V each of its own cache type
            key_type, value_type = int(_GGML_KV_TYPES[kv.type_k]), int(_GGML_KV_TYPES[kv.type_v])
            return fast_ops().attention_decode_blocks(*inputs, key_type, value_type)
        return fast_ops().attention_decode(*inputs)

    def deltanet_decode(self, layer, projected, a, b, z, state):
        c = layer.c
        y, conv, recurrent = fast_ops().deltanet_decode(
            projected, a, b, z, state.conv, layer.conv_weight, layer.dt_bias, layer.decay_rate, layer.norm,
            state.recurrent, *_deltanet_shape(c), L2_NORM_EPS, c.rms_norm_eps,
        )
        state.store(conv, recurrent)
        return y

    def deltanet_prefill(self, layer, projected, a, b, z, state):
        c = layer.c
        ops = fast_ops()
        mixed, conv = ops.causal_conv_silu(projected, state.conv, layer.conv_weight)
        state.store(conv=conv)
        n_k, d_k, n_v, d_v, grouped = _deltanet_shape(c)
        q, k, v, g, beta = ops.deltanet_inputs(mixed, a, b, layer.dt_bias, layer.decay_rate, n_k, d_k, n_v, d_v,
                                               grouped, L2_NORM_EPS)
        out, recurrent = gated_delta_rule(q, k, v, g, beta, state.recurrent)
        state.store(recurrent=recurrent)
        return ops.gated_rms_norm(out, z, layer.norm, c.rms_norm_eps)

    def project_add_norm(self, projection, y, x, scale, eps):
        return None  # the C++ add_rms_norm after the projection is already one call

    def mlp_add_norm(self, mlp, h, x, scale, eps):
        return None

    def mlp(self, mlp, x):
        fused = fast_cpu.dense_mlp(x.reshape(-1, x.shape[-1]).float(), mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        return None if fused is None else fused.reshape(*x.shape[:-1], -1)

    def moe(self, moe, x, logits, with_shared: bool):
        logits = moe.router(x) if logits is None else logits
        shared = moe.shared is not None and with_shared
        layers = (moe.shared.gate_proj, moe.shared.up_proj, moe.shared.down_proj) if shared else None
        return fast_cpu.sparse_moe(x, logits, moe.top_k, (moe.gates, moe.ups, moe.downs), layers,
                                   moe.shared_gate if shared else None)


class GpuSteps:
    """Triton launches (kernels/triton_*.py), products through fast_cuda's kernels. At decode the products
    also take what follows them (SwiGLU, the MoE's combining, the residual add and next norm)."""

    @staticmethod
    def _kernels():
        from qwen35.kernels import triton_decode

        return triton_decode

    def rms_norm(self, x, scale, eps):
        return self._kernels().rms_norm(x, scale, eps)

    def add_rms_norm(self, x, residual, scale, eps):
        return self._kernels().add_rms_norm(x, residual, scale, eps)

    def attention_decode(self, kv, q_gate, k, v, q_norm, k_norm, cos, sin, *rest):
        if hasattr(kv, "page_table"):  # engine/paged_kv.py
            from qwen35.kernels.triton_paged_attention import paged_attention_decode_

            return paged_attention_decode_(q_gate, k, v, q_norm, k_norm, cos, sin, *kv.page_pool, kv.page_table,
                                           *rest, key_type=kv.type_k, value_type=kv.type_v)
        from qwen35.kernels.triton_attention import attention_decode_

        return attention_decode_(q_gate, k, v, q_norm, k_norm, cos, sin, *kv.storage, *rest)

    def deltanet_decode(self, layer, projected, a, b, z, state):
        from qwen35.kernels.triton_deltanet import deltanet_decode_

        c = layer.c
        if not state.in_place:  # a snapshot may hold these tensors: write into copies
            state.conv, state.recurrent = state.conv.clone(), state.recurrent.clone()
        return deltanet_decode_(
            projected, a, b, z, state.conv, layer.conv_weight, layer.dt_bias, layer.decay_rate, layer.norm,
            state.recurrent, *_deltanet_shape(c), L2_NORM_EPS, c.rms_norm_eps,
        )

    def deltanet_prefill(self, layer, projected, a, b, z, state):
        from qwen35.kernels.triton_chunked import chunked_delta_rule

        q, k, v, g, beta = layer.delta_rule_inputs(layer.causal_conv(projected, state), a, b)
        out, recurrent = chunked_delta_rule(q, k, v, g, beta, state.recurrent)
        state.store(recurrent=recurrent)
        return layer.gated_norm(out, z)

    def project_add_norm(self, projection, y, x, scale, eps):
        """The projection's matrix-vector launch adds the residual and norms (decode: a few rows)."""
        fused = fast_cuda.linear_add_norm(projection, y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]),
                                          scale, eps)
        return None if fused is None else tuple(t.reshape(x.shape) for t in fused)

    def mlp_add_norm(self, mlp, h, x, scale, eps):
        """A one-token MoE step (shared expert stacked) or a dense MLP's decode: the last product's launch
        also combines, adds the residual and norms."""
        rows, residual = h.reshape(-1, h.shape[-1]).float(), x.reshape(-1, x.shape[-1])
        if hasattr(mlp, "gates_ups"):  # SparseMoE
            if mlp.shared_expert is None or rows.shape[0] != 1:
                return None
            fused = self._stacked_moe(mlp, rows, add_norm=(residual, scale, eps))
        else:
            gate_up = mlp.gate_up_proj.joined(rows)
            if gate_up is None:
                return None
            fused = fast_cuda.swiglu_linear(mlp.down_proj, gate_up, add_norm=(residual, scale, eps))
        return tuple(t.reshape(x.shape) for t in fused)

    def mlp(self, mlp, x):
        gate_up = mlp.gate_up_proj.joined(x)  # gate and up in one launch (fuse_for_gpu), read whole by down
        if gate_up is None:
            gate, up = mlp.gate_up_proj(x)
            return mlp.down_proj(self._kernels().silu_mul(gate, up))
        return fast_cuda.swiglu_linear(mlp.down_proj, gate_up)

    def _route(self, moe, x, logits, with_shared_slot: bool):
        """(weights, ids) of each row's experts: with logits None, the router's product and the routing
        in one launch where the router is a plain float weight; with_shared_slot adds the shared expert."""
        kernels = self._kernels()
        shared = (moe.shared_gate, moe.shared_expert) if with_shared_slot else ()
        router = fast_cuda.dense_weight(moe.router) if logits is None else None
        if router is not None:
            return kernels.moe_router_route(x, router, moe.top_k, *shared)
        logits = moe.router(x) if logits is None else logits
        return kernels.moe_route(logits, moe.top_k, *((x,) + shared if shared else ()))

    def _stacked_moe(self, moe, x, add_norm=None):
        """One token through an MoE whose shared expert is stacked after the routed ones (SparseMoE.fuse):
        the routing with the router's product, gate and up, and the down product that combines the
        slots (and with add_norm adds the residual and norms): three launches. (For more tokens, each
        slot reads its expert once, so the shared expert is better read once, as a plain MLP.)"""
        weights, ids = self._route(moe, x, None, with_shared_slot=True)
        gate_up = moe.gates_ups.joined(x, ids)
        return fast_cuda.swiglu_experts(moe.downs_group.fused, gate_up, ids, slot_weights=weights, add_norm=add_norm)

    def moe(self, moe, x, logits, with_shared: bool):
        kernels = self._kernels()
        if moe.shared_expert is not None and with_shared and x.shape[0] == 1:
            return self._stacked_moe(moe, x)
        top_weights, top_experts = self._route(moe, x, logits, with_shared_slot=False)
        gate_up = moe.gates_ups.joined(x, top_experts)
        if gate_up is None:
            gate, up = moe.gates_ups(x, top_experts)
            down = moe.downs(kernels.silu_mul(gate, up), top_experts)
        else:
            down = fast_cuda.swiglu_experts(moe.downs, gate_up, top_experts)
        if moe.shared is not None and with_shared:
            return kernels.moe_combine(down, top_weights, moe.shared(x), x, moe.shared_gate)
        return kernels.moe_combine(down, top_weights)


CPU_STEPS, GPU_STEPS = CpuSteps(), GpuSteps()
