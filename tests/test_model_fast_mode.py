"""The default (fast) precision against the fixtures' exact logits and llama.cpp's own.

The fast path rounds activations to int8 as llama.cpp's CPU kernels do, in prefill and
decode alike (one batch-invariant kernel), but it must stay within the issue's tolerances
and as close to the exact arithmetic of the quantized weights as llama.cpp itself is (the
fixtures' `native_vs_exact` figures). Two independent roundings of the same size land at
slightly different distances: over these 248 positions ours and llama.cpp's differ by a
few percent of KL and a couple of near-tie top-1 flips, so "as close" allows 15% of
KL (as the decode test does) and 2% of top-1.
"""

import json

import numpy as np
import pytest

import qwen35

DENSE_TYPES = ["Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "Q4_0"]
CASES = [("dense", q) for q in DENSE_TYPES] + [("moe", "Q4_K_M")]
KL_LIMIT = {"dense": 0.01, "moe": 0.02}


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over positions of KL(softmax(reference) || softmax(logits)), in float64."""
    p_log = reference_logits.astype(np.float64)
    q_log = logits.astype(np.float64)
    p_log = p_log - np.logaddexp.reduce(p_log, axis=-1, keepdims=True)
    q_log = q_log - np.logaddexp.reduce(q_log, axis=-1, keepdims=True)
    return float((np.exp(p_log) * (p_log - q_log)).sum(-1).mean())


@pytest.fixture(scope="module")
def fast_logits(fixtures):
    """Fast-mode logits of the `text` prompt for every fixture GGUF, loaded once."""
    results = {}
    for name, quant in CASES:
        ids = json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"]["text"]["ids"]
        model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf")
        assert model.precision == "fast"
        results[name, quant] = model.logits(ids)
    return results


@pytest.mark.parametrize("name, quant", CASES)
def test_fast_mode_is_close_to_exact(fixtures, fast_logits, name, quant):
    exact = np.load(fixtures / "ref" / f"{name}.text.exact-{quant}.logits.npy").astype(np.float32)
    ours = fast_logits[name, quant]
    assert ours.shape == exact.shape
    kl = mean_kl(exact, ours)
    assert kl <= KL_LIMIT[name], f"{name}-{quant}: mean KL {kl:.5f} vs exact"
    figures = json.loads((fixtures / "ref" / f"{name}.json").read_text())["llama_cpp"][quant]["text"]
    llama_kl = figures["native_vs_exact"]["mean_kl"]
    assert kl <= 1.15 * llama_kl, f"{name}-{quant}: ours {kl:.5f} vs exact, llama.cpp {llama_kl:.5f}"
    top1 = float((ours.argmax(-1) == exact.argmax(-1)).mean())
    assert top1 >= figures["native_vs_exact"]["top1"] - 0.02


@pytest.mark.parametrize("name, quant", [("dense", "Q8_0"), ("dense", "Q4_K_M"), ("moe", "Q4_K_M")])
def test_fast_mode_is_as_close_to_llamacpp_as_llamacpp_is_to_exact(fixtures, fast_logits, name, quant):
    native = np.load(fixtures / "ref" / f"{name}.text.llamacpp-{quant}.logits.npy").astype(np.float32)
    figures = json.loads((fixtures / "ref" / f"{name}.json").read_text())["llama_cpp"][quant]["text"]
    llama_kl = figures["native_vs_exact"]["mean_kl"]
    kl = mean_kl(native, fast_logits[name, quant])
    # Two independent roundings of the same exact values differ by about twice either one.
    assert kl <= 2 * llama_kl + 1e-5, f"{name}-{quant}: ours vs llama.cpp {kl:.5f}, llama.cpp vs exact {llama_kl:.5f}"


@pytest.mark.parametrize("name, quant", [("dense", "Q8_0"), ("dense", "Q4_K_M"), ("moe", "Q4_K_M")])
def test_fast_decode_path_is_as_close_to_exact_as_llamacpp(fixtures, name, quant):
    """Decoding one token at a time (the decode paths of the delta rule and attention).
    Teacher-forced over the last 64 prompt tokens, its distance to exact must
    match llama.cpp's own distance on the same positions (llama.cpp's logits file)."""
    import torch

    ids = json.loads((fixtures / "ref" / f"{name}.json").read_text())["sequences"]["text"]["ids"]
    exact = np.load(fixtures / "ref" / f"{name}.text.exact-{quant}.logits.npy").astype(np.float32)
    native = np.load(fixtures / "ref" / f"{name}.text.llamacpp-{quant}.logits.npy").astype(np.float32)
    model = qwen35.load_model(fixtures / "tiny" / f"{name}-{quant}.gguf")
    split = len(ids) - 64
    cache = model.make_cache(1)
    model.forward(torch.tensor([ids[:split]]), cache)
    decoded = np.stack([model.forward(torch.tensor([[token]]), cache)[0, -1].numpy() for token in ids[split:]])
    ours, llama = mean_kl(exact[split:], decoded), mean_kl(exact[split:], native[split:])
    assert ours <= 1.15 * llama, f"{name}-{quant} decode: ours {ours:.5f} vs exact, llama.cpp {llama:.5f}"


def test_last_only_logits_equal_the_last_row_of_all(fixtures):
    """A prompt's prefill may ask for the last position's logits alone; the lm_head is
    batch-invariant, so they are bit-equal to the last row of the full logits."""
    import torch

    ids = json.loads((fixtures / "ref" / "dense.json").read_text())["sequences"]["text"]["ids"][:40]
    model = qwen35.load_model(fixtures / "tiny" / "dense-Q4_K_M.gguf")
    with torch.inference_mode():
        full = model.network(torch.tensor([ids]), model.make_cache(1))
        last = model.network(torch.tensor([ids]), model.make_cache(1), last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    assert torch.equal(last, full[:, -1:])
