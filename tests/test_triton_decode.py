"""The fused GPU steps of kernels/triton_decode.py against their plain torch forms (in Triton's
interpreter on CPU tensors where there is no GPU). fp32 throughout: agreement to ~1e-6 relative."""

import pytest
import torch

from conftest import triton_devices

pytest.importorskip("triton")

from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels import triton_decode as td  # noqa: E402

DEVICES = triton_devices()


def _close(got, expected, tolerance=2e-6):
    got, expected = got.double().cpu(), expected.double().cpu()
    assert got.shape == expected.shape
    error = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    assert error <= tolerance, error


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows, width", [(1, 256), (3, 200), (5, 2048)])
def test_add_rms_norm(device, rows, width):
    generator = torch.Generator().manual_seed(width + rows)
    x, residual = (torch.randn(rows, 1, width, generator=generator) * 3 for _ in range(2))
    weight = torch.rand(width, generator=generator) + 0.5
    total, normed = td.add_rms_norm(x.to(device), residual.to(device), weight.to(device), 1e-6)
    expected_total, expected_normed = td.add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(total.cpu(), expected_total)  # one fp32 add each: the same bits
    _close(normed, expected_normed)
    _close(td.rms_norm(x.to(device), weight.to(device), 1e-6), torch.nn.functional.rms_norm(x, (width,), weight, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul_reads_column_slices(device):
    generator = torch.Generator().manual_seed(3)
    both = torch.randn(4, 2, 2 * 300, generator=generator)
    gate, up = both.to(device).split(300, dim=-1)  # strided rows, as LinearGroup returns them
    _close(td.silu_mul(gate, up), td.silu_mul_reference(*both.split(300, dim=-1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("experts, top_k", [(16, 4), (256, 8), (512, 10)])
def test_moe_route_picks_and_weighs_like_softmax_topk(device, experts, top_k):
    generator = torch.Generator().manual_seed(experts)
    logits = torch.randn(7, experts, generator=generator) * 2
    weights, ids = td.moe_route(logits.to(device), top_k)
    expected_weights, expected_ids = td.moe_route_reference(logits, top_k)
    assert torch.equal(ids.cpu(), expected_ids)
    _close(weights, expected_weights)


@pytest.mark.parametrize("device", DEVICES)
def test_moe_route_adds_the_shared_expert_as_a_last_slot(device):
    generator = torch.Generator().manual_seed(5)
    logits, x = torch.randn(3, 16, generator=generator), torch.randn(3, 300, generator=generator)
    gate_weight = torch.randn(300, generator=generator) * 0.1
    weights, ids = td.moe_route(logits.to(device), 4, x.to(device), gate_weight.to(device), shared_expert=16)
    expected_weights, expected_ids = td.moe_route_reference(logits, 4, x, gate_weight, 16)
    assert weights.shape == ids.shape == (3, 5) and torch.equal(ids.cpu(), expected_ids)
    assert torch.equal(ids[:, 4].cpu(), torch.full((3,), 16))
    _close(weights, expected_weights)
    with pytest.raises(Qwen35Error, match="shared expert"):
        td.moe_route(logits, 4, x[:, :10], gate_weight, shared_expert=16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16])
def test_router_product_and_routing_in_one_launch(device, shared, router_dtype):
    generator = torch.Generator().manual_seed(7)
    rows, experts, width, top_k = 3, 22, 600, 4  # experts and width not multiples of the program's tiles
    x = torch.randn(rows, width, generator=generator)
    router = (torch.randn(experts, width, generator=generator) * 0.05).to(router_dtype)
    gate_weight = torch.randn(width, generator=generator) * 0.05
    extra = (gate_weight, experts) if shared else ()
    for _ in range(2):  # the second call finds the arrival counts back at zero
        weights, ids = td.moe_router_route(x.to(device), router.to(device), top_k,
                                           *(t.to(device) if torch.is_tensor(t) else t for t in extra))
        logits = x.double() @ router.double().T
        expected_weights, expected_ids = td.moe_route_reference(logits, top_k, *((x,) + extra if shared else ()))
        assert torch.equal(ids.cpu(), expected_ids)
        _close(weights, expected_weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shared", [False, True])
def test_moe_combine(device, shared):
    generator = torch.Generator().manual_seed(int(shared))
    rows, top_k, width = 3, 4, 96
    down = torch.randn(rows, top_k, width, generator=generator)
    weights = torch.rand(rows, top_k, generator=generator).softmax(dim=-1)
    extra = (torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator),
             torch.randn(1, width, generator=generator)) if shared else ()
    got = td.moe_combine(down.to(device), weights.to(device), *(t.to(device) for t in extra))
    _close(got, td.moe_combine_reference(down, weights, *extra))


def test_bad_shapes_are_refused():
    with pytest.raises(Qwen35Error):
        td.moe_route(torch.zeros(2, 4), 5)
    with pytest.raises(Qwen35Error):
        td.moe_combine(torch.zeros(2, 3, 8), torch.zeros(2, 4))
    with pytest.raises(Qwen35Error):
        td.rms_norm(torch.zeros(2, 8), torch.ones(6), 1e-6)
