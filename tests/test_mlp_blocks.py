"""The one-call MLP blocks (fast_cpu.sparse_moe and dense_mlp, csrc/mlp_cpu.cpp) against their plain
lines: the same fast matmul kernels (bit-equal per row), so only the glue's rounding differs
(softmax, SiLU, the weighted sums), and against the exact fp32 reference path."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

import qwen35
from qwen35.kernels import fast_cpu
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear, set_mode
from qwen35.model.qwen35 import SparseMoE

pytestmark = pytest.mark.skipif(
    not fast_cpu.available(),
    reason="fast CPU kernels unavailable: they need AVX-512 VNNI + BF16, a C++ compiler, no QWEN35_NO_FAST_KERNELS",
)


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return float((ours - expected).norm() / expected.norm())


def plain_glue(moe: SparseMoE, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """SparseMoE's own lines (the same fast matmuls, one kernel call per projection)."""
    with monkeypatch.context() as patch:
        patch.setattr(fast_cpu, "sparse_moe", lambda *args: None)
        return moe(x)


def quantized(rng: np.random.Generator, type_id: T, *shape: int) -> np.ndarray:
    values = rng.standard_normal(shape).astype(np.float32) * 0.1
    return gguf_quants.quantize(values.reshape(-1, shape[-1]), type_id).reshape(-1)


def synthetic_moe(rng, hidden: int, experts: int, width: int, shared_width: int | None, top_k: int) -> SparseMoE:
    w = {
        "mlp.gate": QuantLinear.from_dense(torch.from_numpy(rng.standard_normal((experts, hidden)).astype(np.float32))),
        "mlp.experts.gate": QuantExperts(quantized(rng, T.Q8_0, experts, width, hidden), T.Q8_0, experts, width, hidden),
        "mlp.experts.up": QuantExperts(quantized(rng, T.Q8_0, experts, width, hidden), T.Q8_0, experts, width, hidden),
        "mlp.experts.down": QuantExperts(quantized(rng, T.Q8_0, experts, hidden, width), T.Q8_0, experts, hidden, width),
    }
    if shared_width:
        w.update({
            "mlp.shared_expert.gate_proj": QuantLinear(quantized(rng, T.Q8_0, shared_width, hidden), T.Q8_0, shared_width, hidden),
            "mlp.shared_expert.up_proj": QuantLinear(quantized(rng, T.Q8_0, shared_width, hidden), T.Q8_0, shared_width, hidden),
            "mlp.shared_expert.down_proj": QuantLinear(quantized(rng, T.Q8_0, hidden, shared_width), T.Q8_0, hidden, shared_width),
            "mlp.shared_expert_gate": torch.from_numpy(rng.standard_normal((1, hidden)).astype(np.float32)) * 0.1,
        })
    for layer in w.values():
        if isinstance(layer, torch.nn.Module):
            set_mode(layer, "fast")
    return SparseMoE(SimpleNamespace(num_experts_per_tok=top_k), w, "mlp")


@pytest.mark.parametrize("shared_width", [None, 64, 96])  # none, as wide as the experts, wider
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fused_moe_matches_its_plain_lines(shared_width, tokens, monkeypatch):
    rng = np.random.default_rng(tokens)
    moe = synthetic_moe(rng, hidden=128, experts=12, width=64, shared_width=shared_width, top_k=4)
    x = torch.from_numpy(rng.standard_normal((tokens, 128)).astype(np.float32))
    calls = []
    real = fast_cpu.sparse_moe
    monkeypatch.setattr(fast_cpu, "sparse_moe", lambda *args: calls.append(1) or real(*args))
    fused = moe(x)
    assert calls and fused.shape == (tokens, 128)
    plain = plain_glue(moe, x, monkeypatch)
    assert relative_error(fused, plain) < 1e-5


def test_fused_moe_on_a_real_model(fixtures, monkeypatch):
    """The tiny MoE fixture's real Q4_K/Q6_K experts and shared expert: fused vs plain glue, and
    vs the exact fp32 path (8-bit activations: about 1% apart)."""
    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf")
    moe = next(layer.mlp for layer in model.network.layers if isinstance(layer.mlp, SparseMoE))
    assert moe.shared is not None
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    fused = moe(x)
    assert relative_error(fused, plain_glue(moe, x, monkeypatch)) < 1e-5
    set_mode(model.network, "reference")
    assert relative_error(fused, moe(x)) < 3e-2


def test_fused_moe_declines_unpacked_weights():
    rng = np.random.default_rng(0)
    moe = synthetic_moe(rng, hidden=128, experts=4, width=64, shared_width=64, top_k=2)
    set_mode(moe.downs, "reference")
    x = torch.randn(2, 128)
    assert fast_cpu.sparse_moe(x, moe.router(x), 2, (moe.gates, moe.ups, moe.downs), None, None) is None


@pytest.mark.parametrize("tokens", [1, 7])
def test_fused_dense_mlp_matches_its_plain_lines(fixtures, tokens, monkeypatch):
    """A real dense layer's MLP (Q4_K gate/up, Q6_K or Q4_K down): one call vs the plain lines."""
    from qwen35.model.qwen35 import MLP

    model = qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf")
    x = torch.randn(1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(tokens))
    for layer in model.network.layers[:4]:
        mlp = layer.mlp
        assert isinstance(mlp, MLP)
        calls = []
        real = fast_cpu.dense_mlp
        monkeypatch.setattr(fast_cpu, "dense_mlp", lambda *args: calls.append(1) or real(*args))
        fused = mlp(x)
        monkeypatch.setattr(fast_cpu, "dense_mlp", lambda *args: None)
        plain = mlp(x)
        assert calls and fused.shape == plain.shape
        assert relative_error(fused, plain) < 1e-5
