"""How far the fast CPU kernels move the fixture models' logits from the exact ones.

For each tiny fixture GGUF, runs the `text` prompt through the model in reference
precision and with the fast kernels installed, both as one prefill (bf16 tiles)
and as decode steps one token at a time (int8-activation gemv), and compares each
with the fixture's `exact-<QUANT>` logits (llama.cpp's F32 path on gguf-py's
dequantized weights). llama.cpp's own native run is shown for scale: the fast
path should be no further from `exact` than llama.cpp is.

    .venv/bin/python benchmarks/kernels_fast_vs_exact.py [--decode-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from qwen35.kernels import fast_cpu
from qwen35.model.loading import load_model

FIXTURES = Path(os.environ.get("QWEN35_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
MODELS = tuple(
    [("dense", q) for q in ("Q4_K_M", "Q8_0", "Q3_K_M", "Q2_K", "IQ4_XS", "Q4_0")] + [("moe", "Q4_K_M")]
)


def compare(ours: np.ndarray, exact: np.ndarray) -> str:
    a = torch.from_numpy(np.asarray(ours, dtype=np.float32))
    b = torch.from_numpy(np.asarray(exact, dtype=np.float32))
    log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = float((log_b.exp() * (log_b - log_a)).sum(-1).mean())
    top1 = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    return f"max|d| {float((a - b).abs().max()):6.3f}  mean|d| {float((a - b).abs().mean()):.4f}  KL {kl:.5f}  top1 {top1:.3f}"


def decode_logits(model, ids: list[int], decode_tokens: int) -> np.ndarray:
    """Prefill all but the last `decode_tokens` tokens, then feed those one at a time."""
    cache = model.make_cache(1)
    split = len(ids) - decode_tokens
    with torch.no_grad():
        rows = [model.forward(torch.tensor([ids[:split]]), cache)[0]]
        for token in ids[split:]:
            rows.append(model.forward(torch.tensor([[token]]), cache)[0])
    return torch.cat(rows).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not fast_cpu.install():
        raise SystemExit("fast CPU kernels are not available here")
    ref = FIXTURES / "ref"
    for name, quant in MODELS:
        ids = json.loads((ref / f"{name}.json").read_text())["sequences"]["text"]["ids"]
        exact = np.load(ref / f"{name}.text.exact-{quant}.logits.npy")
        tail = slice(len(ids) - args.decode_tokens, None)
        print(f"{name}-{quant} ({len(ids)} tokens; decode rows = last {args.decode_tokens})")
        for precision in ("reference", "fast"):
            model = load_model(FIXTURES / "tiny" / f"{name}-{quant}.gguf", precision=precision)
            start = time.perf_counter()
            prefill = model.logits(ids)
            middle = time.perf_counter()
            decoded = decode_logits(model, ids, args.decode_tokens)
            end = time.perf_counter()
            print(f"  {precision:9s} prefill {middle - start:5.1f}s  {compare(prefill, exact)}")
            print(f"  {precision:9s} decode  {end - middle:5.1f}s  {compare(decoded[tail], exact[tail])}")
        native = ref / f"{name}.text.llamacpp-{quant}.logits.npy"
        if native.exists():
            print(f"  llama.cpp native        {compare(np.load(native), exact)}")
            print(f"  llama.cpp native (tail) {compare(np.load(native)[tail], exact[tail])}")


if __name__ == "__main__":
    main()
