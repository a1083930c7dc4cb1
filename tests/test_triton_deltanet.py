"""The Triton DeltaNet decode kernels (kernels/triton_deltanet.py) against the plain references:
delta_rule.recurrent_gated_delta_rule, and GatedDeltaNet's methods causal_conv -> delta_rule_inputs ->
recurrent_gated_delta_rule -> gated_norm. Without a GPU the kernels run in Triton's interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import random_delta_rule_inputs, triton_devices  # noqa: E402
from sm90 import compile_launches, record_launches  # noqa: E402
from test_deltanet_decode import deltanet_layer, random_step_inputs, reference_steps  # noqa: E402

from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels.delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule  # noqa: E402
from qwen35.kernels.triton_arrivals import arrival_counters  # noqa: E402
from qwen35.kernels.triton_deltanet import deltanet_decode_, recurrent_delta_rule_  # noqa: E402
from qwen35.model.qwen35 import L2_NORM_EPS  # noqa: E402

# fp32 throughout; only summation orders, fused multiply-adds and the GPU's exp differ.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
DEVICES = triton_devices()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length", [1, 3])
def test_recurrent_matches_reference(device, batch, length):
    """d_v 40: a full 32-column program and a partial one; the state comes back in place."""
    generator = torch.Generator().manual_seed(length + batch)
    q, k, v, g, beta, state = random_delta_rule_inputs(batch, 2, length, 16, 40, generator)
    reference_out, reference_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    ours_state = state.to(device, copy=True)
    address = ours_state.data_ptr()
    out = recurrent_delta_rule_(*(x.to(device) for x in (q, k, v, g, beta)), ours_state)
    assert out.dtype == torch.float32 and out.shape == reference_out.shape
    assert ours_state.data_ptr() == address
    torch.testing.assert_close(out.cpu(), reference_out, **TOLERANCE)
    torch.testing.assert_close(ours_state.cpu(), reference_state, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_recurrent_takes_bf16_strided_inputs(device):
    """Token-major [B, T, H, d] bf16 tensors seen head-major (strided views), computed in fp32."""
    q, k, v, g, beta, state = random_delta_rule_inputs(2, 4, 3, 32, 32, torch.Generator().manual_seed(7))
    q, k, v = (x.transpose(1, 2).contiguous().bfloat16().transpose(1, 2) for x in (q, k, v))
    reference_out, reference_state = recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, state)
    ours_state = state.to(device, copy=True)
    out = recurrent_delta_rule_(q.to(device), k.to(device), v.to(device), g.to(device), beta.to(device), ours_state)
    torch.testing.assert_close(out.cpu(), reference_out, **TOLERANCE)
    torch.testing.assert_close(ours_state.cpu(), reference_state, **TOLERANCE)


def triton_step(layer, device, projected, a, b, z, conv, recurrent):
    """deltanet_decode_ on `device` on copies of the states: (y, conv state, recurrent state) back on the CPU,
    the states as the call updated them in place."""
    c = layer.c
    conv, recurrent = conv.to(device, copy=True), recurrent.to(device, copy=True)
    addresses = conv.data_ptr(), recurrent.data_ptr()
    y = deltanet_decode_(
        projected.to(device), a.to(device), b.to(device), z.to(device), conv, layer.conv_weight.to(device),
        layer.dt_bias.to(device), layer.decay_rate.to(device), layer.norm.to(device), recurrent,
        c.linear_num_key_heads, c.linear_key_head_dim, c.linear_num_value_heads, c.linear_value_head_dim,
        c.value_head_order == "grouped", L2_NORM_EPS, c.rms_norm_eps,
    )
    assert (conv.data_ptr(), recurrent.data_ptr()) == addresses
    return y.cpu(), conv.cpu(), recurrent.cpu()


def assert_step_matches(ours, reference):
    for name, mine, theirs in zip(("y", "conv state", "recurrent state"), ours, reference):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_head_order", ["grouped", "tiled"])
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_matches_plain_chain(device, value_head_order, batch):
    """n_v = 2 n_k, strided rows of projected/a/b/z (left unchanged); both states updated in place."""
    layer, generator = deltanet_layer(value_head_order, 2, 4, 16, 32, seed=batch)
    inputs = random_step_inputs(layer, batch, 1, generator)
    assert all(x.stride(0) > x.shape[-1] for x in inputs[:4])
    before = [x.clone() for x in inputs[:4]]
    assert_step_matches(triton_step(layer, device, *inputs), reference_steps(layer, *inputs))
    assert all(torch.equal(original, now) for original, now in zip(before, inputs[:4]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_k,d_v,conv_kernel", [(16, 24, 2), (8, 40, 5)])
def test_uneven_head_sizes_and_other_conv_kernels(device, d_k, d_v, conv_kernel):
    """Head sizes that are not powers of two (masked lanes), one value head per key head or three,
    and conv kernels other than Qwen 3.5's 4."""
    layer, generator = deltanet_layer("grouped", 1, 3, d_k, d_v, seed=d_v, conv_kernel=conv_kernel)
    inputs = random_step_inputs(layer, 2, 1, generator)
    assert_step_matches(triton_step(layer, device, *inputs), reference_steps(layer, *inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_projections_and_conv_state(device):
    """bf16 projections and a bf16 conv state: computed in fp32, the conv state bit-equal to the reference's."""
    layer, generator = deltanet_layer("tiled", 2, 4, 16, 16, seed=5)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 2, 1, generator)
    projected, a, b, z, conv = (x.bfloat16() for x in (projected, a, b, z, conv))
    ours = triton_step(layer, device, projected, a, b, z, conv, recurrent)
    reference = reference_steps(layer, projected, a, b, z, conv, recurrent)
    assert ours[1].dtype == torch.bfloat16 and torch.equal(ours[1], reference[1])
    assert_step_matches(ours, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_three_decode_steps_match_three_tokens_at_once(device):
    """Each step's in-place states feed the next: three steps equal the plain chain run over the three
    tokens at once (the chunked form, as prefill runs them)."""
    layer, generator = deltanet_layer("grouped", 2, 4, 16, 16, seed=9)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 2, 3, generator)
    reference_y, reference_conv, reference_recurrent = reference_steps(
        layer, projected, a, b, z, conv, recurrent, delta_rule=chunked_gated_delta_rule
    )
    outputs = []
    for t in range(3):
        token = [x[:, t : t + 1] for x in (projected, a, b, z)]
        y, conv, recurrent = triton_step(layer, device, *token, conv, recurrent)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference_y, **TOLERANCE)
    torch.testing.assert_close(conv, reference_conv, **TOLERANCE)
    torch.testing.assert_close(recurrent, reference_recurrent, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_consecutive_steps_leave_the_arrival_counters_at_zero(device):
    """Three value heads read each key head (tiled, so not neighbours), three rows: the last reader of a
    key head shifts its q and k conv state and sets its count back to 0, so the next step (as a CUDA
    graph's replay) counts from 0 again and two steps equal the plain chain over both tokens."""
    layer, generator = deltanet_layer("tiled", 2, 6, 16, 16, seed=4)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 3, 2, generator)
    reference_y, reference_conv, reference_recurrent = reference_steps(layer, projected, a, b, z, conv, recurrent)
    counters = arrival_counters(torch.empty(0, device=device).device, 3 * 2)
    assert not counters.any()
    outputs = []
    for t in range(2):
        token = [x[:, t : t + 1] for x in (projected, a, b, z)]
        y, conv, recurrent = triton_step(layer, device, *token, conv, recurrent)
        assert not counters.any(), f"step {t}: counts left at {counters.nonzero().flatten().tolist()}"
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference_y, **TOLERANCE)
    torch.testing.assert_close(conv, reference_conv, **TOLERANCE)
    torch.testing.assert_close(recurrent, reference_recurrent, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value_head_order", ["grouped", "tiled"])
def test_one_value_head_per_key_head(device, value_head_order):
    """n_v == n_k: every key head has one reader, which shifts its conv state at once."""
    layer, generator = deltanet_layer(value_head_order, 3, 3, 16, 24, seed=6)
    inputs = random_step_inputs(layer, 2, 1, generator)
    assert_step_matches(triton_step(layer, device, *inputs), reference_steps(layer, *inputs))


@pytest.mark.skipif(DEVICES != ["cpu"], reason="records the interpreter's launches; on a GPU the kernel runs")
def test_one_launch_a_step_that_compiles_for_sm90_without_spills(monkeypatch):
    """The 35B model's DeltaNet (16 key heads, 32 value heads grouped, d 128, conv kernel 4; fp32 and bf16
    inputs) and the tiny fixtures' (2 and 4 heads tiled, d 64): one launch a step, against the plain
    chain, and each launch compiled for an H100 as the wrapper makes it (its warps, argument types and
    alignments) holds the head's whole fp32 state without spilling registers."""
    launches = record_launches(monkeypatch)
    for order, key_heads, value_heads, dim, dtype in [("grouped", 16, 32, 128, torch.float32),
                                                      ("grouped", 16, 32, 128, torch.bfloat16),
                                                      ("tiled", 2, 4, 64, torch.float32)]:
        layer, generator = deltanet_layer(order, key_heads, value_heads, dim, dim, seed=dim)
        projected, a, b, z, conv, recurrent = random_step_inputs(layer, 1, 1, generator)
        inputs = (*(x.to(dtype) for x in (projected, a, b, z, conv)), recurrent)
        count = len(launches)
        assert_step_matches(triton_step(layer, "cpu", *inputs), reference_steps(layer, *inputs))
        assert len(launches) == count + 1
    assert {launch["name"] for launch in launches.values()} == {"_decode_step_kernel"}
    compiled = compile_launches(launches)
    assert {label: result for label, result in compiled.items() if result != {"stack": 0}} == {}


@pytest.mark.parametrize("device", DEVICES)
def test_bad_shapes_give_a_clear_error(device):
    layer, generator = deltanet_layer("grouped", 2, 4, 8, 8)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 1, 1, generator)
    with pytest.raises(Qwen35Error, match="recurrent must be"):
        triton_step(layer, device, projected, a, b, z, conv, recurrent[:, :3])
    with pytest.raises(Qwen35Error, match="projected must be"):
        triton_step(layer, device, projected[..., 1:], a, b, z, conv, recurrent)
    with pytest.raises(Qwen35Error, match="one token per row"):
        triton_step(layer, device, projected.expand(1, 2, -1), a, b, z, conv, recurrent)
    with pytest.raises(Qwen35Error, match="conv_state must be"):
        triton_step(layer, device, projected, a, b, z, conv[..., 1:], recurrent)
    q, k, v, g, beta, state = random_delta_rule_inputs(1, 2, 2, 8, 8, torch.Generator().manual_seed(0))
    with pytest.raises(Qwen35Error, match="state must be float32"):
        recurrent_delta_rule_(q, k, v, g, beta, state.double())
    with pytest.raises(Qwen35Error, match="v must be"):
        recurrent_delta_rule_(q, k, v[:, :, :1], g, beta, state)


def test_real_fixture_layer(fixtures):
    """A DeltaNet layer of the tiny Q8_0 GGUF (llama.cpp's converter: tiled value heads, d 64), its inputs
    from its own in_proj (column slices), against its own plain methods."""
    import qwen35

    device = DEVICES[0]
    layer = next(block.mixer for block in qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf").network.layers
                 if not block.is_attention)
    c = layer.c
    generator = torch.Generator().manual_seed(11)
    projected, a, b, z = layer.in_proj(torch.randn(2, 1, c.hidden_size, generator=generator))
    conv = torch.randn(2, c.linear_conv_dim, c.linear_conv_kernel - 1, generator=generator)
    recurrent = torch.randn(2, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                            generator=generator) * 0.1
    inputs = (projected, a, b, z, conv, recurrent)
    assert_step_matches(triton_step(layer, device, *inputs), reference_steps(layer, *inputs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_replays_in_a_cuda_graph():
    """No host syncs and in-place states: one captured step, replayed on new inputs, steps the same states on."""
    layer, generator = deltanet_layer("grouped", 2, 4, 128, 128, seed=3)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 2, 2, generator)
    reference_y, reference_conv, reference_recurrent = reference_steps(layer, projected, a, b, z, conv, recurrent)
    c = layer.c
    static = [x[:, :1].cuda() for x in (projected, a, b, z)]
    states = conv.cuda(), recurrent.cuda()
    weights = [w.cuda() for w in (layer.conv_weight, layer.dt_bias, layer.decay_rate, layer.norm)]

    def step():
        return deltanet_decode_(
            *static, states[0], *weights, states[1], c.linear_num_key_heads, c.linear_key_head_dim,
            c.linear_num_value_heads, c.linear_value_head_dim, True, L2_NORM_EPS, c.rms_norm_eps,
        )

    warm_states = [s.clone() for s in states]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    for state, warm in zip(states, warm_states):
        state.copy_(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    outputs = []
    for t in range(2):
        for buffer, source in zip(static, (projected, a, b, z)):
            buffer.copy_(source[:, t : t + 1])
        graph.replay()
        outputs.append(y.cpu())
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference_y, **TOLERANCE)
    torch.testing.assert_close(states[0].cpu(), reference_conv, **TOLERANCE)
    torch.testing.assert_close(states[1].cpu(), reference_recurrent, **TOLERANCE)
