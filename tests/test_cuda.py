"""The engine on a CUDA GPU against the fixtures' references (skipped where torch sees no GPU;
benchmarks/gpu_check.sh runs it on one).

Tolerances, stated:
- reference precision runs fp32 throughout, as on the CPU: max |logit - exact| <= 1e-2 (the
  exact logits are stored as float16) and top-1 agreement >= 0.98, the CPU's bounds;
- fast precision reads the blocks with fp32 sums in decode (matrix-vector kernels) and runs
  prefill's big products in bf16 with fp32 sums: it must meet the CPU fast path's bounds (mean
  KL vs exact <= 0.01 dense, 0.02 MoE; top-1 within 0.02 of llama.cpp's own), and decode must
  be as close to exact as llama.cpp (1.15x its KL, the CPU test's allowance);
- CUDA-graph decode replays the eager step's kernels over a wider (masked) attention span:
  max |diff| <= 1e-3 against eager decode on the GPU.
"""

import json

import numpy as np
import pytest
import torch

import qwen35
from qwen35.engine.cache import HybridCache
from conftest import serve_greedily
from test_model_fast_mode import KL_LIMIT, mean_kl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on the GPU machine)")

CASES = [("dense", "Q8_0"), ("dense", "Q4_K_M"), ("moe", "Q4_K_M")]


def _prompt(fixtures, name, prompt="text"):
    return json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"][prompt]["ids"]


def _exact(fixtures, name, quant, prompt="text"):
    return np.load(fixtures / "ref" / f"{name}.{prompt}.exact-{quant}.logits.npy").astype(np.float32)


@pytest.mark.parametrize("name, quant", CASES)
def test_reference_precision_on_cuda_matches_exact(fixtures, name, quant):
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf", device="cuda", precision="reference")
    logits = model.logits(_prompt(fixtures, name))
    exact = _exact(fixtures, name, quant)
    assert np.abs(logits - exact).max() <= 1e-2
    assert (logits.argmax(-1) == exact.argmax(-1)).mean() >= 0.98


@pytest.mark.parametrize("name, quant", CASES)
def test_fast_precision_on_cuda_is_close_to_exact(fixtures, name, quant):
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf", device="cuda")
    assert model.precision == "fast"
    logits, exact = model.logits(_prompt(fixtures, name)), _exact(fixtures, name, quant)
    kl = mean_kl(exact, logits)
    assert kl <= KL_LIMIT[name], f"{name}-{quant}: mean KL {kl:.5f} vs exact"
    figures = json.loads((fixtures / "ref" / f"{name}.json").read_text())["llama_cpp"][quant]["text"]
    top1 = float((logits.argmax(-1) == exact.argmax(-1)).mean())
    assert top1 >= figures["native_vs_exact"]["top1"] - 0.02


def _decode(model, ids, split, graphs: bool, rows: int = 1):
    """Teacher-forced decode of ids[split:] after prefilling ids[:split] (`rows` copies of the row)."""
    from qwen35.engine.cuda_graphs import GraphDecoder

    cache = HybridCache.merge([_prefilled(model, ids[:split]) for _ in range(rows)])
    out = []
    decoder = GraphDecoder(model, cache, split + 16) if graphs else None  # small: the capacity doubles on the way
    for token in ids[split:]:
        with torch.inference_mode():
            if decoder is not None:
                logits = decoder.step([token] * rows)
            else:
                logits = model.forward(torch.tensor([[token]] * rows), cache)
        out.append(logits[:, -1].float().cpu().numpy())
    if decoder is not None:
        decoder.release()
    return np.stack(out, axis=1)  # [rows, T, vocab]


def _prefilled(model, ids):
    cache = model.make_cache(1)
    model.forward(torch.tensor([ids]), cache)
    return cache


@pytest.mark.parametrize("name, quant", CASES)
def test_decode_on_cuda_eager_and_graphed(fixtures, name, quant):
    ids = _prompt(fixtures, name)
    split = len(ids) - 40
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf", device="cuda")
    eager = _decode(model, ids, split, graphs=False)[0]
    graphed = _decode(model, ids, split, graphs=True)[0]
    assert np.abs(graphed - eager).max() <= 1e-3
    exact = _exact(fixtures, name, quant)[split:]
    native = np.load(fixtures / "ref" / f"{name}.text.llamacpp-{quant}.logits.npy").astype(np.float32)[split:]
    ours, llama = mean_kl(exact, eager), mean_kl(exact, native)
    assert ours <= 1.15 * llama, f"{name}-{quant} decode: ours {ours:.5f} vs exact, llama.cpp {llama:.5f}"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs a Hopper GPU or later")
@pytest.mark.parametrize("rows", [1, 3])
def test_decode_under_programmatic_dependent_launch_equals_plain_launches(fixtures, monkeypatch, rows):
    """kernels/triton_pdl: the same kernels, each waiting on the GPU for the one before, decode exactly as
    plain launches do, eagerly and replayed from a CUDA graph (where PDL's edges are captured)."""
    from qwen35.kernels import triton_pdl

    ids = _prompt(fixtures, "moe")
    split = len(ids) - 24
    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", device="cuda")
    plain = [_decode(model, ids, split, graphs=graphs, rows=rows) for graphs in (False, True)]
    monkeypatch.setattr(triton_pdl, "ENABLED", True)
    with_pdl = [_decode(model, ids, split, graphs=graphs, rows=rows) for graphs in (False, True)]
    for ours, theirs in zip(with_pdl, plain):  # a read before its writer finished would be far off
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def test_graphed_batch_rows_of_different_lengths_decode_like_single_rows(fixtures):
    """Eight rows with their own prompt lengths decode together as each does alone."""
    from qwen35.engine.cuda_graphs import GraphDecoder

    ids = _prompt(fixtures, "moe")
    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", device="cuda")
    lengths = [40, 57, 64, 65, 90, 128, 129, 200]
    steps = 12
    cache = HybridCache.merge([_prefilled(model, ids[:n]) for n in lengths])
    decoder = GraphDecoder(model, cache, 256)
    together = []
    for t in range(steps):
        with torch.inference_mode():
            together.append(decoder.step([ids[n + t] for n in lengths])[:, -1].float().cpu().numpy())
    decoder.release()
    together = np.stack(together, axis=1)
    for row, n in enumerate(lengths):
        alone = _decode(model, ids[: n + steps], n, graphs=False)[0]
        assert np.abs(together[row] - alone).max() <= 1e-3, f"row {row} ({n} tokens)"


def test_greedy_generation_on_cuda_is_the_same_with_and_without_graphs(fixtures, monkeypatch):
    from qwen35.engine import cuda_graphs, generate

    model = qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf", device="cuda")
    prompt = _prompt(fixtures, "dense", "chat_think")
    graphed = list(generate.stream_generate(model, prompt, max_new_tokens=24, temperature=0))
    monkeypatch.setattr(cuda_graphs, "graphs_supported", lambda model: False)
    eager = list(generate.stream_generate(model, prompt, max_new_tokens=24, temperature=0))
    assert len(graphed) > 1 and graphed == eager


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_speculative_decoding_on_cuda_gives_the_tokens_of_plain_decoding(fixtures, name):
    """MTP guesses (random: mostly wrong) and a scripted guesser (right, then wrong) checked by eager steps on
    the GPU, rewound in place: the tokens of plain (graphed) decoding, greedy and seeded."""
    from test_speculative import Scripted

    from qwen35.engine.speculative import Speculation

    model = qwen35.load_model(fixtures / "tiny" / f"{name}-Q4_K_M.gguf", device="cuda")
    prompt = _prompt(fixtures, name, "chat_think")
    for options in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=5)):
        plain = model.generate(prompt, max_new_tokens=16, ignore_eos=True, **options)
        scripted = Scripted(draft_max=3, script=tuple(plain), prompt_length=len(prompt), wrong=lambda i: i % 3 == 2)
        for speculation in (Speculation(draft_max=2, p_min=0.0), scripted):
            assert model.generate(prompt, max_new_tokens=16, ignore_eos=True, speculation=speculation,
                                  **options) == plain


@pytest.mark.parametrize("type_k, type_v", [("q8_0", "q8_0"), ("q4_0", "f16")])
def test_block_kv_pages_on_cuda_decode_like_the_cpus_blocks(fixtures, type_k, type_v):
    """-ctk/-ctv block types on the GPU (pages of GGUF blocks, the paged kernel quantizing each new token as
    gguf-py does), reference precision: eager and graphed decode as the CPU's typed store decodes, within the
    reference bound (a K a rounding apart may land one quant over), the same greedy tokens."""
    ids = _prompt(fixtures, "dense")
    split = len(ids) - 24
    path = fixtures / "tiny" / "dense-Q8_0.gguf"
    options = dict(precision="reference", cache_type_k=type_k, cache_type_v=type_v)
    on_cpu = _decode(qwen35.load_model(path, **options), ids, split, graphs=False)[0]
    model = qwen35.load_model(path, device="cuda", **options)
    for graphs in (False, True):
        on_gpu = _decode(model, ids, split, graphs=graphs)[0]
        assert np.abs(on_gpu - on_cpu).max() <= 1e-2
        assert (on_gpu.argmax(-1) == on_cpu.argmax(-1)).mean() >= 0.98


SPLITS = [("dense", {"gpu_layers": 3}), ("dense", {"gpu_layers": 8}), ("moe", {"cpu_moe_layers": 2}),
          ("moe", {"gpu_layers": 2})]


@pytest.mark.parametrize("name, split", SPLITS, ids=[f"{n}-{next(iter(s))}={next(iter(s.values()))}" for n, s in SPLITS])
def test_split_models_prefill_and_decode_like_exact(fixtures, name, split):
    """-ngl / --n-cpu-moe: part of each step on the CPU (its fast kernels), the rest on the GPU."""
    from qwen35.engine.cuda_graphs import graphs_supported

    model = qwen35.load_model(fixtures / "tiny" / f"{name}-Q4_K_M.gguf", device="cuda", **split)
    assert {d.type for d in model.network.devices} == {"cpu", "cuda"} and not graphs_supported(model)
    ids = _prompt(fixtures, name)
    split_at = len(ids) - 16
    exact = _exact(fixtures, name, "Q4_K_M")
    prefill = model.logits(ids)
    assert mean_kl(exact, prefill) <= KL_LIMIT[name]
    decoded = _decode(model, ids, split_at, graphs=False)[0]
    native = np.load(fixtures / "ref" / f"{name}.text.llamacpp-Q4_K_M.logits.npy").astype(np.float32)[split_at:]
    assert mean_kl(exact[split_at:], decoded) <= 1.15 * mean_kl(exact[split_at:], native)


def test_the_server_engine_decodes_a_batch_on_cuda_like_solo_generation(fixtures, monkeypatch):
    """EngineService's running batch through the CUDA-graph decoder (rows idle and installed as they come
    and go)."""
    from qwen35.engine import running_batch

    monkeypatch.setattr(running_batch, "GRAPH_AFTER_STEADY_STEPS", 1)  # capture early: the test's batches are short

    model = qwen35.load_model(fixtures / "tiny" / "moe-Q4_K_M.gguf", device="cuda")
    ids = _prompt(fixtures, "moe")
    prompts = [ids[: 20 + 9 * i] for i in range(6)]
    new_tokens = [12, 5, 12, 8, 12, 3]  # rows leave at different steps
    solo = [model.generate(p, max_new_tokens=n, temperature=0, ignore_eos=True) for p, n in zip(prompts, new_tokens)]

    assert serve_greedily(model, prompts, new_tokens, max_running=8) == solo


def test_bench_and_its_flags_on_the_gpu(fixtures, capsys):
    """`qwen35 bench` on the GPU (device auto), and split with -ngl: llama-bench's counts, the card as the
    backend, the GPU's copy bandwidth as the roofline."""
    import json as json_module

    from qwen35.cli import main

    model = fixtures / "tiny" / "moe-Q4_K_M.gguf"
    assert main(["bench", str(model), "-p", "64", "-n", "16", "-r", "1", "--json"]) == 0
    report = json_module.loads(capsys.readouterr().out)
    assert report["backend"].startswith("CUDA") and "CPU" not in report["backend"]
    assert report["pp_tok_s"] > 0 and report["tg_tok_s"] > 0
    assert report["bandwidth_bytes_s"] > 1e11  # an HBM copy, not the CPU's read probe
    assert main(["bench", str(model), "-p", "64", "-n", "16", "-r", "1", "--json", "-ngl", "2"]) == 0
    split = json_module.loads(capsys.readouterr().out)
    assert split["backend"].startswith("CUDA") and split["backend"].endswith("+ CPU") and split["tg_tok_s"] > 0
