"""Prefill and decode speed of a random model with a real Qwen 3.5 size's shapes, on a CUDA GPU.

    python benchmarks/gpu_bench.py --size 35b-a3b --type Q4_K_M --batch 1 8

The GGUF is made by make_model with its tensor data left unwritten (a sparse file:
seconds, not minutes, for 20 GB), loaded through load_model like any file, and then
every weight gets random blocks on the GPU, with the same calibrated scale fields as
make_model writes. Speed depends on shapes and block types, not values.

Reported: load time; prefill tok/s of one long prompt; decode tok/s at each batch size
through the CUDA-graph decoder (and eager, for comparison, at batch 1); and the
decode roofline: the bytes a token must read (every weight but the embedding, the
used experts' share of the expert weights) over the copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model import SCALE_FIELDS, benchmark_spec, scale_calibration, write_model  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

import qwen35  # noqa: E402
from qwen35.bench import measure_gpu_bandwidth, measure_read_bandwidth  # noqa: E402
from qwen35.engine.cache import HybridCache  # noqa: E402
from qwen35.engine.cuda_graphs import GraphDecoder  # noqa: E402
from qwen35.kernels.dequant import block_geometry  # noqa: E402
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear  # noqa: E402


def randomize_blocks_(module, generator: torch.Generator) -> None:
    """Random quants and calibrated, finite per-block scales, written over the module's blocks on its device."""
    blocks, type_id = module.blocks, T(module.type_id)
    if type_id in (T.F32, T.F16, T.BF16):
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[type_id]
        values = blocks.view(dtype)
        values.copy_(torch.randn(values.shape, generator=generator, device=blocks.device) * 0.02)
        return
    _, block_bytes = block_geometry(type_id)
    flat = blocks.view(-1, block_bytes)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=generator, device=blocks.device))
    d_unit, min_ratio = scale_calibration(type_id)
    d_offset, min_offset = SCALE_FIELDS[type_id]
    d = (torch.rand(flat.shape[0], generator=generator, device=blocks.device) + 0.5) * d_unit
    flat[:, d_offset:d_offset + 2] = d.half().view(torch.uint8).view(-1, 2)
    if min_offset is not None:
        flat[:, min_offset:min_offset + 2] = (d * min_ratio).half().view(torch.uint8).view(-1, 2)


def randomize_small_tensors_(network, generator: torch.Generator) -> None:
    """Norm gains near 1, decay rates in the trained range, conv taps and gates small (make_model's ranges)."""
    def uniform_(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator, device=t.device) * (high - low) + low)

    for norm in [network.final_norm] + [w for layer in network.layers for w in (layer.input_norm, layer.post_norm)]:
        uniform_(norm, 0.9, 1.1)
    for layer in network.layers:
        mixer = layer.mixer
        if layer.is_attention:
            uniform_(mixer.q_norm, 0.9, 1.1)
            uniform_(mixer.k_norm, 0.9, 1.1)
        else:
            uniform_(mixer.norm, 0.9, 1.1)
            uniform_(mixer.decay_rate, -16.0, -1.0)
            uniform_(mixer.dt_bias, -1.0, 1.0)
            mixer.conv_weight.copy_(torch.randn(mixer.conv_weight.shape, generator=generator,
                                                device=mixer.conv_weight.device) * 0.2)
        shared_gate = getattr(layer.mlp, "shared_gate", None)
        if shared_gate is not None:
            shared_gate.copy_(torch.randn(shared_gate.shape, generator=generator, device=shared_gate.device) * 0.02)


def sparse_model(args) -> Path:
    """The benchmark's GGUF for --size/--layers/--experts/--vocab/--type under --dir, written (sparse) if
    missing; gpu_placements.py finds the same file."""
    spec = benchmark_spec(args.size, args.layers, args.experts, args.vocab)
    shrunk = "".join(f"-{key}{value}" for key, value in (("E", args.experts), ("V", args.vocab)) if value)
    path = args.dir / f"{args.size}-L{spec.n_layers}{shrunk}-{args.type}-sparse.gguf"
    if not path.exists():
        write_model(path, spec, args.type, fill=False)
    return path


def decode_bytes_per_token(network, config) -> int:
    """Bytes one token reads: every matrix but the embedding (one row of it), k of E experts' share."""
    total = 0
    for module in network.modules():
        if isinstance(module, QuantExperts):
            total += module.blocks.nbytes * config.num_experts_per_tok // module.n_experts
        elif isinstance(module, QuantLinear) and module is not network.embed_tokens:
            total += module.blocks.nbytes
    return total + network.embed_tokens.blocks[0].nbytes


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def prefill_speed(model, prompt_tokens: int, generator) -> float:
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator, device=model.device)
    # The first run compiles the kernels for these shapes (Triton specialises on some sizes). As in
    # llama-bench, the output head runs on the last position only.
    model.forward(ids, model.make_cache(1), last_only=True)
    return prompt_tokens / timed(lambda: model.forward(ids, model.make_cache(1), last_only=True), model.device)


def decode_speed(model, batch: int, steps: int, context: int, generator, graphs: bool = True) -> float:
    """Tokens per second summed over `batch` rows, each decoding `steps` tokens after a `context`-token prompt."""
    rows = []
    for _ in range(batch):
        cache = model.make_cache(1)
        ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator, device=model.device)
        model.forward(ids, cache)
        rows.append(cache)
    cache = HybridCache.merge(rows) if batch > 1 else rows[0]
    tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=generator, device=model.device).tolist()
    if graphs:
        decoder = GraphDecoder(model, cache, context + steps + 16)
        decoder.step(tokens)  # first replay
        seconds = timed(lambda: [decoder.step(tokens) for _ in range(steps)], model.device)
        decoder.release()
    else:
        ids = torch.tensor(tokens, device=model.device)[:, None]
        model.forward(ids, cache)
        seconds = timed(lambda: [model.forward(ids, cache) for _ in range(steps)], model.device)
    return batch * steps / seconds


def speculative_speeds(model, args, generator) -> dict:
    """Batch-1 decode of the greedy answer to a random `--context`-token prompt (`--steps` tokens): plain,
    with the MTP layer's 3 guesses a step, and with a guesser that knows the answer (benchmarks/speculative.py)."""
    from speculative import KnowsTheAnswer, decode_speed

    from qwen35.engine.generate import generation_steps, resolve_sampling
    from qwen35.engine.speculative import Speculation

    prompt = torch.randint(0, model.config.vocab_size, (args.context,), generator=generator,
                           device=generator.device).tolist()
    params = resolve_sampling(model, args.steps, temperature=0, ignore_eos=True)
    answer = [step.token_id for step in generation_steps(model, prompt, params)]
    knowing = KnowsTheAnswer(draft_max=3, script=tuple(answer), prompt_length=len(prompt))
    speeds = {}
    for key, speculation in (("decode_b1_plain_tok/s", None), ("decode_b1_mtp3_tok/s", Speculation(draft_max=3, p_min=0.0)),
                             ("decode_b1_all_right3_tok/s", knowing)):
        decode_speed(model, prompt, args.steps, speculation)  # captures, compiles
        speeds[key] = decode_speed(model, prompt, args.steps, speculation)
        print(f"{key}: {speeds[key]:.1f}", flush=True)
    return speeds


# GEMV launch shapes tried by --sweep-gemv, each over the whole batch-1 decode step (what matters is
# the step, not one kernel): (name, {type: (rows per program, warps, stages)}, programs per processor).
GEMV_SWEEP = [
    ("default", {}, None),
    ("more splits", {}, 8),
    ("fewer splits", {}, 2),
    ("32 rows", {T.Q4_K: (32, 4, 2), T.Q6_K: (32, 4, 1), T.Q8_0: (16, 4, 1)}, None),
    ("128 rows, 8 warps", {T.Q4_K: (128, 8, 2), T.Q6_K: (128, 8, 1), T.Q8_0: (64, 8, 1)}, None),
    ("deeper prefetch", {T.Q4_K: (64, 4, 3), T.Q6_K: (64, 4, 2)}, None),
    ("8 warps", {T.Q4_K: (64, 8, 2), T.Q6_K: (64, 8, 1), T.Q8_0: (32, 8, 1)}, None),
]


def use_gemv_shapes(shapes: dict, programs_per_processor: int | None, defaults: tuple) -> None:
    from qwen35.kernels import triton_gguf_gemv  # the module whose launches read these globals

    triton_gguf_gemv.GEMV_CONFIG = {**defaults[0], **shapes}
    triton_gguf_gemv.PROGRAMS_PER_PROCESSOR = programs_per_processor or defaults[1]


def sweep_gemv_shapes(model, context: int, generator) -> list[dict]:
    """Batch-1 graph decode speed under each GEMV_SWEEP entry; leaves the fastest in place."""
    from qwen35.kernels import triton_gguf_gemv

    defaults = (dict(triton_gguf_gemv.GEMV_CONFIG), triton_gguf_gemv.PROGRAMS_PER_PROCESSOR)
    rows = []
    for name, shapes, programs in GEMV_SWEEP:
        use_gemv_shapes(shapes, programs, defaults)
        try:
            speed = decode_speed(model, 1, 48, context, generator)
        except Exception as error:  # noqa: BLE001  (a shape that does not compile: the others still count)
            speed = 0.0
            print(f"gemv shapes '{name}' failed: {type(error).__name__}: {error}", flush=True)
        rows.append({"shapes": name, "decode_b1_tok/s": speed})
        print(f"gemv shapes '{name}': decode b1 {speed:.1f} tok/s", flush=True)
    best = max(range(len(rows)), key=lambda i: rows[i]["decode_b1_tok/s"])
    use_gemv_shapes(GEMV_SWEEP[best][1], GEMV_SWEEP[best][2], defaults)
    print(f"gemv shapes: using '{GEMV_SWEEP[best][0]}'", flush=True)
    return rows


def gemv_only_decode_speed(model, batch: int, args, generator) -> float:
    """Batch decode with fast_cuda's plain products of a few rows on the matrix-vector kernel instead of
    the tensor-core product: which of the two PRECISE_DOT_MIN_ROWS should choose."""
    from qwen35.kernels import fast_cuda

    saved = fast_cuda.PRECISE_DOT_MIN_ROWS
    fast_cuda.PRECISE_DOT_MIN_ROWS = fast_cuda.GEMV_MAX_ROWS + 1
    try:
        return decode_speed(model, batch, args.steps, args.context, generator)
    except Exception as error:  # noqa: BLE001  (a diagnostic: the benchmark goes on)
        print(f"decode b{batch}, matrix-vector kernel only, failed: {type(error).__name__}: {error}", flush=True)
        return 0.0
    finally:
        fast_cuda.PRECISE_DOT_MIN_ROWS = saved


def kernel_profile(model, context: int, generator, top: int = 14) -> list[dict]:
    """GPU time per kernel name over 8 eager batch-1 decode steps: where a step's time goes (on the CPU,
    where the script checks itself, the ops' CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.make_cache(1)
    model.forward(torch.randint(0, model.config.vocab_size, (1, context), generator=generator, device=model.device),
                  cache)
    ids = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator, device=model.device)
    model.forward(ids, cache)
    synchronize(model.device)
    on_gpu = model.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        for _ in range(8):
            model.forward(ids, cache)
        synchronize(model.device)
    time_of = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    rows = sorted(({"kernel": e.key[:70], "calls_per_step": e.count / 8, "us_per_step": time_of(e) / 8}
                   for e in prof.key_averages() if time_of(e) > 0), key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"\n{'GPU' if on_gpu else 'CPU'} time per eager decode step: {total:.0f} us in {sum(r['calls_per_step'] for r in rows):.0f} launches")
    print("| kernel | launches per step | us per step |\n|---|---|---|")
    for r in rows[:top]:
        print(f"| {r['kernel']} | {r['calls_per_step']:.0f} | {r['us_per_step']:.0f} |")
    return rows[:top] + [{"kernel": "total", "calls_per_step": sum(r["calls_per_step"] for r in rows),
                          "us_per_step": total}]


def planner_estimate(path: Path, context: int) -> dict:
    """What `qwen35 plan` predicts for this file on this machine's GPU, to hold against the measurement."""
    from qwen35.plan.advisor import evaluate
    from qwen35.plan.estimator import Request
    from qwen35.plan.hardware import build_hardware
    from qwen35.plan.sources import load_gguf

    try:
        loaded = load_gguf([str(path)])
        speed = evaluate(loaded.spec, loaded.weights, loaded.mix, Request(ctx=max(context, 4096)),
                         build_hardware()).speed
    except Exception as error:  # an unknown card: the measurement stands alone
        return {"planner_error": f"{type(error).__name__}: {error}"}
    if speed is None:
        return {}
    return {"planner_decode_tok/s": speed.decode_tok_s, "planner_prefill_tok/s": speed.prefill_tok_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", default="35b-a3b")
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--layers", type=int, help="cut the model to this many layers (default: all)")
    parser.add_argument("--experts", type=int, help="routed experts per layer (the CPU self-check)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (the CPU self-check)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=8192, help="prefill prompt length")
    parser.add_argument("--context", type=int, default=512, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=128, help="decoded tokens timed per batch size")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qwen35-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--device", default="cuda", help="cuda (the point); cpu checks the script itself")
    parser.add_argument("--sweep-gemv", action="store_true",
                        help="first try each GEMV launch shape in GEMV_SWEEP at batch 1, then keep the fastest")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel of an eager decode step")
    parser.add_argument("--kv-types", nargs="+", default=[], metavar="TYPE",
                        help="also decode at batch 1 after --kv-depth tokens with K and V kept as each -ctk/-ctv type")
    parser.add_argument("--kv-depth", type=int, default=32768, help="context before the --kv-types decodes")
    parser.add_argument("--speculative", action="store_true",
                        help="also batch-1 decode speculating: with the MTP layer (3 guesses a step; on random weights "
                             "all wrong: the cost) and with a guesser that knows the answer (every guess right)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    path = sparse_model(args)
    made = time.perf_counter() - started
    started = time.perf_counter()
    model = qwen35.load_model(path, device=args.device, precision="reference" if args.device == "cpu" else "fast")
    loaded = time.perf_counter() - started
    generator = torch.Generator(device=args.device).manual_seed(0)
    # (On the CPU the blocks are the file's read-only map: the script's check there runs on zeros.)
    with torch.inference_mode():
        for module in model.network.modules():
            if isinstance(module, (QuantLinear, QuantExperts)) and module.blocks.is_cuda:
                randomize_blocks_(module, generator)
        randomize_small_tensors_(model.network, generator)
    synchronize(args.device)
    graphs = model.device.type == "cuda"

    bandwidth = measure_gpu_bandwidth(args.device) if graphs else measure_read_bandwidth(2)
    per_token = decode_bytes_per_token(model.network, model.config)
    results = {
        "device": torch.cuda.get_device_name() if graphs else "cpu", "model": path.name, "file_GB": path.stat().st_size / 1e9,
        "make_s": made, "load_s": loaded, "copy_GB/s": bandwidth / 1e9, "decode_bytes_per_token_GB": per_token / 1e9,
        "gpu_memory_GB": torch.cuda.memory_allocated() / 1e9 if graphs else 0.0,
    }
    print(json.dumps(results), flush=True)

    def save() -> None:  # after every measurement: a run cut short by its time limit keeps what it had
        if args.json:
            args.json.write_text(json.dumps(results, indent=1, default=str))

    results["prefill_tok/s"] = prefill_speed(model, args.prompt, generator)
    print(f"prefill {args.prompt} tokens: {results['prefill_tok/s']:.0f} tok/s", flush=True)
    save()
    results["decode_eager_b1_tok/s"] = decode_speed(model, 1, 16, args.context, generator, graphs=False)
    print(f"decode eager b1: {results['decode_eager_b1_tok/s']:.1f} tok/s", flush=True)
    save()
    for batch in args.batch:
        results[f"decode_b{batch}_tok/s"] = decode_speed(model, batch, args.steps, args.context, generator, graphs)
        print(f"decode graphs b{batch}: {results[f'decode_b{batch}_tok/s']:.1f} tok/s", flush=True)
        if batch > 1 and graphs:  # the plain products of a few rows on tensor cores (the default) or not
            results[f"decode_b{batch}_gemv_tok/s"] = gemv_only_decode_speed(model, batch, args, generator)
            print(f"decode graphs b{batch}, matrix-vector kernel only: "
                  f"{results[f'decode_b{batch}_gemv_tok/s']:.1f} tok/s", flush=True)
        save()
    for cache_type in args.kv_types:  # -ctk/-ctv: decode at a long context, where K/V are a step's bytes too
        key = f"decode_b1_d{args.kv_depth}_{cache_type}_tok/s"
        model.cache_type_k = model.cache_type_v = cache_type
        try:
            results[key] = decode_speed(model, 1, args.steps, args.kv_depth, generator, graphs)
            print(f"decode graphs b1 after {args.kv_depth} tokens, -ctk/-ctv {cache_type}: {results[key]:.1f} tok/s",
                  flush=True)
        except Exception as error:  # noqa: BLE001
            results[key] = f"{type(error).__name__}: {error}"
            print(f"{key} failed: {results[key]}", flush=True)
        finally:
            model.cache_type_k = model.cache_type_v = None
        save()
    if args.speculative:
        try:
            results.update(speculative_speeds(model, args, generator))
        except Exception as error:  # noqa: BLE001
            results["speculative"] = f"{type(error).__name__}: {error}"
            print(f"speculative failed: {results['speculative']}", flush=True)
        save()
    # Diagnostics for tuning: a failure there is reported and the benchmark goes on.
    for wanted, key, run in ((args.profile, "profile", kernel_profile), (args.sweep_gemv and graphs, "gemv_sweep",
                                                                       sweep_gemv_shapes)):
        if wanted:
            try:
                results[key] = run(model, args.context, generator)
            except Exception as error:  # noqa: BLE001
                results[key] = f"{type(error).__name__}: {error}"
                print(f"{key} failed: {results[key]}", flush=True)
            save()
    if graphs and torch.cuda.get_device_capability()[0] >= 9:  # kernels/triton_pdl, last: a fault there spares the rest
        from qwen35.kernels import triton_pdl

        try:  # a pair per batch size, with the launch shapes now in place (the sweep's fastest)
            for batch in args.batch:
                for enabled, key in ((False, f"decode_b{batch}_plain_tok/s"), (True, f"decode_b{batch}_pdl_tok/s")):
                    triton_pdl.ENABLED = enabled
                    results[key] = decode_speed(model, batch, args.steps, args.context, generator)
                    print(f"decode graphs b{batch}, {'programmatic dependent' if enabled else 'plain'} launches: "
                          f"{results[key]:.1f} tok/s", flush=True)
                    save()
        except Exception as error:  # noqa: BLE001
            results["pdl"] = f"{type(error).__name__}: {error}"
            print(f"programmatic dependent launch failed: {results['pdl']}", flush=True)
        finally:
            triton_pdl.ENABLED = False
    results.update(planner_estimate(path, args.context))
    floor = per_token / bandwidth
    results["roofline_b1"] = results["decode_b1_tok/s"] * floor if "decode_b1_tok/s" in results else None
    sweep = results.get("gemv_sweep")
    best = max(sweep, key=lambda row: row["decode_b1_tok/s"]) if isinstance(sweep, list) and sweep else None
    results["peak_gpu_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9 if graphs else 0.0

    print(f"\n{results['device']}: {path.name} ({results['file_GB']:.1f} GB), copy {bandwidth / 1e9:.0f} GB/s")
    print(f"| what | value |\n|---|---|")
    print(f"| prefill, {args.prompt}-token prompt | {results['prefill_tok/s']:.0f} tok/s |")
    print(f"| decode, batch 1, eager | {results['decode_eager_b1_tok/s']:.1f} tok/s |")
    for batch in args.batch:
        print(f"| decode, batch {batch}, {'CUDA graph' if graphs else 'eager'} | {results[f'decode_b{batch}_tok/s']:.1f} tok/s |")
        if f"decode_b{batch}_pdl_tok/s" in results:
            print(f"| decode, batch {batch}, CUDA graph, plain / programmatic dependent launches (final shapes) | "
                  f"{results[f'decode_b{batch}_plain_tok/s']:.1f} / {results[f'decode_b{batch}_pdl_tok/s']:.1f} tok/s |")
        if f"decode_b{batch}_gemv_tok/s" in results:
            print(f"| decode, batch {batch}, matrix-vector kernel only | {results[f'decode_b{batch}_gemv_tok/s']:.1f} tok/s |")
    if results.get("planner_decode_tok/s"):
        print(f"| the planner's estimate for this card: decode / prefill | "
              f"{results['planner_decode_tok/s']:.1f} / {results['planner_prefill_tok/s']:.0f} tok/s |")
    if best is not None:
        print(f"| decode, batch 1, CUDA graph, GEMV shapes '{best['shapes']}' (the sweep's fastest) | "
              f"{best['decode_b1_tok/s']:.1f} tok/s |")
        results["roofline_b1_best"] = best["decode_b1_tok/s"] * floor
    if results["roofline_b1"] is not None:
        print(f"| batch-1 decode vs roofline ({per_token / 1e9:.2f} GB/token) | {100 * results['roofline_b1']:.0f}%"
              + (f" ({100 * results['roofline_b1_best']:.0f}% with the sweep's fastest)" if best else "") + " |")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
