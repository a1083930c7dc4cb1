"""The fused decode step over K/V kept in llama.cpp's cache types (-ctk/-ctv f32, f16, bf16, q8_0, q4_0,
q4_1, q5_0, q5_1, K and V each its own: csrc/attention_decode.cpp with attention_kv_blocks.h) against the
model's plain path on the same TypedAttentionKV store (Attention._attend without fused steps: norms, RoPE,
`write` quantizing, `view` dequantizing the cache, _single_query_attention), and the new token's blocks
against gguf-py's quantizer."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

import qwen35
from qwen35.engine.quantized_kv import BLOCK_TYPES, FLOAT_TYPES, TypedAttentionKV, attention_kv_class
from qwen35.model import fused
from qwen35.model import qwen35 as network_module
from qwen35.model.qwen35 import apply_rotary, layer_rms_norm
from conftest import fast_ops_or_skip

EPS = 1e-6
CACHE_TYPES = [*FLOAT_TYPES, *BLOCK_TYPES]
# ggml's type ids, which attention_decode_blocks takes.
TYPE_IDS = {**{name: int(GGMLQuantizationType[name.upper()]) for name in FLOAT_TYPES},
            **{name: int(ggml_type) for name, ggml_type in BLOCK_TYPES.items()}}
# Each block type alone, llama.cpp's common -ctk q8_0 -ctv f16, and other mixes of blocks and floats.
TYPE_PAIRS = [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_1", "q4_1"), ("q5_0", "q5_0"), ("q5_1", "q5_1"),
              ("q8_0", "q4_0"), ("q8_0", "f16"), ("q5_1", "q4_1"), ("f16", "q5_0"), ("bf16", "q8_0")]


def attention_layer(n_q, n_kv, dim, generator):
    """The model's Attention with only what its step between the matmuls reads (config, the two norms)."""
    layer = network_module.Attention.__new__(network_module.Attention)
    layer.c = SimpleNamespace(num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=dim, rms_norm_eps=EPS)
    layer.q_norm = 1 + 0.2 * torch.randn(dim, generator=generator)
    layer.k_norm = 1 + 0.2 * torch.randn(dim, generator=generator)
    return layer


def filled_store(type_k, type_v, batch, n_kv, dim, lengths, generator) -> TypedAttentionKV:
    """A store with a spare row and spare slots, every slot holding an earlier token's quantized K/V."""
    capacity = max(lengths) + 5
    kv = attention_kv_class(type_k, type_v)(batch, n_kv, dim, "cpu")
    kv.reserve(rows=batch + 1, tokens=capacity)
    earlier = [torch.randn(batch, capacity, n_kv, dim, generator=generator) * 2 for _ in range(2)]
    kv.write(torch.zeros(batch, dtype=torch.long), *earlier)
    return kv


def copy_store(kv: TypedAttentionKV) -> TypedAttentionKV:
    return type(kv)._wrap(*(store.clone() for store in kv.storage), rows=kv.rows)


def step_inputs(batch, n_q, n_kv, dim, rotary_dim, lengths, generator):
    """q_gate, k, v as column slices of one projection output (strided rows, as LinearGroup gives them)."""
    widths = [2 * n_q * dim, n_kv * dim, n_kv * dim, 3]
    projected = torch.randn(batch, 1, sum(widths), generator=generator) * 2
    q_gate, k, v, _ = projected.split(widths, dim=-1)
    half_angles = torch.randn(batch, 1, rotary_dim // 2, generator=generator) * 10
    angles = torch.cat([half_angles, half_angles], dim=-1)
    starts = torch.tensor(lengths) - 1
    mask = torch.arange(max(lengths))[None, None, :] <= starts[:, None, None]
    return q_gate, k, v, (angles.cos(), angles.sin()), starts, mask


def run_both(type_k, type_v, batch, n_q, n_kv, dim, rotary_dim, lengths, seed=0):
    """The same step through Attention._attend twice: the fused C++ step, and the plain lines (the CPU's
    cache types taken away from the fused steps). -> (fused output, plain output, fused store, plain store)."""
    generator = torch.Generator().manual_seed(seed)
    layer = attention_layer(n_q, n_kv, dim, generator)
    ours = filled_store(type_k, type_v, batch, n_kv, dim, lengths, generator)
    plain = copy_store(ours)
    q_gate, k, v, rope, starts, mask = step_inputs(batch, n_q, n_kv, dim, rotary_dim, lengths, generator)
    x = torch.zeros(batch, 1, 8)  # _attend reads its shape and device only
    calls = []
    original = fused.CPU_STEPS.attention_decode

    def counted(kv, *args):
        calls.append(type(kv))
        return original(kv, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused.CPU_STEPS, "attention_decode", counted)
        fused_out = layer._attend(x, q_gate, k, v, ours, starts, rope, mask)
        assert calls == [type(ours)], "the typed store did not take the fused step"
        patch.setattr(fused, "CPU_BLOCK_KV_TYPES", frozenset())
        plain_out = layer._attend(x, q_gate, k, v, plain, starts, rope, mask)
        assert len(calls) == 1, "the plain path took the fused step"
    return fused_out, plain_out, ours, plain


def assert_output_close(ours, expected):
    """fp32 over the same dequantized values in other summation orders."""
    error = (ours - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, f"largest error {error:.2e} of the largest output"


def assert_same_storage(ours: TypedAttentionKV, plain: TypedAttentionKV):
    """The same K and V written: every slot, the new tokens' included, bit for bit."""
    for our_store, plain_store, cache_type in zip(ours.storage, plain.storage, (ours.type_k, ours.type_v)):
        assert our_store.dtype == FLOAT_TYPES.get(cache_type, torch.uint8) and torch.equal(our_store, plain_store)


@pytest.mark.parametrize("type_k,type_v", TYPE_PAIRS)
@pytest.mark.parametrize(
    "batch,n_q,n_kv,dim,rotary_dim,lengths",
    [
        (1, 8, 2, 256, 64, [1]),
        (3, 8, 2, 256, 64, [37, 1, 20]),
        (3, 4, 4, 64, 16, [37, 5, 1]),
        (2, 16, 2, 256, 64, [1300, 700]),  # longer than one range of 512 slots: merged from pieces
        (2, 4, 1, 64, 16, [3000, 17]),
        # Groups of 6 and 3 query heads: 4- and 5-bit K blocks decoded once for 3 passes (of 2 heads, of 1), V for 6.
        (1, 12, 2, 64, 16, [700]),
        (1, 6, 2, 64, 16, [600]),
    ],
)
def test_matches_the_plain_path_on_the_same_store(two_threads_at_least, type_k, type_v, batch, n_q, n_kv, dim,
                                                  rotary_dim, lengths):
    fast_ops_or_skip()
    fused_out, plain_out, ours, plain = run_both(type_k, type_v, batch, n_q, n_kv, dim, rotary_dim, lengths,
                                                 seed=sum(lengths) + dim)
    assert_output_close(fused_out, plain_out)
    assert_same_storage(ours, plain)


@pytest.mark.parametrize("type_k,type_v", list(itertools.product(CACHE_TYPES, repeat=2)))
def test_every_pair_of_types_takes_the_fused_step(type_k, type_v):
    """No pair of cache types is left to the plain path, which dequantizes the whole cache each step."""
    fast_ops_or_skip()
    fused_out, plain_out, ours, plain = run_both(type_k, type_v, 2, 4, 2, 64, 16, [40, 3],
                                                 seed=TYPE_IDS[type_k] * 31 + TYPE_IDS[type_v])
    assert_output_close(fused_out, plain_out)
    assert_same_storage(ours, plain)


def edge_rows() -> np.ndarray:
    """[10, 256] float32 rows made to hit the quantizers' edges: rounding ties, zeros, one value, a spike,
    huge and tiny scales."""
    rng = np.random.default_rng(7)
    ties = rng.integers(-120, 120, 256) + 0.5
    ties[::32] = 127  # Q8_0's scale is then exactly 1 and every other value a tie
    return np.stack([
        ties, (rng.integers(-16, 17, 256) * 0.5), np.zeros(256), np.full(256, -0.37),
        np.where(np.arange(256) == 77, 1e3, 1e-3), rng.standard_normal(256) * 3e4, rng.standard_normal(256) * 3e37,
        rng.standard_normal(256) * 1e-30, rng.standard_normal(256) * 1e-4, rng.standard_normal(256),
    ]).astype(np.float32)


@pytest.mark.parametrize("cache_type", list(BLOCK_TYPES))
def test_new_tokens_are_quantized_as_gguf_py_quantizes(cache_type):
    """The new token's blocks are gguf-py's `quantize` of its float32 vectors: V as given, for rows made to hit
    the quantizers' edges, and K as the plain path has it before `write` (normed and rotated). K and V are
    of different types, so that each is written through its own type."""
    fast = fast_ops_or_skip()
    rows = edge_rows()
    other = "f16" if cache_type != "q8_0" else "q5_1"
    n_kv, dim, n_q, batch = 2, 256, 2, rows.shape[0] // 2
    values = torch.from_numpy(rows).reshape(batch, 1, n_kv * dim)
    generator = torch.Generator().manual_seed(1)
    q_gate = torch.randn(batch, 1, 2 * n_q * dim, generator=generator)
    keys = torch.randn(batch, 1, n_kv * dim, generator=generator) * 3
    k_norm = 1 + 0.2 * torch.randn(dim, generator=generator)
    angles = torch.randn(batch, 1, 32, generator=generator)
    cos, sin = angles.cos(), angles.sin()
    starts = torch.tensor([2, 0, 3, 1, 2])
    for type_k, type_v in ((other, cache_type), (cache_type, other)):
        kv = attention_kv_class(type_k, type_v)(batch, n_kv, dim, "cpu")
        kv.reserve(tokens=4)
        fast.attention_decode_blocks(q_gate, keys, values, torch.ones(dim), k_norm, cos, sin, *kv.storage, starts,
                                     n_q, n_kv, dim, EPS, dim**-0.5, TYPE_IDS[type_k], TYPE_IDS[type_v])
        if type_v == cache_type:
            written, given = kv.storage[1], rows
        else:
            normed = layer_rms_norm(keys.view(batch, 1, n_kv, dim), k_norm, EPS)
            written, given = kv.storage[0], apply_rotary(normed, cos, sin).reshape(rows.shape).numpy()
        written = written[torch.arange(batch), starts].reshape(rows.shape[0], -1).numpy()
        with np.errstate(over="ignore"):
            expected = quantize(given, BLOCK_TYPES[cache_type])
        assert np.array_equal(written, expected), f"{cache_type} as {'V' if type_v == cache_type else 'K'}"


@pytest.mark.parametrize("type_k,type_v", [("q8_0", "q4_0"), ("q5_1", "f16")])
def test_a_rows_result_is_the_same_bits_in_any_batch_and_thread_count(type_k, type_v):
    fast = fast_ops_or_skip()
    generator = torch.Generator().manual_seed(3)
    n_q, n_kv, dim, lengths = 8, 2, 64, [2000, 300]
    kv = filled_store(type_k, type_v, 2, n_kv, dim, lengths, generator)
    q_gate, k, v, (cos, sin), starts, _ = step_inputs(2, n_q, n_kv, dim, 16, lengths, generator)
    norm = torch.ones(dim)

    def run(rows, threads):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            keys, values = (store[rows].clone() for store in kv.storage)
            return fast.attention_decode_blocks(q_gate[rows], k[rows], v[rows], norm, norm, cos[rows], sin[rows], keys,
                                                values, starts[rows], n_q, n_kv, dim, EPS, dim**-0.5, TYPE_IDS[type_k],
                                                TYPE_IDS[type_v])
        finally:
            torch.set_num_threads(previous)

    together = run([0, 1], 2)
    for threads in (1, 2):
        assert torch.equal(run([0], threads)[0], together[0]) and torch.equal(run([1], threads)[0], together[1])


def test_bad_inputs_give_a_clear_error():
    fast = fast_ops_or_skip()
    generator = torch.Generator().manual_seed(0)
    kv = filled_store("q8_0", "f16", 2, 2, 64, [5, 3], generator)
    q_gate, k, v, (cos, sin), starts, _ = step_inputs(2, 4, 2, 64, 16, [5, 3], generator)
    keys, values = kv.storage

    def call(keys=keys, values=values, key_type=8, value_type=1):
        return fast.attention_decode_blocks(q_gate, k, v, torch.ones(64), torch.ones(64), cos, sin, keys, values,
                                            starts, 4, 2, 64, EPS, 0.125, key_type, value_type)

    with pytest.raises(RuntimeError, match="must be f32, f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1"):
        call(key_type=12)  # Q4_K: no cache type
    with pytest.raises(RuntimeError, match="whole blocks"):
        call(key_type=2)  # Q8_0 bytes read as Q4_0's
    with pytest.raises(RuntimeError, match="whole blocks"):
        call(keys=keys[..., :34])
    with pytest.raises(RuntimeError, match="values of type 30 must be BFloat16"):
        call(value_type=30)  # f16 storage said to be bf16
    with pytest.raises(RuntimeError, match="values of type 0 must be Float"):
        call(values=values.float()[..., :32], value_type=0)
    with pytest.raises(RuntimeError, match="one capacity"):
        call(values=values[:, :-1])


@pytest.mark.parametrize("type_k,type_v", [("q8_0", "f16"), ("q5_1", "q4_1")])
def test_the_models_decode_takes_the_fused_step(dense_hf, monkeypatch, type_k, type_v):
    """`-ctk type_k -ctv type_v` in fast precision: every decode step of every attention layer goes through
    the fused op, and the logits are the plain path's."""
    fast_ops_or_skip()
    model = qwen35.load_model(dense_hf, precision="fast", cache_type_k=type_k, cache_type_v=type_v)
    prompt, more = list(range(100, 130)), [7, 300, 41, 5]
    calls = []
    original = fused.CPU_STEPS.attention_decode
    monkeypatch.setattr(fused.CPU_STEPS, "attention_decode",
                        lambda kv, *args: calls.append(type(kv)) or original(kv, *args))

    def logits():
        cache = model.make_cache(1)
        model.forward(torch.tensor([prompt]), cache)
        return torch.stack([model.forward(torch.tensor([[token]]), cache)[0, -1] for token in more])

    ours = logits()
    layers = model.config.layer_types.count(network_module.FULL_ATTENTION)
    assert len(calls) == layers * len(more) and all(issubclass(kind, TypedAttentionKV) for kind in calls)
    monkeypatch.setattr(fused, "CPU_BLOCK_KV_TYPES", frozenset())
    plain = logits()
    assert len(calls) == layers * len(more)
    assert (ours - plain).abs().max() <= 1e-4
