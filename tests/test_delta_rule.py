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
