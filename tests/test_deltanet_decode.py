"""The one-call DeltaNet decode step (csrc/deltanet_decode.cpp) against GatedDeltaNet's plain methods:
causal_conv -> delta_rule_inputs -> recurrent_gated_delta_rule -> gated_norm."""

import pytest
import torch

from qwen35.engine.cache import DeltaNetState
from qwen35.kernels.delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule
from qwen35.model.qwen35 import L2_NORM_EPS

# Observed: y within 3e-6 of values up to 8, the recurrent state within 3e-7, the conv state bit-equal
# (fp32 rounding: other summation orders, the kernel's own exp).
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def fast_ops_or_skip():
    from qwen35.kernels.delta_rule import fast_ops

    if fast_ops() is None:
        pytest.skip("fast CPU kernels unavailable here")
    return fast_ops()


def deltanet_layer(value_head_order, key_heads, value_heads, d_k, d_v, seed=0, conv_kernel=4):
    """A GatedDeltaNet with random weights."""
    from qwen35.kernels.quant_linear import QuantLinear
    from qwen35.model.config import LINEAR_ATTENTION, ModelConfig
    from qwen35.model.qwen35 import GatedDeltaNet

    config = ModelConfig(
        architecture="qwen35", hidden_size=32, num_layers=1, vocab_size=16, layer_types=(LINEAR_ATTENTION,),
        rms_norm_eps=1e-6, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_num_key_heads=key_heads, linear_num_value_heads=value_heads, linear_key_head_dim=d_k,
        linear_value_head_dim=d_v, linear_conv_kernel=conv_kernel, rope_theta=1e7, rotary_dim=8,
        mrope_section=(2, 1, 1), intermediate_size=64, value_head_order=value_head_order,
    )
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features):
        return QuantLinear.from_dense(torch.randn(out_features, config.hidden_size, generator=generator) * 0.2)

    weights = {
        "layer.in_proj_qkv": linear(config.linear_conv_dim),
        "layer.in_proj_z": linear(config.linear_value_dim),
        "layer.in_proj_b": linear(value_heads),
        "layer.in_proj_a": linear(value_heads),
        "layer.out_proj": lambda x: x,
        "layer.conv1d": torch.randn(config.linear_conv_dim, conv_kernel, generator=generator) * 0.5,
        "layer.dt_bias": torch.randn(value_heads, generator=generator),
        "layer.decay_rate": -torch.rand(value_heads, generator=generator) * 4,
        "layer.norm": 1 + 0.1 * torch.randn(d_v, generator=generator),
    }
    return GatedDeltaNet(config, weights, "layer"), generator


def random_step_inputs(layer, batch, length, generator):
    """projected, a, b, z as column slices of one [B, T, sum] tensor (what LinearGroup returns), and a state."""
    c = layer.c
    widths = [c.linear_conv_dim, c.linear_num_value_heads, c.linear_num_value_heads, c.linear_value_dim]
    joint = torch.randn(batch, length, sum(widths), generator=generator)
    conv = torch.randn(batch, c.linear_conv_dim, c.linear_conv_kernel - 1, generator=generator)
    recurrent = torch.randn(
        batch, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim, generator=generator
    ) * 0.1
    return (*joint.split(widths, dim=-1), conv, recurrent)


def reference_steps(layer, projected, a, b, z, conv, recurrent, delta_rule=recurrent_gated_delta_rule):
    """The plain chain over all T tokens of the inputs: (y [B, T, n_v d_v], new conv state, new recurrent state)."""
    state = DeltaNetState(conv.clone(), recurrent.clone())
    q, k, v, g, beta = layer.delta_rule_inputs(layer.causal_conv(projected, state), a, b)
    out, state.recurrent = delta_rule(q, k, v, g, beta, state.recurrent)
    return layer.gated_norm(out, z), state.conv, state.recurrent


def fused_step(fast, layer, projected, a, b, z, conv, recurrent):
    c = layer.c
    return fast.deltanet_decode(
        projected, a, b, z, conv, layer.conv_weight, layer.dt_bias, layer.decay_rate, layer.norm, recurrent,
        c.linear_num_key_heads, c.linear_key_head_dim, c.linear_num_value_heads, c.linear_value_head_dim,
        c.value_head_order == "grouped", L2_NORM_EPS, c.rms_norm_eps,
    )


def assert_step_matches(ours, reference):
    for name, mine, theirs in zip(("y", "conv state", "recurrent state"), ours, reference):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        torch.testing.assert_close(mine, theirs, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("value_head_order", ["grouped", "tiled"])
@pytest.mark.parametrize("key_heads,value_heads", [(2, 2), (2, 4)])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dim", [64, 128])
def test_decode_step_matches_plain_chain(value_head_order, key_heads, value_heads, batch, dim):
    """Strided a/b/z/projected rows, both value-head orders, repeated key heads; the inputs stay unchanged."""
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer(value_head_order, key_heads, value_heads, dim, dim, seed=dim + batch)
    inputs = random_step_inputs(layer, batch, 1, generator)
    assert all(x.stride(0) > x.shape[-1] for x in inputs[:4])  # column slices: strided rows
    before = [x.clone() for x in inputs]
    ours = fused_step(fast, layer, *inputs)
    assert_step_matches(ours, reference_steps(layer, *inputs))
    for original, now in zip(before, inputs):
        assert torch.equal(original, now)  # a cache snapshot may hold the old state


@pytest.mark.parametrize("d_k,d_v,conv_kernel", [(16, 27, 4), (24, 200, 4), (32, 32, 2), (16, 40, 5)])
def test_uneven_head_sizes_and_other_conv_kernels(d_k, d_v, conv_kernel):
    """Head sizes that leave partial vectors (masked lanes; no streamed stores) or need more than one column
    group; conv kernels other than Qwen 3.5's 4 (the generic conv loop)."""
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer("grouped", 1, 3, d_k, d_v, seed=d_v, conv_kernel=conv_kernel)
    inputs = random_step_inputs(layer, 2, 1, generator)
    assert_step_matches(fused_step(fast, layer, *inputs), reference_steps(layer, *inputs))


def test_bf16_conv_state_comes_back_in_its_dtype():
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer("tiled", 2, 4, 64, 64, seed=5)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 2, 1, generator)
    conv = conv.bfloat16()
    ours = fused_step(fast, layer, projected, a, b, z, conv, recurrent)
    reference = reference_steps(layer, projected, a, b, z, conv, recurrent)
    assert ours[1].dtype == torch.bfloat16
    assert torch.equal(ours[1], reference[1])  # the newest input rounded once, the held ones shifted
    assert_step_matches(ours, reference)


@pytest.mark.parametrize("value_head_order", ["grouped", "tiled"])
def test_three_decode_steps_match_three_tokens_at_once(value_head_order):
    """Each step's state feeds the next: three calls equal the plain chain run over the three tokens at once
    (the chunked form, as prefill runs them)."""
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer(value_head_order, 2, 4, 64, 64, seed=9)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 2, 3, generator)
    reference_y, reference_conv, reference_recurrent = reference_steps(
        layer, projected, a, b, z, conv, recurrent, delta_rule=chunked_gated_delta_rule
    )
    outputs = []
    for t in range(3):
        token = lambda x: x[:, t : t + 1]  # noqa: E731
        y, conv, recurrent = fused_step(fast, layer, token(projected), token(a), token(b), token(z), conv, recurrent)
        outputs.append(y)
    torch.testing.assert_close(torch.cat(outputs, dim=1), reference_y, **TOLERANCE)
    torch.testing.assert_close(conv, reference_conv, **TOLERANCE)
    torch.testing.assert_close(recurrent, reference_recurrent, **TOLERANCE)


def test_bad_shapes_give_a_clear_error():
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer("grouped", 2, 4, 16, 16)
    projected, a, b, z, conv, recurrent = random_step_inputs(layer, 1, 1, generator)
    with pytest.raises(RuntimeError, match="recurrent_state must be"):
        fused_step(fast, layer, projected, a, b, z, conv, recurrent[:, :3])
    with pytest.raises(RuntimeError, match="projected must be"):
        fused_step(fast, layer, projected[..., 1:], a, b, z, conv, recurrent)


def test_real_fixture_layer(fixtures):
    """A DeltaNet layer of the tiny Q8_0 GGUF (llama.cpp's converter: tiled value heads), its inputs from its
    own in_proj (LinearGroup's column slices), against its own plain methods."""
    import qwen35

    fast = fast_ops_or_skip()
    model = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf")
    network = model.network
    layer = next(block.mixer for block in network.layers if not block.is_attention)
    c = layer.c
    generator = torch.Generator().manual_seed(11)
    projected, a, b, z = layer.in_proj(torch.randn(2, 1, c.hidden_size, generator=generator))
    conv = torch.randn(2, c.linear_conv_dim, c.linear_conv_kernel - 1, generator=generator)
    recurrent = torch.randn(2, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim,
                            generator=generator) * 0.1
    ours = fused_step(fast, layer, projected, a, b, z, conv, recurrent)
    assert_step_matches(ours, reference_steps(layer, projected, a, b, z, conv, recurrent))
