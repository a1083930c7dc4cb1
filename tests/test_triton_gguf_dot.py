"""The GGUF tensor-core products against float64 products of the plain reference's weights.

The weights come from `qwen35.kernels.dequant` (bit-equal to gguf-py); the kernels must give
x.bfloat16() @ W.bfloat16().T (both rounded to nearest even) up to fp32 summation order:
every output within 1e-5 of its sum of |terms| in bf16. That bound is far tighter than the
bf16 rounding itself (~4e-3 per term), so a wrong element, scale, plane or rounding fails it.
Without a GPU the kernels run in Triton's interpreter on CPU tensors (tests/conftest.py); the
sm_90 test compiles them for an H100 (tests/sm90.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from gguf import GGMLQuantizationType

from conftest import triton_devices
from qwen35.errors import Qwen35Error
from qwen35.formats.gguf import GGUFModel
from sm90 import run_compile_script
from test_triton_gguf import FIXTURE_TENSORS, GGUF_QUANTIZABLE, fixture_rows, reference_weight, weight_blocks

pytest.importorskip("triton")
from qwen35.kernels import triton_gguf_dot  # noqa: E402  (needs triton)

T = GGMLQuantizationType
TYPES = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0)
RELATIVE_BOUND = 1e-5

devices = pytest.mark.parametrize("device", triton_devices())


def bound_excess(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> float:
    """How far `ours` lies outside RELATIVE_BOUND of the float64 product x @ weight^T (<= 0: inside)."""
    x64, w64 = x.cpu().double(), weight.cpu().double()
    expected = x64 @ w64.T
    magnitude = x64.abs() @ w64.abs().T
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    return float(((ours.cpu().double() - expected).abs() - RELATIVE_BOUND * magnitude).max())


def assert_bf16_product(ours: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`ours` ~ x.bf16 @ weight.bf16^T (torch's casts round to nearest even)."""
    excess = bound_excess(ours, x.cpu().bfloat16(), weight.bfloat16())
    assert excess <= 0.0, f"outside the bound by {excess:.3g}"


def truncated_bf16(values: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 by dropping the low bits (what Triton's interpreter's cast does)."""
    return (values.contiguous().view(torch.int32) & -65536).view(torch.float32)


def random_x(rows: int, in_features: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, in_features, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- dot_matmul


@devices
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_the_precise_dot_matmul_has_float32s_accuracy(device, qtype):
    """precise=True: float32 x and weights (three tf32 products a term on a GPU): within the GEMV's
    float32 bound of the float64 product, which the bf16 product is not."""
    in_features = 768 if qtype not in GGUF_QUANTIZABLE else 352
    blocks = weight_blocks(qtype, (37,), in_features, seed=4)
    weight = reference_weight(blocks, qtype, in_features)
    x = random_x(8, in_features, seed=5)
    ours = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.to(device), in_features, precise=True)
    assert bound_excess(ours, x, weight) <= 0.0
    rounded = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.to(device), in_features)
    assert bound_excess(rounded, x, weight) > 0.0


@devices
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", (1, 17, 70))
def test_dot_matmul_matches_the_bf16_product(device, qtype, m):
    # 37 rows: not a multiple of any tile. K types: 3 steps, split so that the last split is short;
    # Q8_0/Q4_0: 11 blocks, a partial last 256-step.
    in_features = 768 if qtype not in GGUF_QUANTIZABLE else 352
    blocks = weight_blocks(qtype, (37,), in_features, seed=3)
    weight = reference_weight(blocks, qtype, in_features)
    x = random_x(m, in_features, seed=m)
    ours = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.to(device), in_features)
    assert ours.device.type == device
    assert_bf16_product(ours, x, weight)
    # The bound tells roundings apart: against truncated bf16 weights or unrounded x, it fails.
    assert bound_excess(ours, x.bfloat16(), truncated_bf16(weight)) > 0.0
    assert bound_excess(ours, x, weight.bfloat16()) > 0.0
    as_bf16 = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.bfloat16().to(device), in_features)
    assert torch.equal(as_bf16, ours)  # bf16 x is what the kernel multiplies anyway


@devices
@pytest.mark.parametrize("qtype", (T.Q5_K, T.Q6_K), ids=lambda t: t.name)
def test_dot_matmul_with_prefill_tiles(device, qtype):
    """150 rows of x: the largest tiles, two x blocks (the second partial)."""
    blocks = weight_blocks(qtype, (37,), 256, seed=16)
    x = random_x(150, 256, seed=17)
    assert triton_gguf_dot.pick_tiles(150).block_m == 128
    ours = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.to(device), 256)
    assert_bf16_product(ours, x, reference_weight(blocks, qtype, 256))


@devices
@pytest.mark.parametrize("qtype", (T.Q4_K, T.Q6_K), ids=lambda t: t.name)
def test_dot_matmul_over_many_tiles(device, qtype):
    """Small tiles over 131 rows and 40 rows of x: three N tiles, three x blocks (the last partial);
    the blocks start one byte past an aligned address and x is a transposed view."""
    blocks = weight_blocks(qtype, (131,), 512, seed=10)
    buffer = torch.zeros(blocks.numel() + 1, dtype=torch.uint8, device=device)
    buffer[1:] = blocks.reshape(-1).to(device)
    unaligned = buffer[1:].view(blocks.shape)
    x = random_x(512, 40, seed=11).T
    tiles = triton_gguf_dot.DotTiles(block_n=64, block_m=16, num_warps=4, num_stages=1)
    ours = triton_gguf_dot.dot_matmul(unaligned, qtype, x.to(device), 512, tiles=tiles)
    assert_bf16_product(ours, x, reference_weight(blocks, qtype, 512))


# ---------------------------------------------------------------- grouped_dot_matmul


def assert_slots(ours, rows_of_x, ids, weights):
    per_slot = rows_of_x.repeat_interleave(len(ids) // rows_of_x.shape[0], dim=0)
    for slot, expert in enumerate(ids):
        assert_bf16_product(ours[slot : slot + 1], per_slot[slot : slot + 1], weights[expert])


@devices
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_grouped_dot_matmul_matches_each_slots_product(device, qtype):
    n_experts, out_features = 5, 19
    in_features = 512 if qtype not in GGUF_QUANTIZABLE else 352
    blocks = weight_blocks(qtype, (n_experts, out_features), in_features, seed=4)
    weights = reference_weight(blocks, qtype, in_features)
    ids = [3, 0, 3, 4, 3, 3]  # repeats, within a token and across tokens
    x = random_x(2, in_features, seed=5)
    for dtype in (torch.int32, torch.int64):
        expert_ids = torch.tensor(ids, dtype=dtype, device=device)
        for rows in (x, x.repeat_interleave(3, dim=0)):  # one row per token (3 slots each), one per slot
            ours = triton_gguf_dot.grouped_dot_matmul(blocks.to(device), qtype, rows.to(device), expert_ids,
                                                      in_features)
            assert ours.shape == (len(ids), out_features) and ours.device.type == device
            assert_slots(ours, rows, ids, weights)


@devices
def test_grouped_dot_matmul_with_prefill_tiles(device):
    """40 tokens x top-3 of 3 experts: 40 slots per expert, so the large tiles, several blocks per expert."""
    n_experts, out_features, in_features = 3, 70, 256
    blocks = weight_blocks(T.Q4_K, (n_experts, out_features), in_features, seed=12)
    weights = reference_weight(blocks, T.Q4_K, in_features)
    generator = torch.Generator().manual_seed(13)
    ids = torch.rand(40, n_experts, generator=generator).argsort(dim=1).reshape(-1)[: 40 * 3]
    ids[::7] = 1  # uneven groups
    x = random_x(40, in_features, seed=14)
    assert triton_gguf_dot.pick_tiles(len(ids) / n_experts, grouped=True).block_m == 64
    ours = triton_gguf_dot.grouped_dot_matmul(blocks.to(device), T.Q4_K, x.to(device), ids.to(device), in_features)
    assert_slots(ours, x, ids.tolist(), weights)


@devices
def test_out_of_range_expert_ids_give_nan_rows_instead_of_reading_past_the_blocks(device):
    blocks = weight_blocks(T.Q8_0, (2, 8), 256, seed=6)
    weights = reference_weight(blocks, T.Q8_0, 256)
    x = random_x(1, 256, seed=7)
    ids = torch.tensor([1, 7, -1, 0], device=device)
    out = triton_gguf_dot.grouped_dot_matmul(blocks.to(device), T.Q8_0, x.to(device), ids, 256).cpu()
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    assert_bf16_product(out[0:1], x, weights[1])
    assert_bf16_product(out[3:4], x, weights[0])


# ---------------------------------------------------------------- real tensors


@devices
@pytest.mark.parametrize("file_name, tensor, qtype", FIXTURE_TENSORS, ids=lambda v: getattr(v, "name", None))
def test_fixture_tensors(device, fixtures, file_name, tensor, qtype):
    blocks, in_features = fixture_rows(fixtures, file_name, tensor, qtype)
    x = random_x(3, in_features, seed=7)
    ours = triton_gguf_dot.dot_matmul(blocks.to(device), qtype, x.to(device), in_features)
    assert_bf16_product(ours, x, reference_weight(blocks, qtype, in_features))


@devices
def test_fixture_expert_stack(device, fixtures):
    with GGUFModel(fixtures / "tiny" / "moe-Q4_K_M.gguf") as model:
        info = model.tensors["blk.0.ffn_up_exps.weight"]
        n_experts, out_features, in_features = info.torch_shape
        blocks = torch.from_numpy(model.tensor_data(info.name).copy()).reshape(n_experts, out_features, -1)
    blocks = blocks[:, :24].contiguous()  # every expert, its first 24 rows
    weights = reference_weight(blocks, info.type_id, in_features)
    ids = [15, 2, 2, 9, 0, 15, 7, 2]  # two tokens, top-4
    x = random_x(2, in_features, seed=8)
    ours = triton_gguf_dot.grouped_dot_matmul(
        blocks.to(device), info.type_id, x.to(device), torch.tensor(ids, device=device), in_features
    )
    assert_slots(ours, x, ids, weights)


# ---------------------------------------------------------------- arguments


@devices
def test_bad_arguments_are_named(device):
    blocks = weight_blocks(T.Q4_K, (4,), 256, seed=9).to(device)
    x = torch.zeros(1, 256, device=device)
    dot, grouped = triton_gguf_dot.dot_matmul, triton_gguf_dot.grouped_dot_matmul
    with pytest.raises(Qwen35Error, match="do not support Q2_K"):
        dot(blocks, T.Q2_K, x, 256)
    with pytest.raises(Qwen35Error, match="take 288 bytes, but the blocks' last dimension is 144"):
        dot(blocks, T.Q4_K, torch.zeros(1, 512, device=device), 512)
    with pytest.raises(Qwen35Error, match="multiple of the Q4_K block size"):
        dot(blocks, T.Q4_K, x, 100)
    with pytest.raises(Qwen35Error, match=r"float32 \(or bfloat16\) tensor \[rows, 256\], got torch.float64"):
        dot(blocks, T.Q4_K, x.double(), 256)
    with pytest.raises(Qwen35Error, match=r"tensor \[rows, 256\], got torch.float32 \[1, 512\]"):
        dot(blocks, T.Q4_K, torch.zeros(1, 512, device=device), 256)
    with pytest.raises(Qwen35Error, match="2 to 2 dimensions"):
        dot(blocks.reshape(2, 2, -1), T.Q4_K, x, 256)
    experts = blocks.reshape(2, 2, -1)
    with pytest.raises(Qwen35Error, match="3 to 3 dimensions"):
        grouped(blocks, T.Q4_K, x, torch.zeros(1, dtype=torch.int32, device=device), 256)
    with pytest.raises(Qwen35Error, match="multiple of the 2 rows"):
        grouped(experts, T.Q4_K, torch.zeros(2, 256, device=device), torch.zeros(3, dtype=torch.int32, device=device),
                256)
    with pytest.raises(Qwen35Error, match="int32 or int64"):
        grouped(experts, T.Q4_K, x, torch.zeros(2, device=device), 256)


@devices
def test_empty_products(device):
    blocks = weight_blocks(T.Q8_0, (3,), 64, seed=15).to(device)
    assert triton_gguf_dot.dot_matmul(blocks, T.Q8_0, torch.zeros(0, 64, device=device), 64).shape == (0, 3)
    assert triton_gguf_dot.dot_matmul(blocks[:0], T.Q8_0, torch.zeros(2, 64, device=device), 64).shape == (2, 0)


# ---------------------------------------------------------------- compiled for an H100


# sm90.compile_report reports mma.sync only; on sm_90 these kernels use Hopper's wgmma, so the
# script also keeps the compiled kernel (by wrapping triton.compile) to read its PTX.
SM90_COMPILE = r"""
import json, re
import triton
from gguf import GGMLQuantizationType as T
from sm90 import compile_report
from qwen35.kernels import triton_gguf_dot as dot
from qwen35.kernels.triton_gguf_blocks import HAS_MIN_TYPES, TILES

compiled = []
plain_compile = triton.compile
def keep(src, target=None, options=None):
    kernel = plain_compile(src, target=target, options=options)
    compiled.append(kernel)
    return kernel
triton.compile = keep

POINTERS = {"w_ptr": "*u8", "x_ptr": "*bf16", "out_ptr": "*fp32", "sorted_slots_ptr": "*i32",
            "group_counts_ptr": "*i32"}
PRECISE_POINTERS = {**POINTERS, "x_ptr": "*fp32"}
ALIGNED = {"row_bytes", "expert_bytes", "in_features", "n_out"}  # in_features 2048, out_features 512
results = {}
for qtype in (T.Q4_K, T.Q6_K):
    groups, length, planes = TILES[qtype]
    for rows in (1, 4096):
        for grouped in (False, True):
            tiles = dot.pick_tiles(rows, grouped)
            constants = dict(QTYPE=int(qtype), HAS_MIN=int(qtype) in HAS_MIN_TYPES, G=groups, L=length, P=planes,
                             BLOCK_N=tiles.block_n, BLOCK_M=tiles.block_m, STEPS=8, GROUPED=grouped,
                             GROUPS=512 if grouped else 1, NUM_STAGES=tiles.num_stages, EVEN_K=True, DOT_IN_FP32=False,
                             PRECISE=False, num_warps=tiles.num_warps)
            report = compile_report(dot._dot_kernel, constants, POINTERS, ALIGNED)
            ptx = compiled[-1].asm["ptx"]
            report["mma"] += sorted(set(re.findall(r"wgmma\.mma_async\S*", ptx)))
            results[f"{qtype.name} rows={rows} grouped={grouped}"] = report
    tiles = dot.PRECISE_TILES
    constants.update(BLOCK_N=tiles.block_n, BLOCK_M=tiles.block_m, GROUPED=False, GROUPS=1,
                     NUM_STAGES=tiles.num_stages, PRECISE=True, num_warps=tiles.num_warps)
    report = compile_report(dot._dot_kernel, constants, PRECISE_POINTERS, ALIGNED)
    report["mma"] += sorted(set(re.findall(r"wgmma\.mma_async\S*", compiled[-1].asm["ptx"])))
    results[f"{qtype.name} precise"] = report
print(json.dumps(results))
"""


def test_the_kernels_compile_for_sm90_with_tensor_cores_and_without_spilling():
    """Q4_K and Q6_K at the decode and prefill tiles, plain and grouped (256 experts): no spills, and
    the products on Hopper's warpgroup tensor cores (bf16 in, fp32 accumulation), 16 tokens wide
    for decode."""
    results = run_compile_script(SM90_COMPILE)
    assert len(results) == 10
    for name in ("Q4_K precise", "Q6_K precise"):  # float32 operands: tf32 tensor cores, no spills either
        report = results.pop(name)
        assert report["stack"] == 0, f"{name} spills {report['stack']} bytes"
        assert report["mma"] and all("tf32" in op for op in report["mma"]), f"{name}: {report['mma']}"
    for name, report in results.items():
        assert report["stack"] == 0, f"{name} spills {report['stack']} bytes"
        assert report["mma"] and all(re.match(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16$", op)
                                     for op in report["mma"]), f"{name}: {report['mma']}"
    assert results["Q4_K rows=1 grouped=False"]["mma"] == ["wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16"]
