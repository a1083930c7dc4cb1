"""The gated delta rule: our chunked and recurrent forms vs transformers' reference forms, and each other."""

import pytest
import torch
import torch.nn.functional as F

from qwen35.kernels.delta_rule import chunked_gated_delta_rule, gated_delta_rule, recurrent_gated_delta_rule

transformers_qwen = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def random_inputs(batch, heads, length, d_k=16, d_v=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, heads, length, d_k, generator=generator), dim=-1) * d_k**-0.5
    k = F.normalize(torch.randn(batch, heads, length, d_k, generator=generator), dim=-1)
    v = torch.randn(batch, heads, length, d_v, generator=generator)
    g = -F.softplus(torch.randn(batch, heads, length, generator=generator)) * 0.5
    beta = torch.rand(batch, heads, length, generator=generator)
    state = torch.randn(batch, heads, d_k, d_v, generator=generator) * 0.1
    return q, k, v, g, beta, state


def transformers_form(function, q, k, v, g, beta, state, **kwargs):
    """Call transformers' form with its [B, T, H, d] layout; it scales q itself, so undo ours."""
    to_seq_major = lambda x: x.transpose(1, 2)  # noqa: E731
    scale = q.shape[-1] ** 0.5
    out, final = function(
        to_seq_major(q * scale), to_seq_major(k), to_seq_major(v), to_seq_major(g), to_seq_major(beta),
        initial_state=state.clone(), output_final_state=True, **kwargs,
    )
    return out.transpose(1, 2), final


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 130])
def test_chunked_matches_transformers_chunked(length):
    inputs = random_inputs(2, 3, length)
    ours, our_state = chunked_gated_delta_rule(*inputs)
    theirs, their_state = transformers_form(transformers_qwen.torch_chunk_gated_delta_rule, *inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [1, 7, 70])
def test_recurrent_matches_transformers_recurrent(length):
    inputs = random_inputs(1, 2, length, seed=1)
    ours, our_state = recurrent_gated_delta_rule(*inputs)
    theirs, their_state = transformers_form(transformers_qwen.torch_recurrent_gated_delta_rule, *inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length,chunk_size", [(1, 64), (63, 64), (64, 64), (65, 64), (200, 64), (37, 8)])
def test_chunked_equals_recurrent(length, chunk_size):
    inputs = random_inputs(2, 2, length, seed=length)
    chunked, chunked_state = chunked_gated_delta_rule(*inputs, chunk_size=chunk_size)
    recurrent, recurrent_state = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(chunked, recurrent, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunked_state, recurrent_state, atol=1e-5, rtol=1e-4)


def test_splitting_a_sequence_carries_the_state():
    q, k, v, g, beta, state = random_inputs(1, 2, 150, seed=3)
    whole, whole_state = gated_delta_rule(q, k, v, g, beta, state)
    first, mid_state = gated_delta_rule(q[:, :, :100], k[:, :, :100], v[:, :, :100], g[:, :, :100], beta[:, :, :100], state)
    second, end_state = gated_delta_rule(q[:, :, 100:], k[:, :, 100:], v[:, :, 100:], g[:, :, 100:], beta[:, :, 100:], mid_state)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(end_state, whole_state, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("length", [1, 2, 9])
def test_fused_recurrent_kernel_matches_transformers_recurrent(length):
    from qwen35.kernels import fast_cpu

    if not fast_cpu.available():
        pytest.skip("fast CPU kernels unavailable here")
    inputs = random_inputs(2, 3, length, d_k=32, d_v=48, seed=4)
    state_before = inputs[-1].clone()
    ours, our_state = fast_cpu.recurrent_delta_rule(*inputs)
    theirs, their_state = transformers_form(transformers_qwen.torch_recurrent_gated_delta_rule, *inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-4)
    assert torch.equal(inputs[-1], state_before)  # the caller's state (a cache snapshot) is not written
    reference, reference_state = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(our_state, reference_state, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "length,chunk_size,d_k,d_v", [(1, 64, 16, 16), (65, 64, 16, 24), (130, 64, 128, 128), (37, 8, 32, 48), (100, 64, 20, 36)]
)
def test_chunked_kernel_matches_transformers_chunked(length, chunk_size, d_k, d_v):
    """The C++ chunked form (fast path of prefill) against transformers' and our plain form; uneven
    head sizes exercise the kernel's masked column tails, short last chunks its row tails."""
    from qwen35.kernels.delta_rule import fast_ops

    if fast_ops() is None:
        pytest.skip("fast CPU kernels unavailable here")
    inputs = random_inputs(2, 3, length, d_k=d_k, d_v=d_v, seed=5)
    state_before = inputs[-1].clone()
    ours, our_state = fast_ops().chunked_delta_rule(*inputs, chunk_size)
    theirs, their_state = transformers_form(
        transformers_qwen.torch_chunk_gated_delta_rule, *inputs, chunk_size=chunk_size
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_state, their_state, atol=1e-5, rtol=1e-4)
    assert torch.equal(inputs[-1], state_before)
    reference, reference_state = chunked_gated_delta_rule(*inputs, chunk_size=chunk_size)
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(our_state, reference_state, atol=2e-6, rtol=1e-5)


def test_chunked_kernel_survives_strong_decay():
    """Log-decays far below fp32's exp range inside one chunk: the pair decays must underflow to 0, not NaN."""
    from qwen35.kernels.delta_rule import fast_ops

    if fast_ops() is None:
        pytest.skip("fast CPU kernels unavailable here")
    q, k, v, g, beta, state = random_inputs(1, 2, 80, d_k=32, d_v=32, seed=6)
    g = g * 60  # down to about -100 per step: G falls by thousands within a chunk
    ours, our_state = fast_ops().chunked_delta_rule(q, k, v, g, beta, state, 64)
    reference, reference_state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
    assert torch.isfinite(ours).all() and torch.isfinite(our_state).all()
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_state, reference_state, atol=1e-5, rtol=1e-4)


# --- the steps around the delta rule: GatedDeltaNet's C++ path against its plain methods -----------


def deltanet_layer(value_head_order="grouped", d_k=16, d_v=27, conv_kernel=4, seed=7):
    """A GatedDeltaNet with random weights (2 key heads, 4 value heads; d_v=27 leaves partial vectors)."""
    from qwen35.kernels.quant_linear import QuantLinear
    from qwen35.model.config import LINEAR_ATTENTION, ModelConfig
    from qwen35.model.qwen35 import GatedDeltaNet

    config = ModelConfig(
        architecture="qwen35", hidden_size=48, num_layers=1, vocab_size=16, layer_types=(LINEAR_ATTENTION,),
        rms_norm_eps=1e-6, num_attention_heads=2, num_key_value_heads=1, head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=d_k, linear_value_head_dim=d_v, linear_conv_kernel=conv_kernel,
        rope_theta=1e7, rotary_dim=8, mrope_section=(2, 1, 1), intermediate_size=64, value_head_order=value_head_order,
    )
    generator = torch.Generator().manual_seed(seed)

    def linear(out_features):  # an fp32 weight: the reference matmul, exact
        return QuantLinear.from_dense(torch.randn(out_features, config.hidden_size, generator=generator) * 0.2)

    prefix = "layer"
    weights = {
        f"{prefix}.in_proj_qkv": linear(config.linear_conv_dim),
        f"{prefix}.in_proj_z": linear(config.linear_value_dim),
        f"{prefix}.in_proj_b": linear(4),
        f"{prefix}.in_proj_a": linear(4),
        f"{prefix}.out_proj": lambda x: x,
        f"{prefix}.conv1d": torch.randn(config.linear_conv_dim, conv_kernel, generator=generator) * 0.5,
        f"{prefix}.dt_bias": torch.randn(4, generator=generator),
        f"{prefix}.decay_rate": -torch.rand(4, generator=generator) * 4,
        f"{prefix}.norm": 1 + 0.1 * torch.randn(d_v, generator=generator),
    }
    return GatedDeltaNet(config, weights, prefix), generator


def fast_ops_or_skip():
    from qwen35.kernels.delta_rule import fast_ops

    if fast_ops() is None:
        pytest.skip("fast CPU kernels unavailable here")
    return fast_ops()


@pytest.mark.parametrize("conv_kernel", [2, 4, 5])
@pytest.mark.parametrize("length", [1, 2, 37])
def test_conv_kernel_gives_the_reference_bits(length, conv_kernel):
    """Same products summed in the same order, and torch's own SiLU: bit-equal, new conv state included
    (lengths shorter than the kernel keep part of the held inputs)."""
    from qwen35.engine.cache import DeltaNetState

    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer(conv_kernel=conv_kernel)
    projected = torch.randn(2, length, layer.c.linear_conv_dim, generator=generator)
    held = torch.randn(2, layer.c.linear_conv_dim, conv_kernel - 1, generator=generator)
    state = DeltaNetState(held.clone(), torch.zeros(0))
    reference = layer.causal_conv(projected, state)
    ours, our_conv_state = fast.causal_conv_silu(projected, held, layer.conv_weight)
    assert torch.equal(ours, reference)
    assert torch.equal(our_conv_state, state.conv)


@pytest.mark.parametrize("value_head_order", ["grouped", "tiled"])
@pytest.mark.parametrize("length", [1, 37])
def test_input_and_output_kernels_give_the_reference_bits(value_head_order, length):
    """q, k (l2 norms by torch's own reductions), v, g, beta and the gated output norm: bit-equal, so the
    fast path changes no model output through them."""
    fast = fast_ops_or_skip()
    layer, generator = deltanet_layer(value_head_order)
    c = layer.c
    mixed = torch.randn(2, length, c.linear_conv_dim, generator=generator)
    a, b = torch.randn(2, length, 4, generator=generator), torch.randn(2, length, 4, generator=generator)
    reference = layer.delta_rule_inputs(mixed, a, b)
    ours = fast.deltanet_inputs(
        mixed, a, b, layer.dt_bias, layer.decay_rate, c.linear_num_key_heads, c.linear_key_head_dim,
        c.linear_num_value_heads, c.linear_value_head_dim, value_head_order == "grouped", 1e-6,
    )
    for name, mine, theirs in zip("q k v g beta".split(), ours, reference):
        assert torch.equal(mine, theirs), name

    out = torch.randn(2, 4, length, c.linear_value_head_dim, generator=generator)
    z = torch.randn(2, length, c.linear_value_dim, generator=generator)
    assert torch.equal(fast.gated_rms_norm(out, z, layer.norm, c.rms_norm_eps), layer.gated_norm(out, z))


def test_fast_layer_matches_plain_layer_over_prefill_and_decode(monkeypatch):
    """A whole GatedDeltaNet, prefill then two decode steps, through its C++ path and its plain path."""
    import qwen35.model.qwen35 as model_module
    from qwen35.engine.cache import DeltaNetState

    fast_ops_or_skip()
    layer, generator = deltanet_layer(d_k=32, d_v=32)
    c = layer.c
    inputs = [torch.randn(1, length, c.hidden_size, generator=generator) for length in (70, 1, 1)]

    def run():
        state = DeltaNetState(torch.zeros(1, c.linear_conv_dim, 3), torch.zeros(1, 4, 32, 32))
        return [layer(x, state) for x in inputs], state

    fast_outputs, fast_state = run()
    monkeypatch.setattr(model_module, "fused_steps", lambda x: None)
    plain_outputs, plain_state = run()
    for fast_out, plain_out in zip(fast_outputs, plain_outputs):
        torch.testing.assert_close(fast_out, plain_out, atol=1e-5, rtol=1e-4)
    assert torch.equal(fast_state.conv, plain_state.conv)
    torch.testing.assert_close(fast_state.recurrent, plain_state.recurrent, atol=1e-5, rtol=1e-4)
