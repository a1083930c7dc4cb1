"""The Triton attention decode step (kernels/triton_attention.py) against the model's own plain path:
Attention.__call__ for one token per row with the C++ op switched off (layer_rms_norm -> rms_norm,
apply_rotary, AttentionKV.write, _single_query_attention, the sigmoid gate), fed by the layer's own
qkv_proj (column slices of one output) and RotaryEmbedding. Without a GPU the kernels run in Triton's
interpreter."""

from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

from conftest import triton_devices
from sm90 import run_compile_script  # noqa: E402

from qwen35.engine.cache import AttentionKV  # noqa: E402
from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels.quant_linear import QuantLinear  # noqa: E402
from qwen35.kernels.triton_attention import _launch, attention_decode_, split_count  # noqa: E402
from qwen35.kernels.triton_arrivals import arrival_counters  # noqa: E402
from qwen35.model import qwen35 as network_module  # noqa: E402
from qwen35.model.config import FULL_ATTENTION, ModelConfig  # noqa: E402
from qwen35.model.qwen35 import Attention, RotaryEmbedding  # noqa: E402

DEVICES = triton_devices()
EPS = 1e-6


def attention_layer(n_q, n_kv, head_dim, rotary_dim, seed):
    """An Attention with random dense weights (hidden 32) and its config; o_proj is left out (identity)."""
    config = ModelConfig(
        architecture="qwen35", hidden_size=32, num_layers=1, vocab_size=16, layer_types=(FULL_ATTENTION,),
        rms_norm_eps=EPS, num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=head_dim,
        linear_num_key_heads=1, linear_num_value_heads=1, linear_key_head_dim=16, linear_value_head_dim=16,
        linear_conv_kernel=4, rope_theta=1e7, rotary_dim=rotary_dim, mrope_section=(2, 1, 1), intermediate_size=64,
    )
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features):
        return QuantLinear.from_dense(torch.randn(out_features, config.hidden_size, generator=generator) * 0.5)

    weights = {
        "attn.q_proj": linear(2 * n_q * head_dim), "attn.k_proj": linear(n_kv * head_dim),
        "attn.v_proj": linear(n_kv * head_dim), "attn.o_proj": lambda gated: gated,
        "attn.q_norm": 1 + 0.2 * torch.randn(head_dim, generator=generator),
        "attn.k_norm": 1 + 0.2 * torch.randn(head_dim, generator=generator),
    }
    return Attention(config, weights, "attn"), generator


def decode_case(layer, lengths, capacity, dtype, generator):
    """A one-token step: hidden states, the RoPE of each row's position, and a K/V storage of `capacity`
    slots with a spare row, full of finite random values (earlier tokens, and garbage past each row)."""
    c, batch = layer.c, len(lengths)
    x = torch.randn(batch, 1, c.hidden_size, generator=generator)
    starts = torch.tensor(lengths) - 1
    rope = RotaryEmbedding(c).cos_sin(starts[None, :, None].expand(3, -1, -1))
    shape = (batch + 1, capacity, c.num_key_value_heads, c.head_dim)
    keys, values = ((torch.randn(shape, generator=generator) * 2).to(dtype) for _ in range(2))
    return x, starts, rope, keys, values


def plain_step(layer, x, starts, rope, keys, values):
    """Attention.__call__'s plain path (the C++ op off) on copies of the storage: (its qkv_proj outputs,
    the gated output o_proj would get, the storage after the step)."""
    kv = AttentionKV._wrap(keys.clone(), values.clone(), rows=x.shape[0])
    mask = torch.arange(int(starts.max()) + 1)[None, None, :] <= starts[:, None, None]
    seen = {}
    project = layer.qkv_proj
    layer.qkv_proj = lambda h: seen.setdefault("qkv", project(h))
    try:
        with mock.patch.object(network_module, "fused_steps", lambda x: None):
            gated = layer(x, kv, starts, rope, mask)
    finally:
        layer.qkv_proj = project
    return seen["qkv"], gated, (kv._keys, kv._values)


def triton_step(layer, device, qkv, rope, keys, values, starts, splits=None, input_dtype=None):
    """attention_decode_ (or its launcher with a given split count) on `device`, on copies of the storage:
    (output, keys, values) back on the CPU, the storage as the call changed it in place."""
    c = layer.c
    q_gate, k, v = (t.to(device=device, dtype=input_dtype or t.dtype) for t in qkv)
    keys, values = keys.to(device, copy=True), values.to(device, copy=True)
    addresses = keys.data_ptr(), values.data_ptr()
    args = (q_gate, k, v, layer.q_norm.to(device), layer.k_norm.to(device), rope[0].to(device), rope[1].to(device),
            keys, values, starts.to(device), c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.rms_norm_eps, c.head_dim**-0.5)
    out = attention_decode_(*args) if splits is None else _launch(*args, splits=splits)
    assert (keys.data_ptr(), values.data_ptr()) == addresses
    assert out.dtype == torch.float32 and out.shape == (q_gate.shape[0], 1, c.num_attention_heads * c.head_dim)
    return out.cpu(), keys.cpu(), values.cpu()


def assert_output_close(ours, expected, tolerance=1e-5):
    """fp32 in other summation orders: measured against the largest output (outputs near zero are sums
    that cancel, so their own relative error means little)."""
    error = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert error < tolerance, f"largest error {error:.2e} of the largest output"


def assert_storage_matches(ours, expected, starts, key_rtol):
    """The new token's K (close: the same norm and RoPE in another order) and V (exact) at each row's
    slot, and every other slot (the spare row, the garbage past each row) untouched."""
    (our_keys, our_values), (keys, values) = ours, expected
    written = torch.zeros(keys.shape[:2], dtype=torch.bool)
    written[torch.arange(len(starts)), starts] = True
    assert torch.equal(our_keys[~written], keys[~written])
    assert torch.equal(our_values, values)
    torch.testing.assert_close(our_keys[written].float(), keys[written].float(), rtol=key_rtol, atol=1e-6)


# A K value an ulp apart in fp32 may round to the neighbouring 16-bit value.
KEY_RTOL = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps,
            torch.float16: torch.finfo(torch.float16).eps}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "n_q,n_kv,head_dim,rotary_dim,lengths,capacity,dtype",
    [
        (4, 2, 64, 16, [1], 40, torch.float32),  # the new token alone
        (8, 2, 64, 16, [37, 1, 100], 130, torch.float32),  # group 4, rows of several splits
        (4, 2, 64, 16, [37, 1, 100], 130, torch.bfloat16),  # group 2
        (8, 2, 40, 10, [50, 3, 17], 70, torch.bfloat16),  # a head size no power of 2: masked columns
        (4, 4, 32, 8, [20, 64], 80, torch.float16),  # no grouping, an fp16 storage
        (8, 1, 256, 64, [200], 260, torch.float32),  # group 8 of 256-wide heads, as the 35B model's
    ],
)
def test_matches_the_attention_layer(device, n_q, n_kv, head_dim, rotary_dim, lengths, capacity, dtype):
    layer, generator = attention_layer(n_q, n_kv, head_dim, rotary_dim, seed=sum(lengths) + head_dim)
    x, starts, rope, keys, values = decode_case(layer, lengths, capacity, dtype, generator)
    qkv, expected, expected_storage = plain_step(layer, x, starts, rope, keys, values)
    out, our_keys, our_values = triton_step(layer, device, qkv, rope, keys, values, starts)
    assert_output_close(out, expected)
    assert_storage_matches((our_keys, our_values), expected_storage, starts, KEY_RTOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 2, 5])
def test_any_split_count_gives_the_same_result(device, splits):
    """One split (its program gates the output itself), and splits that leave some ranges empty
    (rows of 1 and 4 cached slots) and others of several tiles, merged by each (row, kv head)'s last split."""
    layer, generator = attention_layer(4, 2, 32, 8, seed=3)
    x, starts, rope, keys, values = decode_case(layer, [150, 1, 5], 160, torch.float32, generator)
    qkv, expected, expected_storage = plain_step(layer, x, starts, rope, keys, values)
    out, our_keys, our_values = triton_step(layer, device, qkv, rope, keys, values, starts, splits=splits)
    assert_output_close(out, expected)
    assert_storage_matches((our_keys, our_values), expected_storage, starts, KEY_RTOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_the_split_path_twice_in_a_row_gives_the_same_bits_and_leaves_the_counters_at_zero(device):
    """The last split of each (row, kv head) to arrive merges and sets its arrival counter back to 0: a
    second call (a CUDA graph's replay) merges again. A count left behind would keep the second call
    from merging at all, its output then never written."""
    layer, generator = attention_layer(8, 2, 32, 8, seed=9)
    x, starts, rope, keys, values = decode_case(layer, [150, 1, 70], 160, torch.bfloat16, generator)
    qkv, expected, expected_storage = plain_step(layer, x, starts, rope, keys, values)
    counters = arrival_counters(torch.device(device), 3 * 2)
    outputs = []
    for _ in range(2):
        out, our_keys, our_values = triton_step(layer, device, qkv, rope, keys, values, starts, splits=4)
        assert not counters.any()
        assert_output_close(out, expected)
        assert_storage_matches((our_keys, our_values), expected_storage, starts, KEY_RTOL[torch.bfloat16])
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_inputs_are_computed_in_fp32(device):
    """q_gate, k, v given in bf16 (as a bf16 projection gives them): the result of their fp32 values."""
    layer, generator = attention_layer(4, 2, 32, 8, seed=4)
    x, starts, rope, keys, values = decode_case(layer, [20, 9], 24, torch.float32, generator)
    qkv, _, _ = plain_step(layer, x, starts, rope, keys, values)
    rounded = tuple(t.bfloat16().float() for t in qkv)
    project = layer.qkv_proj
    layer.qkv_proj = lambda h: rounded
    try:
        _, expected, expected_storage = plain_step(layer, x, starts, rope, keys, values)
    finally:
        layer.qkv_proj = project
    out, our_keys, our_values = triton_step(layer, device, qkv, rope, keys, values, starts, input_dtype=torch.bfloat16)
    assert_output_close(out, expected)
    assert_storage_matches((our_keys, our_values), expected_storage, starts, KEY_RTOL[torch.float32])


def test_split_count_fills_the_gpu_within_bounds():
    assert split_count(n_kv=2, capacity=4096, sm_count=132) == 32  # splits of 128 slots at least
    assert split_count(n_kv=2, capacity=262144, sm_count=132) == 64  # at most 64
    assert split_count(n_kv=16, capacity=262144, sm_count=132) == 17  # ~2 waves of 132 SMs for one row
    assert split_count(n_kv=2, capacity=16, sm_count=132) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_result_is_the_same_bits_alone_and_in_a_batch(device):
    """The splits follow the row's own length and the storage's shape, never its batch partners."""
    layer, generator = attention_layer(4, 2, 32, 8, seed=6)
    x, starts, rope, keys, values = decode_case(layer, [90, 200, 3], 210, torch.bfloat16, generator)
    qkv, _, _ = plain_step(layer, x, starts, rope, keys, values)
    together, _, _ = triton_step(layer, device, qkv, rope, keys, values, starts)
    for row in range(3):
        alone = [t[row:row + 1] for t in qkv], [t[row:row + 1] for t in rope]
        # Row `row` of the batch is row 0 of a storage whose row 0 holds that row's earlier tokens.
        order = [row] + [r for r in range(4) if r != row]
        out, _, _ = triton_step(layer, device, alone[0], alone[1], keys[order], values[order], starts[row:row + 1])
        assert torch.equal(out[0], together[row])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_give_a_clear_error(device):
    layer, generator = attention_layer(4, 2, 32, 8, seed=5)
    x, starts, rope, keys, values = decode_case(layer, [5, 3], 8, torch.float32, generator)
    q_gate, k, v = layer.qkv_proj(x)
    args = dict(q_gate=q_gate, k=k, v=v, q_norm=layer.q_norm, k_norm=layer.k_norm, cos=rope[0], sin=rope[1],
                keys=keys, values=values, starts=starts, n_q=4, n_kv=2, head_dim=32, eps=EPS, scale=32**-0.5)
    args = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in args.items()}

    def call(**changed):
        return attention_decode_(**{**args, **changed})

    with pytest.raises(Qwen35Error, match="q_gate must be"):
        call(q_gate=args["q_gate"][..., 1:])
    with pytest.raises(Qwen35Error, match="multiple of n_kv"):
        call(n_q=3)
    with pytest.raises(Qwen35Error, match="even rotary_dim"):
        call(cos=args["cos"][..., 1:], sin=args["sin"][..., 1:])
    with pytest.raises(Qwen35Error, match="float32, bfloat16 or float16"):
        call(keys=args["keys"].double(), values=args["values"].double())
    with pytest.raises(Qwen35Error, match="keys and values must be alike"):
        call(values=args["values"][:, :4])
    with pytest.raises(Qwen35Error, match="starts must be int64"):
        call(starts=args["starts"].int())
    with pytest.raises(Qwen35Error, match="k_norm must be"):
        call(k_norm=args["k_norm"][:16])


# The GPU-only branches compiled for an H100 (tests/sm90.py).
SM90_COMPILE = r"""
import json
import torch
from sm90 import compile_report
from qwen35.kernels import triton_attention as ta

ALIGNED = {"q_gate_s0", "k_s0", "v_s0", "cache_s0", "cache_s1", "cache_s2"}
results = {}
for storage, pointer, splits in ((torch.bfloat16, "*bf16", 32), (torch.float16, "*fp16", 1)):
    attend = ta._attend_config(16, 2, 256, 64, storage, 4096, splits)
    pointers = {"keys_ptr": pointer, "values_ptr": pointer, "starts_ptr": "*i64", "counter_ptr": "*i32"}
    results[pointer] = compile_report(ta._attend_kernel, attend, pointers, ALIGNED)
print(json.dumps(results))
"""


def test_the_gpu_kernels_compile_for_sm90_without_spilling():
    """The 35B model's shapes (16 query heads, 2 kv heads of 256, 64 rotated): a bf16 cache split 32 ways
    (bf16 tensor cores, the last split of each (row, kv head) merging, its loop to the grid's split count
    compiled as only a GPU runs it) and an fp16 cache in one split (tf32x3), each compiled with the tiles
    and warps a call would use; neither may keep a stack (spilled registers)."""
    results = run_compile_script(SM90_COMPILE)
    assert {name: result["stack"] for name, result in results.items()} == {"*bf16": 0, "*fp16": 0}
    assert results["*bf16"]["mma"] == ["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"]
    assert results["*fp16"]["mma"] == ["mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"]
