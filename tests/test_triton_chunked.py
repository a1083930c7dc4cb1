"""The Triton chunked delta rule (kernels/triton_chunked.py) against delta_rule.py's plain references:
recurrent_gated_delta_rule (token by token, the definition) and chunked_gated_delta_rule (the same
chunk maths with a Python loop over chunks). Without a GPU the kernel runs in Triton's interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import random_delta_rule_inputs, triton_devices  # noqa: E402

from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels.delta_rule import chunked_gated_delta_rule, recurrent_gated_delta_rule  # noqa: E402
from qwen35.kernels.triton_chunked import chunked_delta_rule  # noqa: E402

# fp32 throughout; only summation orders, fused multiply-adds and the GPU's exp differ.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
DEVICES = triton_devices()


def chunk_inputs(*args):
    """Gentler decays than the decode tests': over a chunk the log-decays add up."""
    return random_delta_rule_inputs(*args, max_decay=0.5)


def run_on(device, q, k, v, g, beta, state, **kwargs):
    out, final_state = chunked_delta_rule(*(x.to(device) for x in (q, k, v, g, beta, state)), **kwargs)
    return out.cpu(), final_state.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("length", [1, 63, 64, 130])
@pytest.mark.parametrize("d_v", [32, 40])
def test_matches_references(device, batch, length, d_v):
    """Lengths inside one chunk, exactly one, and a padded third; d_v 40 is no power of two and ends in a
    partial column block. Both the outputs and the final state match the token-by-token and the chunked forms."""
    generator = torch.Generator().manual_seed(1000 * batch + length + d_v)
    inputs = chunk_inputs(batch, 2, length, 32, d_v, generator)
    out, final_state = run_on(device, *inputs)
    assert out.dtype == torch.float32 and final_state.dtype == torch.float32
    assert out.shape == (batch, 2, length, d_v) and final_state.shape == (batch, 2, 32, d_v)
    for reference in (recurrent_gated_delta_rule, chunked_gated_delta_rule):
        reference_out, reference_state = reference(*inputs)
        torch.testing.assert_close(out, reference_out, **TOLERANCE)
        torch.testing.assert_close(final_state, reference_state, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_size", [16, 24])
def test_other_chunk_sizes(device, chunk_size):
    """Nine or six chunks carry the state further; 24 is no power of two (its tiles are padded to 32);
    d_k 48 is no power of two either."""
    inputs = chunk_inputs(1, 1, 140, 48, 32, torch.Generator().manual_seed(chunk_size))
    out, final_state = run_on(device, *inputs, chunk_size=chunk_size)
    reference_out, reference_state = recurrent_gated_delta_rule(*inputs)
    torch.testing.assert_close(out, reference_out, **TOLERANCE)
    torch.testing.assert_close(final_state, reference_state, **TOLERANCE)
    chunked_out, chunked_state = chunked_gated_delta_rule(*inputs, chunk_size=chunk_size)
    torch.testing.assert_close(out, chunked_out, **TOLERANCE)
    torch.testing.assert_close(final_state, chunked_state, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_leaves_the_given_state_alone(device):
    q, k, v, g, beta, state = chunk_inputs(1, 2, 70, 32, 32, torch.Generator().manual_seed(3))
    state = state.to(device)
    kept = state.clone()
    _, final_state = chunked_delta_rule(q.to(device), k.to(device), v.to(device), g.to(device), beta.to(device), state)
    assert final_state.data_ptr() != state.data_ptr()
    torch.testing.assert_close(state, kept, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_takes_bf16_strided_inputs_and_a_strided_state(device):
    """Token-major [B, T, H, d] bf16 tensors seen head-major, and a state stored transposed: strided views,
    computed in fp32."""
    q, k, v, g, beta, state = chunk_inputs(2, 2, 70, 32, 32, torch.Generator().manual_seed(11))
    q, k, v = (x.transpose(1, 2).contiguous().bfloat16().transpose(1, 2) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (g, beta))
    strided_state = state.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided_state.is_contiguous()
    out, final_state = run_on(device, q, k, v, g, beta, strided_state)
    reference_out, reference_state = recurrent_gated_delta_rule(q.float(), k.float(), v.float(), g, beta, state)
    torch.testing.assert_close(out, reference_out, **TOLERANCE)
    torch.testing.assert_close(final_state, reference_state, **TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_prompt_returns_the_state(device):
    q, k, v, g, beta, state = chunk_inputs(1, 2, 0, 32, 32, torch.Generator().manual_seed(5))
    out, final_state = run_on(device, q, k, v, g, beta, state)
    assert out.shape == (1, 2, 0, 32)
    torch.testing.assert_close(final_state, state, rtol=0, atol=0)


def bad_inputs():
    q, k, v, g, beta, state = chunk_inputs(1, 2, 5, 32, 32, torch.Generator().manual_seed(0))
    yield "q must be", (q[0], k, v, g, beta, state), {}
    yield "k must be shaped like q", (q, k[..., :16], v, g, beta, state), {}
    yield "v must be", (q, k, v[:, :1], g, beta, state), {}
    yield "g must be", (q, k, v, g[..., :4], beta, state), {}
    yield "beta must be", (q, k, v, g, beta[None], state), {}
    yield "state must be", (q, k, v, g, beta, state[..., :16]), {}
    yield "state must be float32", (q, k, v, g, beta, state.double()), {}
    yield "q must be float32 or bfloat16", (q.to(torch.int32), k, v, g, beta, state), {}
    yield "chunk_size must be", (q, k, v, g, beta, state), {"chunk_size": 0}
    yield "chunk_size must be", (q, k, v, g, beta, state), {"chunk_size": 256}
    wide = torch.zeros(1, 1, 1, 257)
    yield "d_k 257 is over 256", (wide, wide, v[:1, :1, :1], g[:1, :1, :1], beta[:1, :1, :1],
                                  torch.zeros(1, 1, 257, 32)), {}


@pytest.mark.parametrize("match, args, kwargs", list(bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_rejects_bad_input(match, args, kwargs):
    with pytest.raises(Qwen35Error, match=match):
        chunked_delta_rule(*args, **kwargs)
