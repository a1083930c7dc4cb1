"""The Triton GGUF kernels against the plain reference dequantizer (`qwen35.kernels.dequant`,
itself bit-equal to gguf-py) and float64 matmuls over its weights.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py).
GEMV bound: every output may differ from the float64 product by at most 1e-5 of
sum_k |x_k * w_k| (fp32 accumulation over K <= 1024 terms in any order stays far inside it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from conftest import triton_devices
from qwen35.errors import Qwen35Error
from qwen35.formats.gguf import GGUFModel
from qwen35.kernels.dequant import dequantize as reference_dequantize
from qwen35.kernels.triton_arrivals import arrival_counters
from test_dequant import random_blocks as random_block_bytes

pytest.importorskip("triton")
from qwen35.kernels import triton_gguf, triton_gguf_gemv  # noqa: E402  (needs triton)

T = GGMLQuantizationType
TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0)
GGUF_QUANTIZABLE = (T.Q8_0, T.Q4_0)  # gguf-py 0.19 cannot quantize the K types
RELATIVE_BOUND = 1e-5

pytestmark = pytest.mark.parametrize("device", triton_devices())


def weight_blocks(qtype: T, shape: tuple[int, ...], in_features: int, seed: int) -> torch.Tensor:
    """Blocks [*shape, row_bytes]: gguf-py's quantization of random weights where it can, else
    random bytes with finite fp16 scales (test_dequant's generator)."""
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape))
    if qtype in GGUF_QUANTIZABLE:
        weights = rng.standard_normal((rows, in_features)).astype(np.float32)
        raw = gguf_quants.quantize(weights, qtype)
    else:
        block_size, _ = GGML_QUANT_SIZES[qtype]
        raw = random_block_bytes(qtype, rows * in_features // block_size, rng)
    return torch.from_numpy(np.ascontiguousarray(raw).reshape(*shape, -1))


def reference_weight(blocks: torch.Tensor, qtype: int, in_features: int) -> torch.Tensor:
    return reference_dequantize(blocks.cpu().contiguous(), qtype, (*blocks.shape[:-1], in_features))


def assert_within_bound(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`ours` ~ x @ weight.T, within RELATIVE_BOUND of each output's sum of |terms|."""
    x64, w64 = x.cpu().double(), weight.double()
    expected = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    error = (ours.cpu().double() - expected).abs()
    worst = float((error - RELATIVE_BOUND * magnitude).max())
    assert worst <= 0.0, f"error {float(error.max()):.3g} exceeds the bound by {worst:.3g}"


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_equal_to_the_reference(device, qtype):
    in_features = 512 if qtype not in GGUF_QUANTIZABLE else 352  # 11 blocks: a partial 256-step
    blocks = weight_blocks(qtype, (37,), in_features, seed=1)
    expected = reference_weight(blocks, qtype, in_features)
    ours = triton_gguf.dequantize(blocks.to(device), qtype, in_features, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.device.type == device
    assert torch.equal(ours.cpu().view(torch.int32), expected.view(torch.int32))  # bits, signed zeros too
    as_bf16 = triton_gguf.dequantize(blocks.to(device), qtype, in_features)
    assert as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_bf16.cpu(), expected.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_dequantize_takes_row_slices_and_expert_stacks(device, qtype):
    blocks = weight_blocks(qtype, (3, 9), 256, seed=2).to(device)
    expected = reference_weight(blocks, qtype, 256)
    stacked = triton_gguf.dequantize(blocks, qtype, 256, dtype=torch.float32)
    assert stacked.shape == (3, 9, 256)
    assert torch.equal(stacked.cpu(), expected)
    rows = blocks[1, 2:7]  # a contiguous slice starting mid-tensor
    assert torch.equal(triton_gguf.dequantize(rows, qtype, 256, dtype=torch.float32).cpu(), expected[1, 2:7])


# ---------------------------------------------------------------- gemv


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", (1, 3, 8))
def test_gemv_matches_float64_matmul(device, qtype, m):
    in_features = 768 if qtype not in GGUF_QUANTIZABLE else 352
    blocks = weight_blocks(qtype, (37,), in_features, seed=3)  # 37 rows: not a multiple of any tile
    x = torch.randn(m, in_features, generator=torch.Generator().manual_seed(m))
    ours = triton_gguf.gemv(blocks.to(device), qtype, x.to(device), in_features)
    assert ours.device.type == device
    assert_within_bound(ours, x, reference_weight(blocks, qtype, in_features))


@pytest.mark.parametrize("qtype", (T.Q5_K, T.Q8_0), ids=lambda t: t.name)
def test_expert_gemv_matches_float64_matmul(device, qtype):
    n_experts, out_features, in_features = 5, 19, 512
    blocks = weight_blocks(qtype, (n_experts, out_features), in_features, seed=4)
    weights = reference_weight(blocks, qtype, in_features)
    ids = [3, 0, 3, 4, 3, 3]  # repeats, within a token and across tokens
    x = torch.randn(2, in_features, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.int32, torch.int64):
        expert_ids = torch.tensor(ids, dtype=dtype, device=device)
        for rows in (x, x.repeat_interleave(3, dim=0)):  # one row per token (3 slots each), one per slot
            ours = triton_gguf.expert_gemv(blocks.to(device), qtype, rows.to(device), expert_ids, in_features)
            per_slot = rows.repeat_interleave(len(ids) // rows.shape[0], dim=0)
            for slot, expert in enumerate(ids):
                assert_within_bound(ours[slot : slot + 1], per_slot[slot : slot + 1], weights[expert])


def test_expert_gemv_poisons_out_of_range_ids_instead_of_reading_past_the_weights(device):
    blocks = weight_blocks(T.Q8_0, (2, 8), 256, seed=6).to(device)
    x = torch.randn(2, 256, device=device)
    out = triton_gguf.expert_gemv(blocks, T.Q8_0, x, torch.tensor([1, 7], device=device), 256).cpu()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


# ---------------------------------------------------------------- real tensors


FIXTURE_TENSORS = (
    ("dense-Q4_K_M.gguf", "blk.0.ffn_gate.weight", T.Q4_K),
    ("dense-Q4_K_M.gguf", "blk.0.ffn_down.weight", T.Q6_K),
    ("dense-Q3_K_M.gguf", "blk.0.attn_qkv.weight", T.Q5_K),
    ("dense-Q8_0.gguf", "blk.0.attn_gate.weight", T.Q8_0),
    ("dense-Q4_0.gguf", "blk.0.attn_gate.weight", T.Q4_0),
)


def fixture_rows(fixtures, file_name: str, tensor: str, qtype: T) -> tuple[torch.Tensor, int]:
    """41 rows from the middle of a fixture weight (quick in the interpreter) as blocks, and its width."""
    with GGUFModel(fixtures / "tiny" / file_name) as model:
        info = model.tensors[tensor]
        assert info.type_id == qtype
        out_features, in_features = info.torch_shape
        blocks = torch.from_numpy(model.tensor_data(tensor).copy()).reshape(out_features, -1)
    return blocks[40:81], in_features


@pytest.mark.parametrize("file_name, tensor, qtype", FIXTURE_TENSORS, ids=lambda v: getattr(v, "name", None))
def test_fixture_tensors(device, fixtures, file_name, tensor, qtype):
    blocks, in_features = fixture_rows(fixtures, file_name, tensor, qtype)
    weight = reference_weight(blocks, qtype, in_features)
    on_device = blocks.to(device)
    assert torch.equal(triton_gguf.dequantize(on_device, qtype, in_features, dtype=torch.float32).cpu(), weight)
    x = torch.randn(3, in_features, generator=torch.Generator().manual_seed(7))
    assert_within_bound(triton_gguf.gemv(on_device, qtype, x.to(device), in_features), x, weight)


def test_fixture_expert_stack(device, fixtures):
    with GGUFModel(fixtures / "tiny" / "moe-Q4_K_M.gguf") as model:
        info = model.tensors["blk.2.ffn_down_exps.weight"]
        n_experts, out_features, in_features = info.torch_shape
        blocks = torch.from_numpy(model.tensor_data(info.name).copy()).reshape(n_experts, out_features, -1)
    blocks = blocks[:, :24].contiguous()  # every expert, its first 24 rows
    weights = reference_weight(blocks, info.type_id, in_features)
    ids = [15, 2, 2, 9]
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(8))
    ours = triton_gguf.expert_gemv(
        blocks.to(device), info.type_id, x.to(device), torch.tensor(ids, device=device), in_features
    )
    for slot, expert in enumerate(ids):
        assert_within_bound(ours[slot : slot + 1], x, weights[expert])


# ---------------------------------------------------------------- arguments


def test_supported_types(device):
    assert triton_gguf.SUPPORTED_TYPES == frozenset(int(t) for t in TYPES)
    assert all(triton_gguf.supports(t) for t in TYPES)
    assert not triton_gguf.supports(T.Q2_K) and not triton_gguf.supports(T.F32)


def test_bad_arguments_are_named(device):
    blocks = weight_blocks(T.Q4_K, (4,), 256, seed=9).to(device)
    x = torch.zeros(1, 256, device=device)
    with pytest.raises(Qwen35Error, match="Q2_K"):
        triton_gguf.gemv(blocks, T.Q2_K, x, 256)
    with pytest.raises(Qwen35Error, match="take 288 bytes, but the blocks' last dimension is 144"):
        triton_gguf.gemv(blocks, T.Q4_K, torch.zeros(1, 512, device=device), 512)
    with pytest.raises(Qwen35Error, match="288 bytes"):
        triton_gguf.dequantize(blocks, T.Q4_K, 512)
    with pytest.raises(Qwen35Error, match="multiple of the Q4_K block size"):
        triton_gguf.dequantize(blocks, T.Q4_K, 100)
    with pytest.raises(Qwen35Error, match=r"float32 tensor \[rows, 256\]"):
        triton_gguf.gemv(blocks, T.Q4_K, x.double(), 256)
    with pytest.raises(Qwen35Error, match="1 to 16 rows"):
        triton_gguf.gemv(blocks, T.Q4_K, torch.zeros(17, 256, device=device), 256)
    experts = blocks.reshape(2, 2, -1)
    with pytest.raises(Qwen35Error, match="multiple of the 2 rows"):
        triton_gguf.expert_gemv(experts, T.Q4_K, torch.zeros(2, 256, device=device),
                                torch.zeros(3, dtype=torch.int32, device=device), 256)
    with pytest.raises(Qwen35Error, match="int32 or int64"):
        triton_gguf.expert_gemv(experts, T.Q4_K, x, torch.zeros(2, device=device), 256)


@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_gemv_over_several_row_programs(device, qtype):
    blocks = weight_blocks(qtype, (131,), 256, seed=10)  # more rows than one program takes
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(11))
    ours = triton_gguf.gemv(blocks.to(device), qtype, x.to(device), 256)
    assert_within_bound(ours, x, reference_weight(blocks, qtype, 256))


@pytest.mark.parametrize("first, second", ((T.Q6_K, T.Q4_K), (T.Q4_K, T.Q8_0)), ids=lambda t: t.name)
@pytest.mark.parametrize("m", (1, 3))
def test_gemv_takes_a_second_weight_of_another_type_in_the_same_launch(device, first, second, m):
    in_features = 1024  # four steps: split along K in the interpreter
    blocks, blocks2 = weight_blocks(first, (70,), in_features, seed=20), weight_blocks(second, (37,), in_features, seed=21)
    x = torch.randn(m, in_features, generator=torch.Generator().manual_seed(22))
    ours = triton_gguf.gemv(blocks.to(device), first, x.to(device), in_features, second=(blocks2.to(device), second))
    both = torch.cat([reference_weight(blocks, first, in_features), reference_weight(blocks2, second, in_features)])
    assert_within_bound(ours, x, both)
    with pytest.raises(Qwen35Error, match="second"):
        triton_gguf.gemv(blocks.to(device), first, x.to(device), in_features, second=blocks2)


# ---------------------------------------------------------------- SwiGLU input, split-K


def _silu_times_up(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.double().chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q6_K), ids=lambda t: t.name)
@pytest.mark.parametrize("m", (1, 3))
def test_gemv_takes_gate_and_up_for_a_down_projection(device, qtype, m):
    in_features = 512
    blocks = weight_blocks(qtype, (37,), in_features, seed=12)
    gate_up = torch.randn(m, 2 * in_features, generator=torch.Generator().manual_seed(13)) * 2
    ours = triton_gguf.gemv(blocks.to(device), qtype, gate_up.to(device), in_features, swiglu=True)
    assert_within_bound(ours, _silu_times_up(gate_up), reference_weight(blocks, qtype, in_features))


def test_expert_gemv_takes_gate_and_up_per_slot(device):
    n_experts, out_features, in_features = 4, 19, 256
    blocks = weight_blocks(T.Q6_K, (n_experts, out_features), in_features, seed=14)
    weights = reference_weight(blocks, T.Q6_K, in_features)
    ids = [2, 0, 2]
    gate_up = torch.randn(len(ids), 2 * in_features, generator=torch.Generator().manual_seed(15))
    ours = triton_gguf.expert_gemv(blocks.to(device), T.Q6_K, gate_up.to(device),
                                   torch.tensor(ids, device=device), in_features, swiglu=True)
    x = _silu_times_up(gate_up)
    for slot, expert in enumerate(ids):
        assert_within_bound(ours[slot : slot + 1], x[slot : slot + 1], weights[expert])


def _combining_case(type_id, out_features, in_features, seed):
    """Five experts' blocks (and their reference weights in fp64), two tokens' three slots each, the slots'
    gate|up inputs and the tokens' slot weights, and the generator for more."""
    blocks = weight_blocks(type_id, (5, out_features), in_features, seed=seed)
    weights = reference_weight(blocks, type_id, in_features).double()
    ids = torch.tensor([4, 0, 2, 2, 1, 4])
    generator = torch.Generator().manual_seed(seed + 1)
    gate_up = torch.randn(len(ids), 2 * in_features, generator=generator)
    return blocks, weights, ids, gate_up, torch.rand(2, 3, generator=generator), generator


# 1100 outputs: three passes of the combining loop; 40 outputs over 2048 inputs: split-K in the interpreter
@pytest.mark.parametrize("out_features, in_features", ((1100, 256), (40, 2048)))
def test_expert_gemv_combines_each_tokens_slots_in_the_same_launch(device, out_features, in_features):
    slots_per_token, tokens = 3, 2
    blocks, weights, ids, gate_up, slot_weights, generator = _combining_case(T.Q4_K, out_features, in_features, 18)
    for _ in range(2):  # the second call finds the arrival counts back at zero
        ours = triton_gguf.expert_gemv(blocks.to(device), T.Q4_K, gate_up.to(device), ids.to(device), in_features,
                                       swiglu=True, slot_weights=slot_weights.to(device))
        x = _silu_times_up(gate_up)
        per_slot = torch.stack([x[s] @ weights[e].T for s, e in enumerate(ids.tolist())])
        expected = (per_slot.reshape(tokens, slots_per_token, -1) * slot_weights.double()[..., None]).sum(dim=1)
        magnitude = torch.stack([x[s].abs() @ weights[e].abs().T for s, e in enumerate(ids.tolist())])
        bound = RELATIVE_BOUND * (magnitude.reshape(tokens, slots_per_token, -1) * slot_weights.double()[..., None]).sum(1)
        assert ours.shape == (tokens, out_features)
        assert bool(((ours.cpu().double() - expected).abs() <= bound).all())
    assert int(arrival_counters(torch.device(device), 1).abs().sum()) == 0
    with pytest.raises(Qwen35Error, match="slot_weights"):
        triton_gguf.expert_gemv(blocks.to(device), T.Q4_K, gate_up.to(device), ids.to(device), in_features,
                                swiglu=True, slot_weights=slot_weights[:1].to(device))


def _assert_add_norm(total, normed, product, magnitude, residual, weight, eps=1e-6):
    """total = product + residual within the GEMV bound; normed = RMS norm of our total, to fp32 rounding."""
    total, normed = total.cpu().double(), normed.cpu().double()
    assert bool(((total - product - residual.double()).abs() <= RELATIVE_BOUND * magnitude + 1e-6).all())
    expected = total * torch.rsqrt((total * total).mean(dim=-1, keepdim=True) + eps) * weight.double()
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m, in_features", ((1, 2048), (3, 256)))  # split along K, or not
def test_gemv_adds_the_residual_and_norms_in_the_same_launch(device, m, in_features):
    out_features = 600  # two passes of the finishing loop
    blocks = weight_blocks(T.Q4_K, (out_features,), in_features, seed=23)
    generator = torch.Generator().manual_seed(24)
    x, residual = torch.randn(m, in_features, generator=generator), torch.randn(m, out_features, generator=generator)
    weight = torch.rand(out_features, generator=generator) + 0.5
    for _ in range(2):  # the second call finds the arrival counts back at zero
        total, normed = triton_gguf.gemv(blocks.to(device), T.Q4_K, x.to(device), in_features,
                                         add_norm=(residual.to(device), weight.to(device), 1e-6))
        w = reference_weight(blocks, T.Q4_K, in_features).double()
        _assert_add_norm(total, normed, x.double() @ w.T, x.double().abs() @ w.abs().T, residual, weight)
    assert int(arrival_counters(torch.device(device), 1).abs().sum()) == 0
    with pytest.raises(Qwen35Error, match="add_norm"):
        triton_gguf.gemv(blocks.to(device), T.Q4_K, x.to(device), in_features,
                         add_norm=(residual[:, :5].to(device), weight.to(device), 1e-6))


def test_expert_gemv_combines_adds_and_norms_in_the_same_launch(device):
    out_features, in_features, slots_per_token, tokens = 700, 256, 3, 2
    blocks, weights, ids, gate_up, slot_weights, generator = _combining_case(T.Q6_K, out_features, in_features, 25)
    residual, norm_weight = torch.randn(tokens, out_features, generator=generator), torch.rand(out_features) + 0.5
    total, normed = triton_gguf.expert_gemv(
        blocks.to(device), T.Q6_K, gate_up.to(device), ids.to(device), in_features, swiglu=True,
        slot_weights=slot_weights.to(device), add_norm=(residual.to(device), norm_weight.to(device), 1e-6))
    x = _silu_times_up(gate_up)
    per_slot = torch.stack([x[s] @ weights[e].T for s, e in enumerate(ids.tolist())])
    magnitude = torch.stack([x[s].abs() @ weights[e].abs().T for s, e in enumerate(ids.tolist())])
    weighted = slot_weights.double()[..., None]
    combined = (per_slot.reshape(tokens, slots_per_token, -1) * weighted).sum(dim=1)
    bound = (magnitude.reshape(tokens, slots_per_token, -1) * weighted).sum(dim=1)
    _assert_add_norm(total, normed, combined, bound, residual, norm_weight)
    with pytest.raises(Qwen35Error, match="slot_weights"):
        triton_gguf.expert_gemv(blocks.to(device), T.Q6_K, gate_up.to(device), ids.to(device), in_features,
                                swiglu=True, add_norm=(residual.to(device), norm_weight.to(device), 1e-6))


def test_split_k_sums_in_one_launch_and_leaves_its_counters_at_zero(device):
    blocks = weight_blocks(T.Q4_K, (37,), 2048, seed=16).to(device)  # 8 steps over one row program: split
    n_steps = 2048 // triton_gguf.STEP_ELEMENTS
    splits, _ = triton_gguf_gemv._plan(37, n_steps, 1, triton_gguf_gemv.GEMV_CONFIG[T.Q4_K][0], blocks.device)
    assert splits > 1
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(17))
    first = triton_gguf.gemv(blocks, T.Q4_K, x.to(device), 2048)
    assert_within_bound(first, x, reference_weight(blocks, T.Q4_K, 2048))
    assert int(arrival_counters(blocks.device, 1).abs().sum()) == 0  # ready for the next call
    again = triton_gguf.gemv(blocks, T.Q4_K, x.to(device), 2048)
    assert torch.equal(first, again)  # the partials are added in split order, whoever finishes last


# What the interpreter never runs: the GEMV as compiled for an H100 (tests/sm90.py), split-K's atomic
# count included. For each type at one row of x (Q4_K also fed gate and up, and at 8 rows; a Q6_K + Q4_K
# pair; Q6_K as the MoE's down product with its combining), no spills. (Q6_K fed gate and up per expert slot and split
# along K spills 8 bytes; no Qwen 3.5 size's down product splits.)
SM90_COMPILE = r"""
import json
from gguf import GGMLQuantizationType as T
from sm90 import compile_report
from qwen35.kernels.triton_gguf_blocks import HAS_MIN_TYPES, TILES
from qwen35.kernels.triton_gguf_gemv import GEMV_BLOCK_N, GEMV_CONFIG, _gemv_kernel

POINTERS = {"w_ptr": "*u8", "w2_ptr": "*u8", "counter_ptr": "*i32", "ids_ptr": "*i64"}


def constants(name, second=None, **launch):
    qtype, qtype2 = T[name], T[second or name]
    groups, length, planes = TILES[qtype]
    groups2, length2, planes2 = TILES[qtype2]
    block_n, warps, stages = GEMV_CONFIG[qtype]
    if launch.get("BLOCK_M", 1) > 1:
        block_n, warps, stages = GEMV_BLOCK_N[launch["BLOCK_M"]], 4, 1
    values = dict(QTYPE=int(qtype), HAS_MIN=qtype in HAS_MIN_TYPES, G=groups, L=length, P=planes,
                  NUM_STAGES=stages, QTYPE2=int(qtype2), HAS_MIN2=qtype2 in HAS_MIN_TYPES, G2=groups2, L2=length2,
                  P2=planes2, NUM_STAGES2=GEMV_CONFIG[qtype2][2], PAIR=second is not None, BLOCK_N=block_n,
                  BLOCK_M=1, HAS_IDS=False, STEPS=2, SPLITS=4, SWIGLU=False, COMBINE=False, SLOTS_PER_TOKEN=1,
                  ADD_NORM=False, WIDTH_STEPS=1, num_warps=warps)
    values.update(launch)
    return values


LAUNCHES = {
    "Q4_K": constants("Q4_K"), "Q4_K swiglu": constants("Q4_K", SWIGLU=True), "Q6_K": constants("Q6_K"),
    "Q8_0": constants("Q8_0"), "Q4_K x8": constants("Q4_K", BLOCK_M=8),
    "Q6_K + Q4_K": constants("Q6_K", "Q4_K"),  # a DeltaNet layer's two projections in one launch
    # an output projection with the residual add and the next norm (the 35B's: 16 steps, split)
    "Q4_K add norm": constants("Q4_K", ADD_NORM=True, WIDTH_STEPS=4),
    # the 35B's MoE down product with its combining, add and norm: 2 steps, no split
    "Q6_K experts combine": constants("Q6_K", HAS_IDS=True, SWIGLU=True, SPLITS=1, COMBINE=True, SLOTS_PER_TOKEN=9,
                                      ADD_NORM=True, WIDTH_STEPS=4),
}
print(json.dumps({name: compile_report(_gemv_kernel, values, POINTERS, {"row_bytes", "row_bytes2", "in_features"})
                  for name, values in LAUNCHES.items()}))
"""


def test_the_gemv_compiles_for_sm90_without_spilling(device):
    from sm90 import run_compile_script

    results = run_compile_script(SM90_COMPILE)
    assert {name: result["stack"] for name, result in results.items()} == dict.fromkeys(results, 0), results
