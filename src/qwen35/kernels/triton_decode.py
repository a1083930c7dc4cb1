"""The small steps between the GPU's matrix products, each fused into one Triton launch.

A decode step on a GPU is bound by how many kernels it launches as much as by the bytes
it reads: torch composes an RMS norm of five kernels, the MoE routing of four, the
weighted sum of the experts with the gated shared expert of six. Each function here is
one launch and has its plain torch form beside it (`*_reference`, the maths the model
file spells out); tests/test_triton_decode.py pins them together. None reads a device
value on the host, so all of them can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen35.errors import Qwen35Error
from qwen35.kernels.triton_arrivals import arrival_counters, last_to_arrive, reset_count
from qwen35.kernels.triton_pdl import pdl_options, wait_for_previous_kernel


def _rows(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[-1] != width:
        raise Qwen35Error(f"expected rows of width {width}, got shape {list(x.shape)}")
    return x.reshape(-1, width).contiguous()


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


# ------------------------------------------------------------------ RMS norm, with the residual add


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, width, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < width
    x = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * width + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(sum_ptr + row * width + offsets, x, mask=mask)
    mean_square = tl.sum(x * x, axis=0) / width
    weight = tl.load(weight_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + offsets, x * (1.0 / tl.sqrt(mean_square + eps)) * weight, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight over the last dimension, float32 out."""
    width = weight.numel()
    rows = _rows(x, width)
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(width)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, rows, weight, out, out, width, eps, HAS_RESIDUAL=False,
                                           BLOCK=block, num_warps=_warps(block), **pdl_options(rows.device))
    return out.reshape(*x.shape[:-1], width)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual)), both float32: the residual stream and the next norm."""
    width = weight.numel()
    rows, other = _rows(x, width), _rows(residual, width)
    if rows.shape != other.shape:
        raise Qwen35Error(f"x {list(x.shape)} and residual {list(residual.shape)} differ in shape")
    total = torch.empty(rows.shape, dtype=torch.float32, device=x.device)
    out = torch.empty_like(total)
    block = triton.next_power_of_2(width)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, other, weight, total, out, width, eps, HAS_RESIDUAL=True,
                                           BLOCK=block, num_warps=_warps(block), **pdl_options(rows.device))
    shape = (*x.shape[:-1], width)
    return total.reshape(shape), out.reshape(shape)


def add_rms_norm_reference(x, residual, weight, eps):
    total = x.float() + residual.float()
    return total, F.rms_norm(total, (total.shape[-1],), weight, eps)


# ------------------------------------------------------------------ SwiGLU


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, width, gate_stride, up_stride, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < width
    gate = tl.load(gate_ptr + row * gate_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + offsets, gate / (1.0 + tl.exp(-gate)) * up, mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, float32. Rows may be strided (column slices of one product's output)."""
    if gate.shape != up.shape:
        raise Qwen35Error(f"gate {list(gate.shape)} and up {list(up.shape)} differ in shape")
    width = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, width), up.reshape(-1, width)
    if gate_rows.stride(-1) != 1:
        gate_rows = gate_rows.contiguous()
    if up_rows.stride(-1) != 1:
        up_rows = up_rows.contiguous()
    out = torch.empty(gate_rows.shape, dtype=torch.float32, device=gate.device)
    block = min(1024, triton.next_power_of_2(width))
    if out.shape[0]:
        _silu_mul_kernel[(out.shape[0], triton.cdiv(width, block))](
            gate_rows, up_rows, out, width, gate_rows.stride(0), up_rows.stride(0), BLOCK=block, num_warps=4,
            **pdl_options(gate_rows.device))
    return out.reshape(gate.shape)


def silu_mul_reference(gate, up):
    return F.silu(gate.float()) * up.float()


# ------------------------------------------------------------------ MoE routing and combining


@triton.jit
def _pick_experts(logits_ptr, weights_ptr, ids_ptr, x_ptr, gate_weight_ptr, row, experts, width, shared_expert,
                  K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, HAS_SHARED: tl.constexpr,
                  WIDTH_BLOCK: tl.constexpr):
    """Row `row`'s top-k of its router logits, weighted by a softmax over the chosen (and the shared slot)."""
    offsets = tl.arange(0, BLOCK)
    logits = tl.load(logits_ptr + row * experts + offsets, mask=offsets < experts, other=float("-inf"),
                     cache_modifier=".cg").to(tl.float32)  # .cg: written by other programs of the router kernel
    picks = tl.arange(0, K_BLOCK)
    chosen = tl.full([K_BLOCK], float("-inf"), dtype=tl.float32)
    chosen_ids = tl.zeros([K_BLOCK], dtype=tl.int64)
    for i in tl.static_range(K):
        best = tl.max(logits, axis=0)
        # The lowest index among equal values, as torch.topk keeps them.
        index = tl.min(tl.where(logits == best, offsets, BLOCK), axis=0)
        chosen = tl.where(picks == i, best, chosen)
        chosen_ids = tl.where(picks == i, index.to(tl.int64), chosen_ids)
        logits = tl.where(offsets == index, float("-inf"), logits)
    # Renormalised top-k of a softmax = a softmax over the chosen logits.
    weights = tl.exp(chosen - tl.max(chosen, axis=0))
    weights = weights / tl.sum(weights, axis=0)
    slots = K + HAS_SHARED
    tl.store(weights_ptr + row * slots + picks, weights, mask=picks < K)
    tl.store(ids_ptr + row * slots + picks, chosen_ids, mask=picks < K)
    if HAS_SHARED:  # one more slot: the shared expert, weighted by its sigmoid gate
        columns = tl.arange(0, WIDTH_BLOCK)
        x = tl.load(x_ptr + row * width + columns, mask=columns < width, other=0.0)
        gate = tl.sum(x * tl.load(gate_weight_ptr + columns, mask=columns < width, other=0.0), axis=0)
        tl.store(weights_ptr + row * slots + K, 1.0 / (1.0 + tl.exp(-gate)))
        tl.store(ids_ptr + row * slots + K, shared_expert.to(tl.int64))


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, x_ptr, gate_weight_ptr, experts, width, shared_expert,
                  K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr, HAS_SHARED: tl.constexpr,
                  WIDTH_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    _pick_experts(logits_ptr, weights_ptr, ids_ptr, x_ptr, gate_weight_ptr, tl.program_id(0).to(tl.int64), experts,
                  width, shared_expert, K, K_BLOCK, BLOCK, HAS_SHARED, WIDTH_BLOCK)


@triton.jit
def _router_route_kernel(x_ptr, router_ptr, logits_ptr, counter_ptr, weights_ptr, ids_ptr, gate_weight_ptr,
                         experts, width, shared_expert, K: tl.constexpr, K_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_SHARED: tl.constexpr, WIDTH_BLOCK: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_H: tl.constexpr, H_STEPS: tl.constexpr, USE_PDL: tl.constexpr):
    """Router logits of BLOCK_E experts for one row; the row's last program to finish then routes it."""
    wait_for_previous_kernel(USE_PDL)
    block, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    expert = block * BLOCK_E + tl.arange(0, BLOCK_E)[:, None]
    acc = tl.zeros([BLOCK_E, BLOCK_H], dtype=tl.float32)
    for step in range(H_STEPS):  # a compile-time count: Triton's interpreter cannot loop to a runtime bound
        columns = step * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        x = tl.load(x_ptr + row * width + columns, mask=columns < width, other=0.0)
        w = tl.load(router_ptr + expert.to(tl.int64) * width + columns, mask=(expert < experts) & (columns < width),
                    other=0.0).to(tl.float32)
        acc += w * x
    tl.store(logits_ptr + row * experts + expert, tl.sum(acc, axis=1)[:, None], mask=expert < experts)
    if last_to_arrive(counter_ptr + row, tl.num_programs(0)):
        _pick_experts(logits_ptr, weights_ptr, ids_ptr, x_ptr, gate_weight_ptr, row, experts, width, shared_expert,
                      K, K_BLOCK, BLOCK, HAS_SHARED, WIDTH_BLOCK)
        reset_count(counter_ptr + row)


def _route_arguments(rows: torch.Tensor, top_k: int, x, shared_gate, shared_expert) -> tuple:
    if rows.dim() != 2 or not 1 <= top_k <= rows.shape[1]:
        raise Qwen35Error(f"cannot pick {top_k} of router logits shaped {list(rows.shape)}")
    has_shared = shared_expert is not None
    if has_shared and (x is None or shared_gate is None or x.shape != (rows.shape[0], shared_gate.numel())):
        raise Qwen35Error("the shared expert's slot needs the input rows [N, H] and its gate weight [H]")
    weights = torch.empty(rows.shape[0], top_k + has_shared, dtype=torch.float32, device=rows.device)
    ids = torch.empty(rows.shape[0], top_k + has_shared, dtype=torch.int64, device=rows.device)
    width = shared_gate.numel() if has_shared else 1
    block = triton.next_power_of_2(rows.shape[1])
    shapes = dict(K=top_k, K_BLOCK=triton.next_power_of_2(top_k), BLOCK=block, HAS_SHARED=has_shared,
                  WIDTH_BLOCK=triton.next_power_of_2(width))
    gate_weight = shared_gate.float().contiguous() if has_shared else weights
    return weights, ids, gate_weight, shared_expert if has_shared else 0, shapes


def moe_route(logits: torch.Tensor, top_k: int, x: torch.Tensor | None = None,
              shared_gate: torch.Tensor | None = None, shared_expert: int | None = None):
    """Router logits [N, E] -> (weights [N, k] float32 summing to 1, expert ids [N, k] int64), best first.

    With x [N, H], the shared expert's gate weight [H] (or [1, H]) and its id, one more slot per row:
    the shared expert, weighted sigmoid(x . shared_gate) (an MoE whose shared expert is stacked
    after the routed ones, ExpertGroup.fuse)."""
    rows = logits.contiguous()
    weights, ids, gate_weight, shared_id, shapes = _route_arguments(rows, top_k, x, shared_gate, shared_expert)
    x_rows = x.float().contiguous() if shared_expert is not None else rows
    if rows.shape[0]:
        _route_kernel[(rows.shape[0],)](rows, weights, ids, x_rows, gate_weight, rows.shape[1], gate_weight.numel(),
                                        shared_id, **shapes,
                                        num_warps=_warps(max(shapes["BLOCK"], shapes["WIDTH_BLOCK"])),
                                        **pdl_options(rows.device))
    return weights, ids


ROUTER_EXPERTS_PER_PROGRAM = 4  # 64 programs share a 256-expert router's 2 MB (fp32, 2048 wide)


def moe_router_route(x: torch.Tensor, router: torch.Tensor, top_k: int, shared_gate: torch.Tensor | None = None,
                     shared_expert: int | None = None):
    """moe_route(x @ router.T, top_k, x, shared_gate, shared_expert) in one launch: x [N, H] float32,
    router [E, H] float32/bfloat16/float16. The programs of a row each compute some experts' logits;
    the last of them to finish picks the row's experts."""
    if router.dim() != 2 or x.dim() != 2 or x.shape[1] != router.shape[1]:
        raise Qwen35Error(f"router weight {list(router.shape)} does not fit input rows {list(x.shape)}")
    x_rows, router = x.float().contiguous(), router.contiguous()
    logits = torch.empty(x.shape[0], router.shape[0], dtype=torch.float32, device=x.device)
    weights, ids, gate_weight, shared_id, shapes = _route_arguments(logits, top_k, x_rows, shared_gate, shared_expert)
    if x.shape[0]:
        grid = (triton.cdiv(router.shape[0], ROUTER_EXPERTS_PER_PROGRAM), x.shape[0])
        _router_route_kernel[grid](x_rows, router, logits, arrival_counters(x.device, x.shape[0]), weights, ids,
                                   gate_weight, router.shape[0], x.shape[1], shared_id, **shapes,
                                   BLOCK_E=ROUTER_EXPERTS_PER_PROGRAM, BLOCK_H=256,
                                   H_STEPS=triton.cdiv(x.shape[1], 256), num_warps=4, **pdl_options(x_rows.device))
    return weights, ids


def moe_route_reference(logits, top_k, x=None, shared_gate=None, shared_expert=None):
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    if shared_expert is None:
        return weights, ids
    gate = torch.sigmoid(F.linear(x.float(), shared_gate.float().reshape(1, -1)))
    return torch.cat([weights, gate], dim=1), torch.cat([ids, torch.full_like(ids[:, :1], shared_expert)], dim=1)


@triton.jit
def _combine_kernel(down_ptr, weights_ptr, shared_ptr, x_ptr, gate_weight_ptr, out_ptr, width,
                    K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK)
    mask = offsets < width
    out = tl.zeros([BLOCK], dtype=tl.float32)
    for slot in tl.static_range(K):
        weight = tl.load(weights_ptr + row * K + slot)
        out += weight * tl.load(down_ptr + (row * K + slot) * width + offsets, mask=mask, other=0.0)
    if HAS_SHARED:
        x = tl.load(x_ptr + row * width + offsets, mask=mask, other=0.0)
        gate = tl.sum(x * tl.load(gate_weight_ptr + offsets, mask=mask, other=0.0), axis=0)
        shared = tl.load(shared_ptr + row * width + offsets, mask=mask, other=0.0)
        out += shared / (1.0 + tl.exp(-gate))
    tl.store(out_ptr + row * width + offsets, out, mask=mask)


def moe_combine(down: torch.Tensor, weights: torch.Tensor, shared: torch.Tensor | None = None,
                x: torch.Tensor | None = None, shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k weights[n, k] * down[n, k] (+ sigmoid(x[n] . shared_gate) * shared[n]): the MoE block's output.

    down [N, k, H] float32, weights [N, k]; shared, x [N, H] and shared_gate [1, H] or [H] together or not at all."""
    if down.dim() != 3 or weights.shape != down.shape[:2]:
        raise Qwen35Error(f"expert outputs {list(down.shape)} do not fit weights {list(weights.shape)}")
    rows, top_k, width = down.shape
    has_shared = shared is not None
    if has_shared and (x is None or shared_gate is None or shared.shape != (rows, width) or x.shape != (rows, width)
                       or shared_gate.numel() != width):
        raise Qwen35Error("the shared expert needs its output, the input rows and its gate weight, each [N, H]")
    down, weights = down.float().contiguous(), weights.float().contiguous()
    out = torch.empty(rows, width, dtype=torch.float32, device=down.device)
    block = triton.next_power_of_2(width)
    shared_args = ((shared.float().contiguous(), x.float().contiguous(), shared_gate.float().contiguous())
                   if has_shared else (down, down, down))
    if rows:
        _combine_kernel[(rows,)](down, weights, *shared_args, out, width, K=top_k, HAS_SHARED=has_shared,
                                 BLOCK=block, num_warps=_warps(block), **pdl_options(down.device))
    return out


def moe_combine_reference(down, weights, shared=None, x=None, shared_gate=None):
    out = (down.float() * weights.float()[..., None]).sum(dim=1)
    if shared is not None:
        out = out + shared.float() * torch.sigmoid(F.linear(x.float(), shared_gate.float().reshape(1, -1)))
    return out
