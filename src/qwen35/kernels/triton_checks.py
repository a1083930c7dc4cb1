"""Argument checks shared by the Triton kernels' wrappers: shapes, dtypes and devices, each
failing with one readable Qwen35Error, none reading a device value (the calls are captured in
CUDA graphs)."""

from __future__ import annotations

import os

import torch

from qwen35.errors import Qwen35Error

# Triton's interpreter (tests without a GPU) runs the kernels on CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise Qwen35Error(message)


def check_device(name: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """The one device of `tensors`, a GPU (or the CPU under the interpreter)."""
    device = next(iter(tensors.values())).device
    for tensor_name, tensor in tensors.items():
        require(tensor.device == device, f"{name}: {tensor_name} is on {tensor.device}, the others on {device}")
    require(
        device.type == "cuda" or INTERPRETED,
        f"{name}: the Triton kernels need CUDA tensors (got {device}; TRITON_INTERPRET=1 runs them on the CPU)",
    )
    return device


def check_dtype(name: str, tensor_name: str, tensor: torch.Tensor, allowed=INPUT_DTYPES) -> None:
    require(tensor.dtype in allowed, f"{name}: {tensor_name} must be float32 or bfloat16/float16, got {tensor.dtype}")


def check_delta_rule(name: str, q, k, v, g, beta, state) -> tuple[int, int, int, int, int]:
    """The delta rule's operands (kernels/delta_rule.py's layouts): (batch, heads, length, d_k, d_v)."""
    require(q.dim() == 4, f"{name}: q must be [B, H, T, d_k], got {tuple(q.shape)}")
    batch, heads, length, key_dim = q.shape
    require(k.shape == q.shape, f"{name}: k must be shaped like q {tuple(q.shape)}, got {tuple(k.shape)}")
    require(
        v.dim() == 4 and v.shape[:3] == q.shape[:3],
        f"{name}: v must be [{batch}, {heads}, {length}, d_v], got {tuple(v.shape)}",
    )
    value_dim = v.shape[3]
    require(key_dim >= 1 and value_dim >= 1, f"{name}: head sizes must be positive, got {key_dim} and {value_dim}")
    for gate_name, gate in (("g", g), ("beta", beta)):
        require(gate.shape == q.shape[:3], f"{name}: {gate_name} must be [{batch}, {heads}, {length}], "
                                           f"got {tuple(gate.shape)}")
    require(
        state.shape == (batch, heads, key_dim, value_dim),
        f"{name}: state must be [{batch}, {heads}, {key_dim}, {value_dim}], got {tuple(state.shape)}",
    )
    require(state.dtype == torch.float32, f"{name}: state must be float32, got {state.dtype}")
    for tensor_name, tensor in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        check_dtype(name, tensor_name, tensor)
    check_device(name, {"state": state, "q": q, "k": k, "v": v, "g": g, "beta": beta})
    return batch, heads, length, key_dim, value_dim
