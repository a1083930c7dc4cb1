"""GGUF block K/V on the GPU's path (-ctk/-ctv q8_0, q4_0, q4_1, q5_0, q5_1 on a GPU): the device functions
of kernels/triton_kv_blocks.py, the paged decode kernel reading and writing block pools, and
engine/paged_kv.py's block pools.

References: gguf-py's quantizer and dequantizer (the blocks, bit for bit); the model's plain attention path
over the CPU's TypedAttentionKV of the same types (tests/test_quantized_kv.py checks that one against
transformers with its K/V round-tripped through gguf-py). Without a GPU the kernels run in Triton's
interpreter."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

pytest.importorskip("triton")

from conftest import triton_devices  # noqa: E402
from test_triton_attention import attention_layer  # noqa: E402

from qwen35.engine.paged_kv import PagedAttentionKV  # noqa: E402
from qwen35.engine.quantized_kv import FLOAT_TYPES, attention_kv_class, block_type  # noqa: E402
from qwen35.errors import Qwen35Error  # noqa: E402
from qwen35.kernels import triton_kv_blocks  # noqa: E402
from qwen35.kernels.triton_paged_attention import paged_attention_decode_  # noqa: E402
from qwen35.model import qwen35 as network_module  # noqa: E402
from qwen35.model.qwen35 import RotaryEmbedding  # noqa: E402

DEVICES = triton_devices()
BLOCK_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
PAGE = 16


def awkward_rows(seed: int) -> torch.Tensor:
    """Rows that find the quantizers' edges: zeros, one repeated value, rounding ties, magnitudes tied
    with opposite signs (q4_0/q5_0 take the first), spikes and tiny values."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(6, 96, generator=generator) * 3
    ties = torch.randint(-120, 120, (4, 96), generator=generator) + 0.5
    ties[:, ::32] = 127
    signs = torch.randn(2, 96, generator=generator)
    signs[:, 5], signs[:, 9] = -4.0, 4.0
    signs[:, 40], signs[:, 33] = 4.0, -4.0
    spike = torch.where(torch.arange(96) == 77, 1e3, 1e-3)[None]
    return torch.cat([normal, ties, signs, spike, torch.zeros(1, 96), torch.full((1, 96), -0.37),
                      torch.randn(2, 96, generator=generator) * 1e-30]).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_type", BLOCK_TYPES)
def test_the_device_functions_quantize_and_read_as_gguf_py(device, cache_type):
    rows = awkward_rows(len(cache_type))
    gguf_type = GGMLQuantizationType[cache_type.upper()]
    expected_blocks = quantize(rows.numpy(), gguf_type)
    expected_values = dequantize(expected_blocks, gguf_type)
    blocks, kept = triton_kv_blocks.quantize(rows.to(device), cache_type)
    assert np.array_equal(blocks.cpu().numpy(), expected_blocks)
    assert np.array_equal(kept.cpu().numpy(), expected_values)  # what a kernel attends to is what it stored
    read = triton_kv_blocks.dequantize(torch.from_numpy(expected_blocks).to(device), cache_type, rows.shape[1])
    assert np.array_equal(read.cpu().numpy(), expected_values)


def _stores(type_k, type_v, batch, n_kv, head_dim):
    """A CPU TypedAttentionKV of these types and a PagedAttentionKV keeping the same: block pools for block
    types, the float type's dtype for the float pool (float32 when both are blocks)."""
    floats = [FLOAT_TYPES[t] for t in (type_k, type_v) if t in FLOAT_TYPES]
    typed = attention_kv_class(type_k, type_v)(batch, n_kv, head_dim, "cpu")
    paged = PagedAttentionKV(batch, n_kv, head_dim, floats[0] if floats else torch.float32, "cpu", page_size=PAGE,
                             type_k=block_type(type_k), type_v=block_type(type_v))
    return typed, paged


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("type_k,type_v,lengths", [
    ("q8_0", "q8_0", [37, 0, 70]),
    ("q8_0", "q4_0", [300, 3]),  # rows cut into splits, merged by the last to arrive
    ("q4_0", "q4_0", [16, 5]),  # a new token opening a page
    ("q4_1", "q5_0", [50, 3]),
    ("q5_1", "f32", [31]),  # a block K with a float V
    ("bf16", "q8_0", [20, 64]),  # a bf16 K with a block V
])
def test_the_paged_kernel_over_block_pools_is_the_plain_layer_over_typed_kv(device, type_k, type_v, lengths):
    """One decode step of Attention (8 query heads, 2 kv heads of 64, 16 rotated): its plain path (the C++
    op off) over a TypedAttentionKV, against the paged kernel over pools holding the same history: the same
    output to float32 rounding, and the new token's K and V stored as the same values."""
    layer, generator = attention_layer(8, 2, 64, 16, seed=sum(lengths) + len(type_k + type_v))
    c, batch = layer.c, len(lengths)
    typed, paged = _stores(type_k, type_v, batch, c.num_key_value_heads, c.head_dim)
    history = [torch.randn(batch, max(lengths) + 1, c.num_key_value_heads, c.head_dim, generator=generator) * 2
               for _ in range(2)]
    for store in (typed, paged):
        store.write(torch.zeros(batch, dtype=torch.long), *history)  # past each row's length: garbage, masked
    x = torch.randn(batch, 1, c.hidden_size, generator=generator)
    starts = torch.tensor(lengths)
    rope = RotaryEmbedding(c).cos_sin(starts[None, :, None].expand(3, -1, -1))
    mask = torch.arange(max(lengths) + 1)[None, None, :] <= starts[:, None, None]
    q_gate, k, v = layer.qkv_proj(x)
    with mock.patch.object(network_module, "fused_steps", lambda x: None):
        expected = layer(x, typed, starts, rope, mask)

    paged.make_room(starts, 1)
    on = [t.to(device) for t in (q_gate, k, v, layer.q_norm, layer.k_norm, *rope, *paged.page_pool, paged.page_table,
                                 starts)]
    out = paged_attention_decode_(*on, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps,
                                  c.head_dim**-0.5, key_type=paged.type_k, value_type=paged.type_v).cpu()
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-5, error
    if device != "cpu":  # the kernel wrote into the device's copies: they become the store's pools
        paged._key_pool, paged._value_pool = on[7].cpu(), on[8].cpu()
    span = max(lengths) + 1
    for ours, theirs in zip(paged.view(span), typed.view(span)):  # paged: blocks read as the float pool's dtype
        for row, length in enumerate(lengths):
            assert torch.equal(ours[row, :length + 1], theirs[row, :length + 1].to(ours.dtype))


def test_block_pools_keep_their_bytes_through_the_row_operations():
    """Rows prefilled apart, merged, selected, appended, removed and shared: each row's K/V read back as the
    TypedAttentionKV of the same types holds them (blocks copied untouched)."""
    generator = torch.Generator().manual_seed(11)
    n_kv, head_dim = 2, 64
    rows = []
    for length in (20, 7, 45):
        typed, paged = _stores("q8_0", "q4_1", 1, n_kv, head_dim)
        tokens = [torch.randn(1, length, n_kv, head_dim, generator=generator) for _ in range(2)]
        for store in (typed, paged):
            store.write(torch.zeros(1, dtype=torch.long), *tokens)
        rows.append((typed, paged, length))
    lengths = [length for _, _, length in rows]
    typed = type(rows[0][0]).merge([r[0] for r in rows], max(lengths))
    paged = PagedAttentionKV.merge([r[1] for r in rows], max(lengths))

    def assert_same(typed, paged, lengths):
        for ours, theirs in zip(paged.view(max(lengths)), typed.view(max(lengths))):
            for row, length in enumerate(lengths):
                assert torch.equal(ours[row, :length], theirs[row, :length])

    assert_same(typed, paged, lengths)
    order = [2, 0]
    assert_same(typed.select(order, max(lengths)), paged.select(order, max(lengths)), [lengths[r] for r in order])
    typed.append(rows[1][0], 0, 7)
    paged.append(rows[1][1], 0, 7)
    assert_same(typed, paged, lengths + [7])
    typed.remove(0, 7, 45)
    paged.remove(0, 7, 45)
    assert_same(typed, paged, [7, 7, 45])  # the last row took the removed one's place
    assert_same(rows[2][0].shared(45), rows[2][1].shared(45), [45])
    for other in (_stores("q8_0", "q4_0", 1, n_kv, head_dim)[1], _stores("f32", "q4_1", 1, n_kv, head_dim)[1]):
        with pytest.raises(Qwen35Error, match="same page size, shape and type"):
            paged.append(other, 0, 0)
        with pytest.raises(Qwen35Error, match="one page size, shape and type"):
            PagedAttentionKV.merge([paged, other], 1)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_block_pools_give_a_clear_error(device):
    layer, generator = attention_layer(4, 2, 64, 16, seed=2)
    q_gate, k, v = layer.qkv_proj(torch.randn(1, 1, layer.c.hidden_size, generator=generator))
    rope = RotaryEmbedding(layer.c).cos_sin(torch.zeros(3, 1, 1, dtype=torch.long))
    blocks = torch.zeros(3, PAGE, 2, 68, dtype=torch.uint8)  # q8_0: 2 blocks of 34 bytes
    floats = torch.zeros(3, PAGE, 2, 64)
    table = torch.zeros(1, 2, dtype=torch.int32)

    def call(key_pool, value_pool, key_type=None, value_type=None):
        on = [t.to(device) for t in (q_gate, k, v, layer.q_norm, layer.k_norm, *rope, key_pool, value_pool, table,
                                     torch.zeros(1, dtype=torch.long))]
        return paged_attention_decode_(*on, 4, 2, 64, 1e-6, 0.125, key_type=key_type, value_type=value_type)

    assert call(blocks, floats, "q8_0").shape == (1, 1, 4 * 64)
    with pytest.raises(Qwen35Error, match="a q4_0 K pool must be uint8"):
        call(blocks, floats, "q4_0")
    with pytest.raises(Qwen35Error, match="no V cache type 'q4_2'"):
        call(blocks, blocks, "q8_0", "q4_2")
    with pytest.raises(Qwen35Error, match="a float V pool must be"):
        call(blocks, blocks, "q8_0")
    with pytest.raises(Qwen35Error, match="share one dtype"):
        call(floats, floats.bfloat16())
    with pytest.raises(Qwen35Error, match="multiple of 32"):
        PagedAttentionKV(1, 2, 40, torch.float32, "cpu", type_k="q8_0")


def test_the_model_decodes_on_the_gpus_path_with_block_pools_as_on_the_cpu(fixtures, monkeypatch):
    """The dense fixture with -ctk q8_0 -ctv q4_0, in reference precision: a prompt prefilled into block
    pages (as a GPU keeps them) and into the CPU's typed store, then decode steps on the GPU's path (the paged
    kernel quantizing each new token) and on the CPU's: the same logits to float32 rounding and the same
    K/V values, every layer."""
    import qwen35
    from test_fast_cuda import DEVICE, take_gpu_paths_on_cpu

    from qwen35.kernels.quant_linear import QuantLinear
    from qwen35.model import fused

    if DEVICE != "cpu":
        pytest.skip("on a GPU, tests/test_cuda.py runs the model there")
    ids = json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["text"]["ids"][:15]
    model = qwen35.load_model(fixtures / "tiny" / "dense-Q8_0.gguf", precision="reference", cache_type_k="q8_0",
                              cache_type_v="q4_0")
    head = model.network.lm_head  # its first 1024 rows: enough to compare, and the interpreter is slow
    model.network.lm_head = QuantLinear(head.blocks[:1024], head.type_id, 1024, head.in_features)
    with monkeypatch.context() as paged:
        paged.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
        gpu_cache = model.make_cache(1)
    cpu_cache = model.make_cache(1)
    pages = [layer for layer in gpu_cache.layers if isinstance(layer, PagedAttentionKV)]
    assert pages and {(p.type_k, p.type_v) for p in pages} == {("q8_0", "q4_0")}
    prompt, steps = ids[:12], ids[12:]
    torch.testing.assert_close(model.forward(torch.tensor([prompt]), gpu_cache),
                               model.forward(torch.tensor([prompt]), cpu_cache), rtol=0, atol=1e-5)
    on_cpu = torch.stack([model.forward(torch.tensor([[t]]), cpu_cache)[0, -1] for t in steps])
    take_gpu_paths_on_cpu(monkeypatch)
    on_gpu_path = torch.stack([model.forward(torch.tensor([[t]]), gpu_cache)[0, -1] for t in steps])
    torch.testing.assert_close(on_gpu_path, on_cpu, rtol=0, atol=1e-4)
    span = len(ids)
    for ours, theirs in zip(pages, [layer for layer in cpu_cache.layers if not hasattr(layer, "recurrent")]):
        for got, expected in zip(ours.view(span), theirs.view(span)):
            assert torch.equal(got, expected)


@pytest.mark.parametrize("type_k,type_v", [("q8_0", "q8_0"), ("q4_0", "f16"), ("q5_1", "q4_1")])
def test_block_pages_allocate_what_the_planner_prices(fixtures, monkeypatch, type_k, type_v):
    """The bytes a GPU's pages take per token of context, measured by growing them, against `qwen35 plan`'s
    price of K and V of these types (the planner prices K and V alike: half of each type's price)."""
    import qwen35
    from qwen35.engine.quantized_kv import allocated_kv_bytes_per_token
    from qwen35.model import fused
    from qwen35.plan.estimator import kv_bytes_per_token
    from qwen35.plan.sources import load_gguf

    path = fixtures / "tiny" / "dense-Q8_0.gguf"
    spec = load_gguf([str(path)]).spec
    model = qwen35.load_model(path, precision="reference", cache_type_k=type_k, cache_type_v=type_v)
    monkeypatch.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
    cache = model.make_cache(1)
    assert all(isinstance(layer, PagedAttentionKV) for layer in cache.layers if not hasattr(layer, "recurrent"))
    expected = (kv_bytes_per_token(spec, type_k) + kv_bytes_per_token(spec, type_v)) // 2
    assert allocated_kv_bytes_per_token(cache) == expected
