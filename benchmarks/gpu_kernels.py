"""Each Triton kernel's own benchmark on the GPU, for tuning its launch shapes (not a test).

    python benchmarks/gpu_kernels.py [--quick]

Prints one JSON line per measurement and writes them all to --json. The shapes are the
35B-A3B model's: GEMV over Q4_K/Q6_K/Q8_0 weights (the 248K-row head, 2048-wide
projections) at 1 and 8 rows, the grouped expert product, the chunked delta rule at 8K
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
    for m in (1, 2, 4, 8, 16):  # where fast_cuda.GEMV_MAX_ROWS should sit
        record(f"Q4_K 8192x2048 M={m}: gemv vs dequantize + cuBLAS", gemv_or_dequantize(m))
    if not args.quick:
        record("grouped experts 4096 tokens", triton_moe.benchmark())
        record("chunked delta rule 8K", triton_chunked.benchmark())
        record("attention decode 4K", triton_attention.benchmark())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def gemv_or_dequantize(m: int, rows: int = 8192, width: int = 2048) -> dict:
    """fast_cuda.matmul's two paths for m rows of x over one Q4_K weight, timed (median of do_bench, ms)."""
    import torch
    import triton

    from qwen35.kernels import fast_cuda, triton_gguf

    blocks = triton_gguf.random_blocks(int(T.Q4_K), (rows,), width, device="cuda")
    x = torch.randn(m, width, device="cuda")
    gemv = triton.testing.do_bench(lambda: triton_gguf.gemv(blocks, int(T.Q4_K), x, width), return_mode="median")
    saved = fast_cuda.GEMV_MAX_ROWS
    fast_cuda.GEMV_MAX_ROWS = 0
    try:
        dense = triton.testing.do_bench(lambda: fast_cuda.matmul(blocks, int(T.Q4_K), x, width, rows),
                                        return_mode="median")
    finally:
        fast_cuda.GEMV_MAX_ROWS = saved
    return {"gemv_ms": gemv, "dequantize_cublas_ms": dense}


def _plain(value) -> bool:
    return isinstance(value, (int, float, str, bool, type(None))) or (
        isinstance(value, (list, tuple, dict)) and len(json.dumps(value, default=str)) < 2000)


if __name__ == "__main__":
    sys.exit(main())
