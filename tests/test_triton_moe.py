"""The grouped MoE Triton kernel against float64 torch maths of the same definition.

out[s] = x[s // (S // R)] @ W[expert_ids[s]].T. The kernel multiplies bf16 operands (float32
x is rounded to bf16) and sums in fp32 over K terms, so its error is at most about
K * 2^-24 of sum_i |x_i w_i| (4.8e-6 for K = 80): each element is held to 1e-5 of that sum,
against a float64 computation with the same bf16-rounded operands. Without a GPU the kernel
runs in Triton's interpreter (tests/conftest.py).
"""

import pytest
import torch
from conftest import triton_devices

pytest.importorskip("triton")

from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels.triton_moe import (  # noqa: E402
    TileConfig,
    _sorted_slot_layout,
    grouped_expert_matmul,
    grouped_expert_matmul_reference,
)

# Neither a multiple of BLOCK_N (64 or 128) nor of BLOCK_K (64).
OUT_FEATURES = 72
IN_FEATURES = 80
FP32_SUM_BOUND = 1e-5


def float64_expected(x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor):
    """(out, sum of |x_i w_i| per element) in float64, one gathered weight matrix per slot."""
    rows = torch.arange(expert_ids.numel(), device=x.device) // (expert_ids.numel() // x.shape[0])
    inputs = x.double()[rows]
    slot_weights = weights.double()[expert_ids.long()]
    out = torch.einsum("sk,snk->sn", inputs, slot_weights)
    magnitude = torch.einsum("sk,snk->sn", inputs.abs(), slot_weights.abs())
    return out, magnitude


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, bound: float):
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    error = (actual.double() - expected).abs()
    worst = (error / (magnitude + 1e-30)).max().item()
    assert worst <= bound, f"error reaches {worst:.3g} of sum |x w|, bound {bound}"


def make_inputs(rows, slots_per_row, experts, device, x_dtype=torch.bfloat16, seed=0):
    """Ids drawn with repeats from all experts but the last two, so some experts get no slots."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN_FEATURES, generator=generator).to(x_dtype)
    weights = torch.randn(experts, OUT_FEATURES, IN_FEATURES, generator=generator).to(torch.bfloat16)
    expert_ids = torch.randint(0, experts - 2, (rows * slots_per_row,), generator=generator, dtype=torch.int32)
    return x.to(device), weights.to(device), expert_ids.to(device)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("experts", [4, 16])
@pytest.mark.parametrize("slots_per_row", [1, 2, 8])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_bf16_inputs_match_float64(rows, slots_per_row, experts, device):
    x, weights, expert_ids = make_inputs(rows, slots_per_row, experts, device)
    expected, magnitude = float64_expected(x, weights, expert_ids)
    assert_close_to(grouped_expert_matmul(x, weights, expert_ids), expected, magnitude, FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("rows, slots_per_row, experts", [(1, 8, 16), (5, 2, 4), (33, 8, 4)])
def test_float32_inputs_are_rounded_to_bf16(rows, slots_per_row, experts, device):
    x, weights, expert_ids = make_inputs(rows, slots_per_row, experts, device, x_dtype=torch.float32, seed=1)
    out = grouped_expert_matmul(x, weights, expert_ids)
    rounded, magnitude = float64_expected(x.bfloat16(), weights, expert_ids)
    assert_close_to(out, rounded, magnitude, FP32_SUM_BOUND)
    # Against the unrounded x the only extra error is bf16's rounding of x, at most 2^-9 relative.
    exact, exact_magnitude = float64_expected(x, weights, expert_ids)
    assert_close_to(out, exact, exact_magnitude, 2**-9 + FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize(
    "tiles",
    [
        TileConfig(block_m=16, block_n=64, block_k=64, group_m=1, num_warps=4, num_stages=2),
        TileConfig(block_m=32, block_n=64, block_k=64, group_m=2, num_warps=4, num_stages=2),
        TileConfig(block_m=64, block_n=128, block_k=64, group_m=3, num_warps=4, num_stages=2),
    ],
    ids=["m16", "m32", "m64-grouped"],
)
def test_every_tile_shape(tiles, device):
    # 132 slots over 6 experts: each gets two blocks of 16, and with group_m 3 the last of the
    # 11 blocks (64 slots each) forms a short group.
    x, weights, expert_ids = make_inputs(33, 4, 8, device, seed=2)
    expected, magnitude = float64_expected(x, weights, expert_ids)
    assert_close_to(grouped_expert_matmul(x, weights, expert_ids, tiles=tiles), expected, magnitude, FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
def test_one_expert_takes_every_slot(device):
    x, weights, expert_ids = make_inputs(33, 2, 16, device, seed=3)
    expert_ids = torch.full_like(expert_ids, 15)
    expected, magnitude = float64_expected(x, weights, expert_ids)
    assert_close_to(grouped_expert_matmul(x, weights, expert_ids), expected, magnitude, FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
def test_strided_views_and_int64_ids(device):
    """Views into NaN-filled buffers: a stray read past K (or between x's columns) would show as NaN."""
    x, weights, expert_ids = make_inputs(5, 2, 4, device, seed=4)
    wide_x = torch.full((5, 2 * (IN_FEATURES + 64)), float("nan"), dtype=x.dtype, device=device)
    strided_x = wide_x[:, : 2 * IN_FEATURES : 2]
    strided_x.copy_(x)
    wide_weights = torch.full((4, OUT_FEATURES, IN_FEATURES + 64), float("nan"), dtype=weights.dtype, device=device)
    strided_weights = wide_weights[:, :, :IN_FEATURES]
    strided_weights.copy_(weights)
    expected, magnitude = float64_expected(x, weights, expert_ids)
    strided_ids = torch.stack([expert_ids.long(), torch.full_like(expert_ids.long(), -1)], dim=1)[:, 0]
    out = grouped_expert_matmul(strided_x, strided_weights, strided_ids)
    assert_close_to(out, expected, magnitude, FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
def test_out_of_range_ids_give_nan_rows(device):
    x, weights, expert_ids = make_inputs(5, 2, 4, device, seed=5)
    expert_ids[3] = 4
    expert_ids[7] = -1
    out = grouped_expert_matmul(x, weights, expert_ids)
    bad = torch.zeros(10, dtype=torch.bool, device=device)
    bad[[3, 7]] = True
    assert out[bad].isnan().all()
    good_ids = torch.where(bad, 0, expert_ids)
    expected, magnitude = float64_expected(x, weights, good_ids)
    assert_close_to(out[~bad], expected[~bad], magnitude[~bad], FP32_SUM_BOUND)
    with pytest.raises(Qwen35Error, match=r"expert ids must lie in \[0, 4\)"):
        grouped_expert_matmul_reference(x, weights, expert_ids)


@pytest.mark.parametrize("rows, slots_per_row, experts", [(1, 8, 16), (33, 8, 4)])
def test_reference_matches_float64(rows, slots_per_row, experts):
    x, weights, expert_ids = make_inputs(rows, slots_per_row, experts, "cpu", x_dtype=torch.float32, seed=6)
    expected, magnitude = float64_expected(x, weights, expert_ids)
    assert_close_to(grouped_expert_matmul_reference(x, weights, expert_ids), expected, magnitude, FP32_SUM_BOUND)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("block_m", [16, 64])
def test_slot_layout_puts_each_slot_in_its_experts_blocks(block_m, device):
    slots, experts = 264, 16
    expert_ids = torch.randint(-1, experts + 1, (slots,), generator=torch.Generator().manual_seed(7))
    sorted_slots, counts = _sorted_slot_layout(expert_ids.to(device), experts, block_m)
    sorted_slots, counts = sorted_slots.cpu(), counts.cpu()
    assert sorted_slots.numel() % block_m == 0
    used_positions = (sorted_slots < slots).nonzero().squeeze(1)
    used = sorted_slots[used_positions].long()
    assert torch.equal(used.sort().values, torch.arange(slots))
    # Groups: the experts in order, then the out-of-range ids, each padded to whole blocks.
    groups = torch.where((expert_ids >= 0) & (expert_ids < experts), expert_ids, experts)
    expected_counts = torch.bincount(groups, minlength=experts + 1)
    assert torch.equal(counts[: experts + 1].long(), expected_counts)
    assert not counts[experts + 1 :].any()
    padded_ends = ((expected_counts + block_m - 1) // block_m * block_m).cumsum(0)
    padded_starts = padded_ends - (expected_counts + block_m - 1) // block_m * block_m
    assert (used_positions >= padded_starts[groups[used]]).all()
    assert (used_positions < padded_starts[groups[used]] + expected_counts[groups[used]]).all()


@pytest.mark.parametrize("device", triton_devices())
def test_empty_input(device):
    weights = torch.zeros(4, OUT_FEATURES, IN_FEATURES, dtype=torch.bfloat16, device=device)
    x = torch.zeros(0, IN_FEATURES, device=device)
    out = grouped_expert_matmul(x, weights, torch.zeros(0, dtype=torch.int32, device=device))
    assert out.shape == (0, OUT_FEATURES) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "x_shape, x_dtype, weight_shape, weight_dtype, ids, message",
    [
        ((2, 3, 80), torch.float32, (4, 72, 80), torch.bfloat16, [0, 1], "x must be"),
        ((2, 80), torch.float16, (4, 72, 80), torch.bfloat16, [0, 1], "float32 or bfloat16"),
        ((2, 80), torch.float32, (72, 80), torch.bfloat16, [0, 1], "weights must be"),
        ((2, 80), torch.float32, (4, 72, 80), torch.float32, [0, 1], "weights must be bfloat16"),
        ((2, 80), torch.float32, (4, 72, 64), torch.bfloat16, [0, 1], "80 input features but the weights take 64"),
        ((2, 80), torch.float32, (4, 72, 80), torch.bfloat16, [0, 1, 2], "3 expert slots cannot be shared"),
        ((2, 80), torch.float32, (4, 72, 80), torch.bfloat16, [[0, 1]], "expert_ids must be 1-D"),
        ((2, 80), torch.float32, (4, 72, 80), torch.bfloat16, [0.0, 1.0], "must be integers"),
        ((2, 80), torch.float32, (0, 72, 80), torch.bfloat16, [0, 1], "no experts"),
    ],
)
def test_bad_shapes_are_clear_errors(x_shape, x_dtype, weight_shape, weight_dtype, ids, message):
    x = torch.zeros(x_shape, dtype=x_dtype)
    weights = torch.zeros(weight_shape, dtype=weight_dtype)
    expert_ids = torch.tensor(ids)
    for function in (grouped_expert_matmul, grouped_expert_matmul_reference):
        with pytest.raises(Qwen35Error, match=message):
            function(x, weights, expert_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captures_in_a_cuda_graph():
    x, weights, expert_ids = make_inputs(33, 8, 16, "cuda", x_dtype=torch.float32, seed=8)
    grouped_expert_matmul(x, weights, expert_ids)  # compile before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = grouped_expert_matmul(x, weights, expert_ids)
    new_ids = torch.randint(0, 16, expert_ids.shape, device="cuda", dtype=torch.int32)
    expert_ids.copy_(new_ids)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    expected, magnitude = float64_expected(x.bfloat16(), weights, new_ids)
    assert_close_to(out, expected, magnitude, FP32_SUM_BOUND)
