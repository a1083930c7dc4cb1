"""Each Triton kernel's own benchmark on the GPU, for tuning its launch shapes (not a test).

    python benchmarks/gpu_kernels.py [--quick]

Prints one JSON line per measurement and writes them all to --json. The shapes are the
35B-A3B model's: GEMV over Q4_K/Q6_K/Q8_0 weights (the 248K-row head, 2048-wide
projections) at 1 and 8 rows, each product's candidate paths by rows of x (GEMV, tensor-core
product from the blocks, dequantize + cuBLAS) and by tokens for the experts, the grouped expert product, the chunked delta rule at 8K
tokens and attention decode at a 4K context.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gguf import GGMLQuantizationType as T

GEMV_SHAPES = [(T.Q4_K, 8192, 2048), (T.Q6_K, 248320, 2048), (T.Q6_K, 8192, 2048), (T.Q8_0, 8192, 2048)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="GEMV only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from qwen35.kernels import triton_attention, triton_chunked, triton_gguf, triton_moe

    results = []

    def record(name, result):
        results.append({"kernel": name, **{k: v for k, v in result.items() if _plain(v)}})
        print(json.dumps(results[-1]), flush=True)

    for type_id, rows, width in GEMV_SHAPES:
        for m in (1, 8):
            record(f"gemv {type_id.name} {rows}x{width} M={m}", triton_gguf.benchmark_gemv(int(type_id), rows, width, rows=m))
    for m in (1, 2, 4, 8, 16, 64, 512, 4096):  # where fast_cuda.GEMV_MAX_ROWS should sit, and the dot's place
        record(f"Q4_K 8192x2048 M={m}: gemv / dot from blocks / dequantize + cuBLAS", dense_paths(m))
    for tokens in (8, 64, 512, 4096):  # where fast_cuda.EXPERT_GEMV_SLOTS_PER_EXPERT should sit
        record(f"35B gate+up experts, {tokens} tokens: per-slot gemv / grouped dot / dequantize + grouped",
               expert_paths(tokens))
    if not args.quick:
        record("grouped experts 4096 tokens", triton_moe.benchmark())
        record("chunked delta rule 8K", triton_chunked.benchmark())
        record("attention decode 4K", triton_attention.benchmark())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _median_ms(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, return_mode="median")


def dense_paths(m: int, rows: int = 8192, width: int = 2048) -> dict:
    """fast_cuda.matmul's candidates for m rows of x over one Q4_K weight (median ms): the GEMV from
    blocks and the precise (tf32x3) tensor-core product (m <= 16), the bf16 tensor-core product from
    blocks, and dequantize to bf16 + cuBLAS."""
    import torch

    from qwen35.kernels import triton_gguf, triton_gguf_dot

    q4_k = int(T.Q4_K)
    blocks = triton_gguf.random_blocks(q4_k, (rows,), width, device="cuda")
    x = torch.randn(m, width, device="cuda")
    result = {"dot_ms": _median_ms(lambda: triton_gguf_dot.dot_matmul(blocks, q4_k, x, width)),
              "dequantize_cublas_ms": _median_ms(
                  lambda: x.bfloat16() @ triton_gguf.dequantize(blocks, q4_k, width).t())}
    if m <= triton_gguf.MAX_GEMV_ROWS:
        result["gemv_ms"] = _median_ms(lambda: triton_gguf.gemv(blocks, q4_k, x, width))
        result["precise_dot_ms"] = _median_ms(lambda: triton_gguf_dot.dot_matmul(blocks, q4_k, x, width, precise=True))
    return result


def expert_paths(tokens: int, experts: int = 256, top_k: int = 8, rows: int = 1024, width: int = 2048) -> dict:
    """fast_cuda.expert_matmul's candidates for the 35B's gate+up experts (Q4_K) at `tokens` tokens
    (median ms): a GEMV per slot, the grouped tensor-core product from blocks, and every expert
    dequantized to bf16 + the grouped bf16 product."""
    import torch

    from qwen35.kernels import triton_gguf, triton_gguf_dot, triton_moe

    q4_k = int(T.Q4_K)
    blocks = triton_gguf.random_blocks(q4_k, (experts, rows), width, device="cuda")
    x = torch.randn(tokens, width, device="cuda")
    ids = torch.randint(0, experts, (tokens * top_k,), device="cuda")
    result = {
        "grouped_dot_ms": _median_ms(lambda: triton_gguf_dot.grouped_dot_matmul(blocks, q4_k, x, ids, width)),
        "dequantize_grouped_ms": _median_ms(lambda: triton_moe.grouped_expert_matmul(
            x, triton_gguf.dequantize(blocks, q4_k, width), ids)),
    }
    if tokens * top_k <= 4 * experts:
        result["expert_gemv_ms"] = _median_ms(lambda: triton_gguf.expert_gemv(blocks, q4_k, x, ids, width))
    return result


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (list, tuple, dict)) and len(json.dumps(value, default=str)) < 2000)


if __name__ == "__main__":
    sys.exit(main())
