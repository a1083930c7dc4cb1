"""fast_cuda's kernel choices (matrix-vector from blocks, dequantize + product, grouped experts)
against the reference path, and a whole fixture model run through them.

On a machine without a GPU the Triton kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py), with fast_cuda's functions registered for CPU weights for the test:
the same functions, the same kernels, what CI can check. tests/test_cuda.py runs the model on
a real GPU.
"""

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from conftest import triton_devices
from sm90 import compile_launches, record_launches
from test_model_fast_mode import KL_LIMIT, mean_kl

pytest.importorskip("triton")

from qwen35.formats.gguf import GGUFModel  # noqa: E402
from qwen35.kernels import fast_cuda, quant_linear  # noqa: E402
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear, reference_matmul, set_mode  # noqa: E402

DEVICE = triton_devices()[0]


def _fixture_weight(fixtures, file_name: str, tensor: str):
    gguf = GGUFModel(fixtures / "tiny" / file_name)
    info = gguf.tensors[tensor]
    return torch.from_numpy(gguf.tensor_data(tensor).copy()), info


@pytest.mark.parametrize("rows", [1, 5, 40])  # 1 and 5: from the blocks; 40: dequantized to bf16, then a product
def test_matmul_follows_the_reference(fixtures, rows):
    raw, info = _fixture_weight(fixtures, "dense-Q4_K_M.gguf", "blk.0.ffn_down.weight")
    out_features, in_features = info.torch_shape
    blocks = raw.reshape(out_features, -1)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    expected = reference_matmul(blocks, info.type_id, x, in_features).double()
    got = fast_cuda.matmul(blocks.to(DEVICE), info.type_id, x.to(DEVICE), in_features, out_features).double().cpu()
    error = ((got - expected).norm() / expected.norm()).item()
    # fp32 sums from the blocks: ~1e-6; bf16 operands with fp32 sums: ~3e-3.
    assert error <= (1e-5 if rows <= fast_cuda.GEMV_MAX_ROWS else 1e-2), error


@pytest.mark.parametrize("slots", [4, 96])  # from the blocks / every expert dequantized, grouped product
def test_expert_matmul_follows_the_reference(fixtures, slots):
    raw, info = _fixture_weight(fixtures, "moe-Q4_K_M.gguf", "blk.0.ffn_up_exps.weight")
    n_experts, out_features, in_features = info.torch_shape
    experts = QuantExperts(raw, info.type_id, n_experts, out_features, in_features)
    generator = torch.Generator().manual_seed(slots)
    ids = torch.randint(0, n_experts, (slots,), generator=generator)
    x = torch.randn(slots // 4, in_features, generator=generator)  # four slots per token
    expected = experts(x, ids.reshape(-1, 4)).reshape(slots, -1).double()
    got = fast_cuda.expert_matmul(experts.blocks.to(DEVICE), info.type_id, x.to(DEVICE), ids.to(DEVICE),
                                  in_features, out_features).double().cpu()
    error = ((got - expected).norm() / expected.norm()).item()
    assert error <= (1e-5 if slots <= fast_cuda.EXPERT_GEMV_SLOTS_PER_EXPERT * n_experts else 1e-2), error


def test_embedding_rows_are_bit_equal(fixtures):
    raw, info = _fixture_weight(fixtures, "dense-Q4_K_M.gguf", "token_embd.weight")
    rows, width = info.torch_shape
    embedding = QuantLinear(raw, info.type_id, rows, width)
    ids = torch.tensor([0, 7, 4095, 7])
    got = fast_cuda.dequantize_rows(embedding.blocks[ids].to(DEVICE), info.type_id, width)
    assert torch.equal(got.cpu(), embedding.rows(ids))


@pytest.fixture
def gpu_paths_on_cpu(monkeypatch):
    """The model's GPU paths (fast_cuda's products, the Triton DeltaNet step and fused steps) taken by
    CPU tensors, in Triton's interpreter: what the GPU runs, checked where CI runs."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU, tests/test_cuda.py runs the model there")
    take_gpu_paths_on_cpu(monkeypatch)


def take_gpu_paths_on_cpu(monkeypatch):
    from qwen35.model import fused

    monkeypatch.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
    monkeypatch.setattr(fast_cuda, "available", lambda: True)
    monkeypatch.setattr(quant_linear, "_FAST_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_KERNELS", {})
    monkeypatch.setattr(quant_linear, "_FAST_GROUP_KERNEL", {})
    monkeypatch.setattr(quant_linear, "_FAST_PAIR_KERNEL", {"cpu": fast_cuda.linear_pair})
    monkeypatch.setattr(quant_linear, "_FAST_EXPERT_GROUP_KERNEL", {})
    monkeypatch.setattr(quant_linear, "_WEIGHT_PREPS", {})
    monkeypatch.setattr(quant_linear, "_FAST_DEQUANTIZER", {"cpu": fast_cuda.dequantize_rows})
    for type_id in (T.F32, T.F16, T.BF16, *fast_cuda._gguf().SUPPORTED_TYPES):
        quant_linear.register_fast_kernel(type_id, fast_cuda.matmul)
        quant_linear.register_fast_expert_kernel(type_id, fast_cuda.expert_matmul)


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_the_gpu_path_of_the_model_is_close_to_exact(fixtures, gpu_paths_on_cpu, monkeypatch, name):
    """Prefill (dequantize + bf16 products, grouped experts) and decode (products from the blocks, SwiGLU
    inside the down products, the shared expert as one more expert slot, the fused DeltaNet step, fused
    norms and MoE routing) against the fixtures' exact logits."""
    import qwen35

    launches = record_launches(monkeypatch)
    sequences = json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"]
    length, split = 40, 36
    ids = sequences["text"]["ids"][:length]
    exact = np.load(fixtures / "ref" / f"{name}.text.exact-Q4_K_M.logits.npy").astype(np.float32)[:length]
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-Q4_K_M.gguf", precision="reference")
    set_mode(model.network, "fast")
    model.network.fuse_for_gpu()  # as loading does on a GPU
    model.precision = "fast"  # and so K/V in bf16, as on a GPU
    first = model.network.layers[0].mlp
    group = first.gates_ups if name == "moe" else first.gate_up_proj
    assert group.fused is not None  # gate and up read in one launch
    pairs = [g for layer in model.network.layers for g in [layer.mixer.qkv_proj if layer.is_attention
                                                          else layer.mixer.in_proj] if len(g.fused) == 2]
    assert pairs  # projections of two block types: one launch (fast_cuda.linear_pair)
    if name == "moe":  # the shared expert stacked after the routed ones: one token's experts in two launches
        assert first.shared_expert == first.gates.n_experts == group.fused.n_experts - 1
    cache = model.make_cache(1)
    assert cache.layers[model.config.layer_types.index("full_attention")].page_pool[0].dtype == torch.bfloat16
    prefill = model.forward(torch.tensor([ids[:split]]), cache)[0].numpy()
    pinned = cache.select([0])
    decode_launches = record_launches(monkeypatch)
    decoded = np.stack([model.forward(torch.tensor([[t]]), cache)[0, -1].numpy() for t in ids[split:]])
    # The same steps over a cache pinned as a CUDA graph pins it (fixed K/V span, states and counters
    # updated in place), run eagerly: what a capture records.
    from qwen35.engine.cuda_graphs import _page_slots, _pin

    with torch.inference_mode():
        _pin(pinned, 64)
    assert _page_slots(pinned) == 64  # one page of 64 slots: the span the graph's warm-up copies
    with torch.inference_mode():
        replayed = np.stack([model.network(torch.tensor([[t]]), pinned)[0, -1].numpy() for t in ids[split:]])
    assert pinned.lengths.tolist() == [length]
    np.testing.assert_allclose(replayed, decoded, rtol=0, atol=1e-4)
    logits = np.concatenate([prefill, decoded])
    kl = mean_kl(exact, logits)
    assert kl <= KL_LIMIT[name], f"{name}: mean KL {kl:.5f} vs exact"
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() >= 0.9
    decode_kl = mean_kl(exact[split:], decoded)  # fp32 sums from the blocks: close to exact
    assert decode_kl <= KL_LIMIT[name] / 4, decode_kl
    # What the interpreter cannot say: that every one of these launches compiles for an H100 as launched
    # (its argument types, constants and alignments), and without spilling registers. (Where a wrapper
    # picks other constants on a GPU, such as larger tiles or tensor-core precision, the kernel files'
    # own sm_90 tests compile those.)
    fused_ends = {(launch["constants"].get("COMBINE"), launch["constants"].get("ADD_NORM")) for launch in launches.values()
                  if launch["name"] == "_gemv_kernel"}
    # Decoding, products take the residual add and next norm (and the MoE's combining) into their launch.
    assert (False, True) in fused_ends and (name == "dense" or (True, True) in fused_ends), fused_ends
    # Every kernel of a one-token step can run under programmatic dependent launch (triton_pdl), so no gap
    # is left between two of them; compile_launches compiles each of those also with PDL on, and checks it waits.
    assert decode_launches and all("USE_PDL" in launch["constants"] for launch in decode_launches.values()), \
        sorted({launch["name"] for launch in decode_launches.values() if "USE_PDL" not in launch["constants"]})
    compiled = compile_launches(launches)
    with_pdl = sum("USE_PDL" in launch["constants"] for launch in launches.values())
    assert len(compiled) == len(launches) + with_pdl and len(launches) >= 10 and with_pdl >= 5
    assert {label: result for label, result in compiled.items() if result != {"stack": 0}} == {}


@pytest.mark.parametrize("lengths", [(15,), (9, 15)], ids=["one row", "two rows"])
def test_captured_decode_steps_replay_like_eager_ones(fixtures, monkeypatch, lengths):
    """engine/cuda_graphs.GraphDecoder, captured and replayed by tests/graph_replay.py's stand-ins for CUDA
    graphs: nothing reads the device on the host while capturing, and replaying only the recorded device
    work (none of the Python) decodes as eager steps do, across a capacity doubling (a second capture),
    and hands back a cache holding what the eager steps' cache holds. One row takes the fused matrix-vector
    launches; two rows of different lengths the batch's products (on the precise tensor-core form, SwiGLU
    and norms as their own launches, the shared expert as a plain MLP), and each decodes as it does alone
    on the CPU's path."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU, tests/test_cuda.py captures real graphs")
    import qwen35
    from graph_replay import emulated_cuda_graphs
    from qwen35.engine import cuda_graphs
    from qwen35.engine.cache import HybridCache
    from qwen35.model import fused

    ids = json.loads((fixtures / "ref" / "moe.json").read_text())["sequences"]["text"]["ids"]
    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", precision="reference")
    head = model.network.lm_head  # its first 1024 rows: enough to compare, and the interpreter is slow
    model.network.lm_head = QuantLinear(head.blocks[:1024], head.type_id, 1024, head.in_features)
    steps = [[ids[n + t] for n in lengths] for t in range(2)]
    # The prompts are prefilled on the CPU's path (the interpreter would take minutes), and each row's first
    # step is decoded there too, to compare with: fp32 products from the reference's dequantized weights
    # and the C++ steps, where the GPU's path sums fp32 from the blocks.
    prompts, alone = [], []
    for length in lengths:
        with monkeypatch.context() as paged:  # K/V in pages as on a GPU (fp32, as the CPU's path keeps them)
            paged.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
            prompts.append(model.make_cache(1))
        on_cpu = model.make_cache(1)
        for cache in (prompts[-1], on_cpu):
            model.forward(torch.tensor([ids[:length]]), cache)
        alone.append(model.forward(torch.tensor([[ids[length]]]), on_cpu)[0, -1])
    take_gpu_paths_on_cpu(monkeypatch)
    set_mode(model.network, "fast")
    model.network.fuse_for_gpu()
    eager_cache = HybridCache.merge([c.select([0]) for c in prompts])
    with torch.inference_mode():
        eager = [model.network(torch.tensor(tokens)[:, None], eager_cache)[:, -1] for tokens in steps]
    # Warming up compiles kernels and makes cuBLAS handles on a GPU; the interpreter needs neither.
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda model, cache, capacity: None)
    # QuantLinear.rows checks ids only for CPU tensors; on a GPU that read is not made.
    with emulated_cuda_graphs(monkeypatch, allowed_host_reads={"rows"}):
        decoder = cuda_graphs.GraphDecoder(model, HybridCache.merge(prompts), capacity=16)
        graphs = [decoder.graph]
        with torch.inference_mode():
            replayed = []
            for tokens in steps:
                replayed.append(decoder.step(tokens)[:, -1].clone())
                graphs.append(decoder.graph)
        released = decoder.release()
    assert graphs[1] is graphs[0] is not graphs[2] and decoder.capacity == 32  # the step past 16 tokens recaptured
    # A row decodes in a batch on the GPU's path as alone on the CPU's, to fp32 rounding.
    torch.testing.assert_close(eager[0], torch.stack(alone), rtol=0, atol=1e-3)
    for step, (got, expected) in enumerate(zip(replayed, eager)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=f"step {step}")
    assert released.lengths.tolist() == eager_cache.lengths.tolist() == [n + len(steps) for n in lengths]
    assert released.next_positions.tolist() == eager_cache.next_positions.tolist()
    longest = max(lengths) + len(steps)
    for index, (got, expected) in enumerate(zip(released.layers, eager_cache.layers)):
        pairs = ((got.conv, expected.conv), (got.recurrent, expected.recurrent)) if hasattr(got, "recurrent") \
            else zip(got.view(longest), expected.view(longest))
        for got_state, expected_state in pairs:
            torch.testing.assert_close(got_state.float(), expected_state.float(), rtol=0, atol=1e-4, msg=f"layer {index}")


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_speculative_steps_on_the_gpu_path_give_the_tokens_of_plain_steps(fixtures, monkeypatch, graphs):
    """A speculative step feeds its tokens to the GPU's one-token kernels one at a time (the DeltaNet step,
    paged attention) with the products done once for all of them, and rewinds what it does not keep:
    the tokens are plain decoding's, with the MTP layer's guesses and with scripted ones, right and wrong.
    With graphs (tests/graph_replay.py's stand-ins), the step is engine/cuda_graphs.VerificationGraph's
    replay: captured without a host read, padded where fewer guesses come, rewound in place."""
    if DEVICE != "cpu":
        pytest.skip("on a GPU, tests/test_cuda.py runs the model there")
    import qwen35
    from graph_replay import emulated_cuda_graphs
    from test_speculative import Scripted

    from qwen35.engine import cuda_graphs
    from qwen35.engine.generate import generation_steps, resolve_sampling
    from qwen35.engine.speculative import Speculation
    from qwen35.model import fused

    name = "dense" if graphs else "moe"  # (the interpreter's time: the MoE's path is checked eagerly)
    ids = json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"]["text"]["ids"][:24]
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-Q4_K_M.gguf", precision="reference")
    head = model.network.lm_head  # its first 1024 rows: enough to compare, and the interpreter is slow
    model.network.lm_head = QuantLinear(head.blocks[:1024], head.type_id, 1024, head.in_features)
    with monkeypatch.context() as paged:  # the prompt prefilled on the CPU's path, K/V in pages as on a GPU
        paged.setattr(fused, "GPU_DEVICE_TYPES", {"cuda", "cpu"})
        prompt_cache = model.make_cache(1)
    model.forward(torch.tensor([ids[:-1]]), prompt_cache)
    take_gpu_paths_on_cpu(monkeypatch)
    set_mode(model.network, "fast")
    model.network.fuse_for_gpu()
    params = resolve_sampling(model, 3, temperature=0, ignore_eos=True)

    caches = []

    def tokens(speculation=None):
        caches.append(prompt_cache.select([0]))
        steps = generation_steps(model, ids, params, cache=caches[-1], speculation=speculation)
        return [step.token_id for step in steps]

    def assert_cache_as_plain(cache):
        """What a speculative generation leaves in its cache: what plain steps left (the kept tokens' states)."""
        assert cache.lengths.tolist() == caches[0].lengths.tolist() and cache.static_length is None
        for got, expected in zip(cache.layers, caches[0].layers):
            if hasattr(got, "recurrent"):
                assert not got.in_place and got.steps is None
                torch.testing.assert_close(got.recurrent, expected.recurrent, rtol=0, atol=1e-5)
                torch.testing.assert_close(got.conv, expected.conv, rtol=0, atol=1e-5)

    plain = tokens()
    # One step: the first token and two guesses, the first right (kept), the second wrong (rewound); then a
    # step with room for no guess (with graphs: the token alone, padded).
    scripted = Scripted(draft_max=2, script=tuple(plain), prompt_length=len(ids), wrong=lambda index: index == 2)
    if not graphs:
        assert tokens(scripted) == plain
        assert_cache_as_plain(caches[-1])
        assert tokens(Speculation(draft_max=1, p_min=0.0)) == plain
        assert_cache_as_plain(caches[-1])
        return
    monkeypatch.setattr(cuda_graphs, "_warm_up", lambda *args, **kwargs: None)  # nothing to compile in the interpreter
    captured = []
    monkeypatch.setattr(cuda_graphs.VerificationGraph, "_capture", lambda graph, capacity, _capture=cuda_graphs.
                        VerificationGraph._capture: captured.append(capacity) or _capture(graph, capacity))
    released = []
    monkeypatch.setattr(cuda_graphs.VerificationGraph, "release", lambda graph, _release=cuda_graphs.
                        VerificationGraph.release: released.append(graph) or _release(graph))
    with emulated_cuda_graphs(monkeypatch, allowed_host_reads={"rows"}):
        assert tokens(scripted) == plain
    assert_cache_as_plain(caches[-1])
    assert len(captured) == 1 and len(released) == 1  # captured once, the cache handed back after it
    assert min(captured) >= len(ids) + 3  # K/V room for the prompt and a step's three tokens
