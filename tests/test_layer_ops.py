"""The decoder layer's C++ norms (csrc/layer_ops.cpp) against torch's rms_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def ops():
    from qwen35.kernels import fast_cpu

    if not fast_cpu.available():
        pytest.skip("fast CPU kernels unavailable: they need AVX-512 VNNI + BF16, a C++ compiler, no QWEN35_NO_FAST_KERNELS")
    return torch.ops.qwen35_ggml


@pytest.mark.parametrize("shape", [(1, 1, 1024), (2, 7, 2048), (3, 5, 4, 256), (4, 27)])
def test_rms_norm_is_torchs(ops, shape):
    # Same maths, other summation order: a few fp32 ulps apart.
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator) * 3
    weight = 1 + 0.1 * torch.randn(shape[-1], generator=generator)
    expected = F.rms_norm(x, (shape[-1],), weight, 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), expected, rtol=2e-6, atol=2e-6)


def test_add_rms_norm_is_the_sum_then_torchs_norm(ops):
    generator = torch.Generator().manual_seed(3)
    x, residual = torch.randn(2, 9, 1024, generator=generator), torch.randn(2, 9, 1024, generator=generator)
    weight = 1 + 0.1 * torch.randn(1024, generator=generator)
    total, normed = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, x + residual)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (1024,), weight, 1e-6), rtol=2e-6, atol=2e-6)


def test_norms_refuse_mismatched_weights(ops):
    with pytest.raises(RuntimeError, match="weight"):
        ops.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(2, 9), torch.ones(8), 1e-6)
