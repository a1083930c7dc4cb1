"""Decode and prefill speed of llama.cpp-style split placements on a CUDA GPU, next to the planner's estimate.

    python benchmarks/gpu_placements.py --size 35b-a3b --type Q4_K_M --n-cpu-moe 0 20 40 --ngl 20

Each placement loads gpu_bench's sparse random GGUF with that split (`-ngl N`: only the last N
layers on the GPU; `--n-cpu-moe N`: the routed experts of the first N layers in system RAM),
gives the GPU-side blocks random values as gpu_bench does, and times a short prefill and eager
batch-1 decode (a split step runs partly on the CPU, so it never takes the CUDA-graph path).
The CPU side keeps the file's blocks, zeros: speed depends on shapes and block types, not values,
except that zero weights route every token to the same experts (in an -ngl split, the CPU layers
and, since their output is zero, the GPU layers too; with --n-cpu-moe the routers are on the GPU
and random). The planner's estimate is for the same forced flags on this machine
(plan.speed.placement_for_flags, plan.hardware.build_hardware()), once with its RAM bandwidth
guess and once with the RAM read bandwidth measured here.

`--device cpu` checks the script itself: a split needs a GPU, so the unsplit model is measured
once and the planner's numbers are still given for each requested placement.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import (decode_speed, prefill_speed, randomize_blocks_, randomize_small_tensors_,  # noqa: E402
                       sparse_model)

import qwen35  # noqa: E402
from qwen35.bench import measure_read_bandwidth  # noqa: E402
from qwen35.kernels import fast_cpu  # noqa: E402
from qwen35.kernels.quant_linear import QuantExperts, QuantLinear  # noqa: E402
from qwen35.plan.estimator import Request, estimate_memory  # noqa: E402
from qwen35.plan.hardware import build_hardware  # noqa: E402
from qwen35.plan.sources import load_gguf  # noqa: E402
from qwen35.plan.speed import estimate_speed, placement_for_flags  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Flags:
    gpu_layers: int | None = None  # -ngl
    cpu_moe_layers: int = 0  # --n-cpu-moe

    @property
    def label(self) -> str:
        return f"-ngl {self.gpu_layers}" if self.gpu_layers is not None else f"--n-cpu-moe {self.cpu_moe_layers}"


def randomize_small_tensors_per_device_(network, seed: int) -> None:
    """gpu_bench's randomize_small_tensors_ on each device's layers with that device's generator (a
    torch generator serves one device, and a split network's layers sit on two)."""
    for device in {layer.device for layer in network.layers} | {network.final_norm.device}:
        final_norm = network.final_norm if network.final_norm.device == device else torch.empty(0, device=device)
        layers = [layer for layer in network.layers if layer.device == device]
        randomize_small_tensors_(SimpleNamespace(final_norm=final_norm, layers=layers),
                                 torch.Generator(device=device).manual_seed(seed))


def measure(path: Path, device: str, flags: Flags | None, args, whole: bool = False) -> dict:
    """Load with the split, randomize what sits on the GPU, time prefill and eager decode (and, for a
    model `whole` on the GPU, CUDA-graph decode too); frees the model."""
    on_gpu = device != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    split = dataclasses.asdict(flags) if flags else {}
    # "fast" on both sides: the CPU's part of a split runs the packed CPU kernels, as `qwen35 serve` would.
    model = qwen35.load_model(path, device=device, precision="fast", **split)
    loaded = time.perf_counter() - started
    with torch.inference_mode():
        if on_gpu:  # (the CPU side stays zeros: the file's read-only map, or the CPU kernels' packed copy)
            generator = torch.Generator(device=device).manual_seed(0)
            for module in model.network.modules():
                if isinstance(module, (QuantLinear, QuantExperts)) and module.blocks.is_cuda:
                    randomize_blocks_(module, generator)
        randomize_small_tensors_per_device_(model.network, seed=1)
    # Prompt tokens are made where the model takes its input: the CPU when -ngl leaves layer 0 there.
    tokens = torch.Generator(device=model.device).manual_seed(2)
    result = {"load_s": loaded, "input_device": str(model.device)}
    result["prefill_tok/s"] = prefill_speed(model, args.prompt, tokens)
    result["decode_tok/s"] = decode_speed(model, 1, args.steps, args.context, tokens, graphs=False)
    if whole and on_gpu:  # what the unsplit model decodes at when launches cost nothing: eager's overhead
        result["decode_graphs_tok/s"] = decode_speed(model, 1, args.steps, args.context, tokens)
    result["gpu_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9 if on_gpu else 0.0
    result["seconds"] = time.perf_counter() - started
    del model  # the next placement needs the GPU memory and the RAM this one holds
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def planner_for_flags(loaded, memory, hardware, flags: Flags) -> dict:
    """The planner's estimate for this forced split (not the one `place` picks: the model fits)."""
    placement = placement_for_flags(loaded.spec, loaded.weights, memory, hardware, flags.gpu_layers,
                                    flags.cpu_moe_layers)
    speed = estimate_speed(loaded.spec, loaded.weights, memory, hardware, placement)
    return {"mode": placement.mode, "llama_cpp_flags": placement.flag, "decode_tok/s": speed.decode_tok_s,
            "prefill_tok/s": speed.prefill_tok_s, "gpu_bytes_per_token": speed.fast_bytes_per_token,
            "ram_bytes_per_token": speed.ram_bytes_per_token, "gpu_bytes": placement.fast_bytes_used,
            "ram_bytes": placement.ram_bytes_used}


def requested_flags(args) -> list[Flags]:
    if args.n_cpu_moe is None and args.ngl is None:
        args.n_cpu_moe, args.ngl = [0, 20, 40], [20]
    return [Flags(cpu_moe_layers=n) for n in args.n_cpu_moe or []] + [Flags(gpu_layers=n) for n in args.ngl or []]


def print_table(results: dict) -> None:
    ram = results["ram_read_GB/s"]
    print(f"\n{results['device']}: {results['model']}; planner hardware: {results['planner_hardware']}, "
          f"RAM {results['planner_ram_GB/s']:g} GB/s assumed, {ram:.0f} GB/s read here")
    if "unsplit_cpu" in results:
        cpu = results["unsplit_cpu"]
        print(f"(on the CPU no split is possible: the unsplit model measured once, decode "
              f"{cpu['decode_tok/s']:.2f} tok/s, prefill {cpu['prefill_tok/s']:.1f} tok/s; planner numbers per flag)")
    print("| placement | measured decode tok/s | planner decode tok/s | ratio | measured prefill tok/s "
          f"| planner prefill tok/s | planner decode, RAM at {ram:.0f} GB/s |\n|---|---|---|---|---|---|---|")
    for row in results["placements"]:
        plan, measured = row["planner"], row.get("measured")
        decode = f"{measured['decode_tok/s']:.1f}" if measured else "-"
        ratio = f"{measured['decode_tok/s'] / plan['decode_tok/s']:.2f}" if measured else "-"
        prefill = f"{measured['prefill_tok/s']:.0f}" if measured else "-"
        print(f"| {row['flag']} | {decode} | {plan['decode_tok/s']:.1f} | {ratio} | {prefill} "
              f"| {plan['prefill_tok/s']:.0f} | {row['planner_measured_ram']['decode_tok/s']:.1f} |")
    for row in results["placements"]:
        if "decode_graphs_tok/s" in row.get("measured", {}):
            print(f"({row['flag']}: {row['measured']['decode_graphs_tok/s']:.1f} tok/s decoding through CUDA graphs)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--size", default="35b-a3b")
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--n-cpu-moe", type=int, nargs="+", help="one placement per value (default 0 20 40)")
    parser.add_argument("--ngl", type=int, nargs="+", help="one placement per value (default 20)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length")
    parser.add_argument("--context", type=int, default=64, help="prompt length before decoding")
    parser.add_argument("--steps", type=int, default=16, help="decoded tokens timed per placement")
    parser.add_argument("--layers", type=int, help="cut the model to this many layers (the CPU self-check)")
    parser.add_argument("--experts", type=int, help="routed experts per layer (the CPU self-check)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (the CPU self-check)")
    parser.add_argument("--ram-type", help="the planner's RAM type (plan --ram-type), else its default guess")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/qwen35-bench"))
    parser.add_argument("--json", type=Path, help="also write the results here (after each placement)")
    parser.add_argument("--device", default="cuda", help="cuda (the point); cpu checks the script itself")
    args = parser.parse_args(argv)
    flags = requested_flags(args)

    path = sparse_model(args)  # gpu_bench.py's file: a run after it reuses that file
    on_gpu = args.device != "cpu"
    loaded = load_gguf([str(path)])
    memory = estimate_memory(loaded.spec, loaded.weights, Request(ctx=max(args.context, 4096)))
    hardware = build_hardware(ram_type=args.ram_type)
    ram_read = measure_read_bandwidth(torch.get_num_threads())
    # The planner's model with this machine's RAM in place of its guess: what is left is the model's own error.
    measured_ram = dataclasses.replace(hardware, cpu_bandwidth_gbs=ram_read / 1e9)
    results = {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "model": path.name,
               "file_GB": path.stat().st_size / 1e9, "threads": torch.get_num_threads(),
               "planner_hardware": hardware.description, "planner_ram_GB/s": hardware.cpu_bandwidth_gbs,
               "ram_read_GB/s": ram_read / 1e9, "prompt": args.prompt, "context": args.context,
               "steps": args.steps, "placements": []}

    def save() -> None:  # after every placement: a run cut short by its time limit keeps what it had
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    # The CPU side of a split needs the packed CPU kernels (built at first use, ~30 s); without them it
    # would run the reference path, far slower than any engine, and say nothing about the planner.
    started = time.perf_counter()
    results["cpu_kernels"] = fast_cpu.available()
    results["cpu_kernels_build_s"] = time.perf_counter() - started
    if not results["cpu_kernels"]:
        print("the fast CPU kernels are not available here: placements with a CPU side are not measured", flush=True)
    if not on_gpu:
        results["unsplit_cpu"] = measure(path, args.device, None, args)
        save()
    for flag in flags:
        row = {"flag": flag.label, **dataclasses.asdict(flag),
               "planner": planner_for_flags(loaded, memory, hardware, flag),
               "planner_measured_ram": {key: value for key, value in
                                        planner_for_flags(loaded, memory, measured_ram, flag).items()
                                        if key in ("decode_tok/s", "prefill_tok/s")}}
        if on_gpu and (results["cpu_kernels"] or row["planner"]["mode"] == "full"):
            row["measured"] = measure(path, args.device, flag, args, whole=row["planner"]["mode"] == "full")
            print(f"{flag.label}: {json.dumps(row['measured'])}", flush=True)
        results["placements"].append(row)
        save()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
