"""The fused decode step of a gated full-attention layer (csrc/attention_decode.cpp) against the model's own
plain steps: rms_norm, apply_rotary, AttentionKV.write, _single_query_attention and the sigmoid gate, in torch."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from qwen35.engine.cache import AttentionKV, HybridCache
from qwen35.model import qwen35 as network_module
from qwen35.model.qwen35 import _single_query_attention, apply_rotary, rms_norm
from conftest import fast_ops_or_skip

EPS = 1e-6
# The new K: the same norm and RoPE, torch's norm summing in another order.
KEY_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}


def reference_step(q_gate, k, v, q_norm, k_norm, cos, sin, kv: AttentionKV, starts, n_q, n_kv, dim):
    """Attention.__call__'s one-token path between qkv_proj and o_proj, in plain torch ops."""
    batch = q_gate.shape[0]
    q_gate = q_gate.view(batch, 1, n_q, 2 * dim)
    q, gate = q_gate[..., :dim], q_gate[..., dim:]
    q = rms_norm(q, q_norm, EPS)
    k = rms_norm(k.view(batch, 1, n_kv, dim), k_norm, EPS)
    v = v.view(batch, 1, n_kv, dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    kv.write(starts, k, v)
    length = int(starts.max()) + 1
    mask = torch.arange(length)[None, None, :] <= starts[:, None, None]
    keys, values = kv.view(length)
    out = _single_query_attention(q, keys, values, mask, dim**-0.5)
    return out * torch.sigmoid(gate.reshape(batch, 1, -1))


def random_case(batch, n_q, n_kv, dim, rotary_dim, lengths, dtype=torch.float32, seed=0):
    """Inputs as the model has them: q_gate, k, v column slices of one projection output (strided rows),
    and a K/V storage with a spare row and spare slots, full of earlier tokens."""
    generator = torch.Generator().manual_seed(seed)
    widths = [2 * n_q * dim, n_kv * dim, n_kv * dim, 3]
    projected = torch.randn(batch, 1, sum(widths), generator=generator) * 2
    q_gate, k, v, _ = projected.split(widths, dim=-1)
    q_norm = 1 + 0.2 * torch.randn(dim, generator=generator)
    k_norm = 1 + 0.2 * torch.randn(dim, generator=generator)
    half_angles = torch.randn(batch, 1, rotary_dim // 2, generator=generator) * 10
    angles = torch.cat([half_angles, half_angles], dim=-1)
    capacity = max(lengths) + 5
    storage = [(torch.randn(batch + 1, capacity, n_kv, dim, generator=generator) * 2).to(dtype) for _ in range(2)]
    starts = torch.tensor(lengths) - 1
    return q_gate, k, v, q_norm, k_norm, angles.cos(), angles.sin(), storage, starts


def assert_output_close(ours, expected):
    """fp32 throughout in other summation orders: both sit ~1e-6 of the largest output from an fp64
    evaluation (outputs near zero are sums that cancel, so their own relative error means little)."""
    error = (ours - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, f"largest error {error:.2e} of the largest output"


def run_both(fast, n_q, n_kv, dim, case):
    q_gate, k, v, q_norm, k_norm, cos, sin, (keys, values), starts = case
    batch = q_gate.shape[0]
    kv = AttentionKV._wrap(keys.clone(), values.clone(), rows=batch)
    expected = reference_step(q_gate, k, v, q_norm, k_norm, cos, sin, kv, starts, n_q, n_kv, dim)
    our_keys, our_values = keys.clone(), values.clone()
    ours = fast.attention_decode(q_gate, k, v, q_norm, k_norm, cos, sin, our_keys, our_values, starts, n_q, n_kv,
                                 dim, EPS, dim**-0.5)
    return ours, expected, (our_keys, our_values), (kv._keys, kv._values), starts


def assert_storage_matches(ours, expected, starts, key_tolerance):
    """The new token's K (close) and V (exact) at each row's slot, and every other slot untouched."""
    (our_keys, our_values), (keys, values) = ours, expected
    written = torch.zeros(keys.shape[:2], dtype=torch.bool)
    written[torch.arange(len(starts)), starts] = True
    assert torch.equal(our_keys[~written], keys[~written])
    assert torch.equal(our_values, values)
    torch.testing.assert_close(our_keys[written].float(), keys[written].float(), **key_tolerance)


@pytest.mark.parametrize(
    "batch,n_q,n_kv,dim,rotary_dim,lengths",
    [
        (1, 8, 2, 256, 64, [1]),
        (1, 8, 2, 256, 64, [37]),
        (1, 16, 2, 256, 64, [3000]),
        (3, 8, 2, 256, 64, [37, 1, 20]),
        (3, 4, 4, 64, 16, [37, 5, 1]),
        (3, 8, 2, 256, 64, [3000, 1, 1700]),
        (3, 4, 4, 64, 16, [3000, 2999, 64]),
        (2, 4, 2, 40, 10, [50, 3]),  # a head size no multiple of 16: masked tails
        (2, 4, 1, 64, 16, [9000, 17]),  # longer than one thread's range: merged from pieces
    ],
)
def test_matches_the_plain_steps(two_threads_at_least, batch, n_q, n_kv, dim, rotary_dim, lengths):
    fast = fast_ops_or_skip()
    case = random_case(batch, n_q, n_kv, dim, rotary_dim, lengths, seed=sum(lengths) + dim)
    ours, expected, our_storage, storage, starts = run_both(fast, n_q, n_kv, dim, case)
    assert_output_close(ours, expected)
    assert_storage_matches(our_storage, storage, starts, KEY_TOLERANCE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", [[37, 2], [3000, 700]])
def test_16_bit_storage(two_threads_at_least, dtype, lengths):
    """K/V stored rounded (as AttentionKV.write rounds them) and read back from the storage."""
    fast = fast_ops_or_skip()
    case = random_case(2, 8, 2, 256, 64, lengths, dtype=dtype, seed=5)
    ours, expected, our_storage, storage, starts = run_both(fast, 8, 2, 256, case)
    assert_output_close(ours, expected)
    # A K value an ulp apart in fp32 may round to the neighbouring 16-bit value.
    assert_storage_matches(our_storage, storage, starts, {"rtol": torch.finfo(dtype).eps, "atol": 1e-6})


def test_bad_inputs_give_a_clear_error():
    fast = fast_ops_or_skip()
    q_gate, k, v, q_norm, k_norm, cos, sin, (keys, values), starts = random_case(2, 4, 2, 64, 16, [5, 3])

    def call(**changed):
        args = dict(q_gate=q_gate, k=k, v=v, q_norm=q_norm, k_norm=k_norm, cos=cos, sin=sin, keys=keys,
                    values=values, starts=starts, num_heads=4, num_kv_heads=2, head_dim=64, eps=EPS, scale=0.125)
        args.update(changed)
        return fast.attention_decode(*args.values())

    with pytest.raises(RuntimeError, match="q_gate must be"):
        call(q_gate=q_gate[..., 1:])
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        call(num_heads=3)
    with pytest.raises(RuntimeError, match="outside a K/V capacity"):
        call(starts=torch.tensor([keys.shape[1], 0]))
    with pytest.raises(RuntimeError, match="fp32, bf16 or fp16"):
        call(keys=keys.to(torch.float64), values=values.to(torch.float64))
    with pytest.raises(RuntimeError, match="even rotary_dim"):
        call(cos=cos[..., 1:], sin=sin[..., 1:])


class RecordingMixer:
    """Stands in for an attention layer's mixer: at a one-token step it runs the layer's own plain path (no
    C++ anywhere, as where the kernels are not built) and keeps what its attention step saw and gave."""

    def __init__(self, mixer):
        self.mixer = mixer
        self.steps = []

    @property
    def output_projection(self):
        return self.mixer.o_proj

    def mix(self, x, kv, starts, rope, mask):
        if x.shape[1] != 1:
            return self.mixer.mix(x, kv, starts, rope, mask)
        mixer, seen = self.mixer, {}
        kv.reserve(tokens=int(starts.max()) + 1)  # what a caller of the fused op does first
        seen["before"] = (kv._keys.clone(), kv._values.clone())
        project = mixer.qkv_proj
        mixer.qkv_proj = lambda h: seen.setdefault("qkv", project(h))
        try:
            with mock.patch.object(network_module, "fused_steps", lambda x: None):
                result = mixer.mix(x, kv, starts, rope, mask)
        finally:
            mixer.qkv_proj = project
        seen.update(gated=result.clone(), after=(kv._keys.clone(), kv._values.clone()), starts=starts.clone(),
                    rope=rope)
        self.steps.append(seen)
        return result


def test_real_fixture_layer(fixtures):
    """A decode token of a two-row batch (rows of 7 and 3 tokens) through the tiny Q8_0 GGUF: its attention
    layer's own inputs (LinearGroup's column slices) into the op vs that layer's plain path."""
    import qwen35

    fast = fast_ops_or_skip()
    model = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf")
    c = model.config
    index = c.layer_types.index(network_module.FULL_ATTENTION)
    layer = model.network.layers[index]
    recorder = RecordingMixer(layer.mixer)
    layer.mixer = recorder
    rows = []
    for prompt in ([11, 22, 33, 44, 55, 66, 77], [101, 202, 303]):
        cache = model.make_cache(1)
        model.forward(torch.tensor([prompt]), cache)
        rows.append(cache)
    cache = HybridCache.merge(rows)
    model.forward(torch.tensor([[5], [9]]), cache)

    step = recorder.steps[-1]
    q_gate, k, v = step["qkv"]
    keys, values = (t.clone() for t in step["before"])
    cos, sin = step["rope"]
    with torch.inference_mode():  # the cache's tensors are inference tensors
        ours = fast.attention_decode(q_gate, k, v, recorder.mixer.q_norm, recorder.mixer.k_norm, cos, sin, keys, values,
                                     step["starts"], c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                     c.rms_norm_eps, c.head_dim**-0.5)
    assert step["starts"].tolist() == [7, 3]
    assert_output_close(ours, step["gated"])
    assert_storage_matches((keys, values), step["after"], step["starts"], KEY_TOLERANCE)


def test_a_rows_result_is_the_same_bits_in_any_batch_and_thread_count():
    """Long contexts are cut into ranges by the row's own length: a row alone, beside a longer
    row, and on one or two threads gives the same bits (as the matmuls do)."""
    fast = fast_ops_or_skip()
    generator = torch.Generator().manual_seed(11)
    n_q, n_kv, dim, rotary = 8, 2, 64, 16
    capacity, starts = 9100, [9000, 900]
    keys = torch.randn(2, capacity, n_kv, dim, generator=generator)
    values = torch.randn(2, capacity, n_kv, dim, generator=generator)
    q_gate = torch.randn(2, 1, n_q * 2 * dim, generator=generator)
    k = torch.randn(2, 1, n_kv * dim, generator=generator)
    v = torch.randn(2, 1, n_kv * dim, generator=generator)
    q_norm, k_norm = torch.rand(dim, generator=generator) + 0.5, torch.rand(dim, generator=generator) + 0.5
    cos, sin = torch.rand(2, 1, rotary, generator=generator), torch.rand(2, 1, rotary, generator=generator)

    def run(rows, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fast.attention_decode(q_gate[rows], k[rows], v[rows], q_norm, k_norm, cos[rows], sin[rows],
                                         keys[rows].clone(), values[rows].clone(), torch.tensor(starts)[rows],
                                         n_q, n_kv, dim, 1e-6, dim**-0.5)
        finally:
            torch.set_num_threads(previous)

    together = run([0, 1], 2)
    for threads in (1, 2):
        assert torch.equal(run([1], threads)[0], together[1])
        assert torch.equal(run([0], threads)[0], together[0])


def _plain_attention(q, keys, values, mask, scale):
    """Softmax attention in float64, query head h on kv head h // (n_q / n_kv): the definition."""
    group = q.shape[2] // keys.shape[2]
    k, v = (t.double().repeat_interleave(group, dim=2) for t in (keys, values))
    scores = torch.einsum("bthd,bshd->bhts", q.double(), k) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v).reshape(*q.shape[:2], -1)


def test_prompt_attention_over_bf16_kv_runs_causal_from_the_corner_without_a_mask():
    """A prompt piece of 7 tokens after 9 cached ones over bf16 K/V (a GPU's fast precision): SDPA's
    bottom-right causal form in bf16 vs the definition; a span wider than the rows (a pinned cache)
    keeps the explicit mask."""
    from qwen35.model.qwen35 import _prompt_attention

    generator = torch.Generator().manual_seed(3)
    length, cached, n_q, n_kv, dim = 7, 9, 4, 2, 64
    q = torch.randn(1, length, n_q, dim, generator=generator)
    for span in (cached + length, cached + length + 5):
        keys, values = (torch.randn(1, span, n_kv, dim, generator=generator).bfloat16() for _ in range(2))
        mask = torch.arange(span)[None, None, :] <= (cached + torch.arange(length))[None, :, None]
        ours = _prompt_attention(q, keys, values, mask, dim**-0.5)
        expected = _plain_attention(q, keys.float(), values.float(), mask, dim**-0.5)
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        tolerance = 2e-2 if span == cached + length else 1e-5  # bf16 q and products / fp32
        assert (ours.double() - expected).abs().max() <= tolerance * expected.abs().max()
