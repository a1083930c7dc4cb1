"""Throughput of the quantized matmul paths on this CPU.

Decode (M=1): weight bytes streamed per second (GB/s) for the reference path
(dequantize + fp32 matmul), the row-major gemv, the row-group packed kernel (what
Q4_K/Q6_K/Q8_0 weights use), and a dense fp32 / bf16 torch matmul for scale. Prefill
(M rows): GFLOP/s (int8 ops counted as flops) of the packed kernel, gemv and bf16 tiles.
Weights are spread over enough matrices (> L3) that decode numbers are memory-bound,
as in a real model.

    .venv/bin/python benchmarks/kernels_fast_cpu.py [--threads 2] [--total-mib 256]
"""

from __future__ import annotations

import argparse
import time

import qwen35  # noqa: F401  (first: its allocator settings apply before torch allocates)
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from qwen35.kernels import fast_cpu, quant_linear
from qwen35.kernels.dequant import FP16_FIELD_OFFSETS
from qwen35.kernels.quant_linear import QuantExperts, reference_matmul, set_mode

T = GGMLQuantizationType


def random_weight(type_id: T, out_features: int, in_features: int, rng: np.random.Generator) -> torch.Tensor:
    if type_id == T.BF16:
        weight = torch.from_numpy(rng.standard_normal((out_features, in_features), dtype=np.float32))
        return weight.bfloat16().view(torch.uint8)
    block_size, type_size = GGML_QUANT_SIZES[type_id]
    n_blocks = out_features * in_features // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in FP16_FIELD_OFFSETS[type_id]:
        scale = (rng.random(n_blocks) * 1e-3).astype(np.float16)
        blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(blocks.reshape(out_features, -1))


def timed(fn, weights, repeats: int) -> float:
    """Median seconds per call, cycling through `weights` so each call streams a cold matrix.

    The median, not the mean: on a shared machine other processes steal whole time slices.
    """
    for w in weights[:2]:
        fn(w)
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(weights[i % len(weights)])
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--in", dest="in_features", type=int, default=2048)
    parser.add_argument("--total-mib", type=int, default=256, help="weight bytes to cycle through (beat the caches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not fast_cpu.install():
        raise SystemExit("fast CPU kernels are not available here")
    rng = np.random.default_rng(0)
    n, k = args.out, args.in_features
    print(f"W [{n}, {k}], {args.threads} threads, {torch.__version__}")
    moe_decode(rng)

    dense = [torch.randn(n, k) for _ in range(max(2, args.total_mib * 2**20 // (n * k * 4)))]
    seconds = timed(lambda w: torch.randn(1, k) @ w.t(), dense, 20)
    print(f"dense fp32 torch   M=1: {n * k * 4 / seconds / 1e9:6.1f} GB/s")
    dense_bf16 = [w.bfloat16() for w in dense[: max(2, len(dense) // 2)]]
    seconds = timed(lambda w: torch.randn(1, k).bfloat16() @ w.t(), dense_bf16, 20)
    print(f"dense bf16 torch   M=1: {n * k * 2 / seconds / 1e9:6.1f} GB/s")
    del dense, dense_bf16

    for type_id in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_K, T.Q4_0, T.IQ4_XS, T.Q3_K, T.Q2_K, T.BF16):
        one = random_weight(type_id, n, k, rng)
        count = max(2, args.total_mib * 2**20 // one.numel())
        weights = [one] + [random_weight(type_id, n, k, rng) for _ in range(count - 1)]
        nbytes = one.numel()
        x1 = torch.randn(1, k)
        ref = timed(lambda w: reference_matmul(w, type_id, x1, k), weights, 4)
        fast = timed(lambda w: fast_cpu.gemv(w, type_id, x1), weights, 40)
        deq = timed(lambda w: fast_cpu.dequantize_bf16(w, type_id, k), weights, 10)
        packed = [fast_cpu.pack(w, type_id, k) for w in weights] if type_id in fast_cpu.PACKED_TYPES else None
        line = (f"{type_id.name:5s} M=1: reference {nbytes / ref / 1e9:5.2f} GB/s, gemv {nbytes / fast / 1e9:5.1f} GB/s "
                f"({ref / fast:4.0f}x)")
        if packed:
            one_packed = timed(lambda w: fast_cpu.packed_gemv(w, type_id, x1, n), packed, 40)
            line += f", packed {nbytes / one_packed / 1e9:5.1f} GB/s"
        print(line + f"; dequantize_bf16 {n * k / deq / 1e9:4.2f} Gvalues/s")
        for m in (4, 8, 128, 512):
            x = torch.randn(m, k)
            flops = 2 * m * n * k
            reps = 2 if m >= 128 else 6
            fast_gemv = timed(lambda w: fast_cpu.gemv(w, type_id, x), weights, reps)
            tiled = timed(lambda w: fast_cpu.tiled_bf16_matmul(w, type_id, x, k), weights, reps)
            line = f"      M={m:<3d}: gemv {flops / fast_gemv / 1e9:6.1f} GFLOP/s, bf16 tiles {flops / tiled / 1e9:6.1f}"
            if packed:
                many = timed(lambda w: fast_cpu.packed_gemv(w, type_id, x, n), packed, reps)
                line += f", packed {flops / many / 1e9:6.1f}"
            if m == 512:
                ref = timed(lambda w: reference_matmul(w, type_id, x, k), weights, 2)
                line += f", reference {flops / ref / 1e9:6.1f}"
            print(line)


def moe_decode(rng: np.random.Generator) -> None:
    """One token through a 35B-A3B-sized expert matrix (top-8 of 256, [512, 2048], Q4_K)."""
    n_experts, out_features, in_features = 256, 512, 2048
    experts = QuantExperts(random_weight(T.Q4_K, n_experts * out_features, in_features, rng), T.Q4_K,
                           n_experts, out_features, in_features)
    set_mode(experts, "fast")  # packs the experts
    x = torch.randn(1, in_features)
    calls = [torch.from_numpy(rng.choice(n_experts, 8, replace=False)).reshape(1, 8) for _ in range(50)]
    active_bytes = 8 * experts.blocks[0].numel()
    fused = timed(lambda ids: experts(x, ids), calls, 50)
    whole_call = quant_linear._FAST_EXPERT_KERNELS.pop(("cpu", int(T.Q4_K)))
    grouped = timed(lambda ids: experts(x, ids), calls, 50)
    quant_linear.register_fast_expert_kernel(T.Q4_K, whole_call)
    print(
        f"MoE decode, top-8 of 256 [512, 2048] Q4_K: one expert call {fused * 1e6:.0f} us "
        f"({active_bytes / fused / 1e9:.1f} GB/s), grouped per expert {grouped * 1e6:.0f} us"
    )


if __name__ == "__main__":
    main()
