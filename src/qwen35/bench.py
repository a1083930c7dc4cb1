"""Prefill and decode speed of a model, measured as llama-bench measures them.

pp (prompt processing): a prompt of -p random tokens goes into a fresh cache (in the
model's prefill chunks, output head on the last position only, as llama-bench and the
server do; --all-logits for every position); tokens per second.
tg (text generation): -n single-token forward calls on a fresh cache, each fed a
random token (llama-bench's tg: from an empty context, no sampling); tokens per second.
Each figure is the median over -r repetitions, after one warm-up repetition.

Also reported: peak resident memory, the weight bytes one decoded token reads
(routed experts counted at top-k of E), the machine's measured read bandwidth, and
decode speed as a fraction of that roofline (bandwidth / bytes per token).
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path

from qwen35.device_options import add_device_arguments, load_options
from qwen35.errors import Qwen35Error
from qwen35.hub import resolve_model_argument

DEFAULT_REPETITIONS = 5
BANDWIDTH_BUFFER_BYTES = 512 * 2**20  # well past any CPU's last-level cache
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a .gguf file (first shard of a split one), an HF checkpoint folder, "
                                      "or a name to pull (qwen3.5:35b-a3b, owner/name:QUANT)")
    parser.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (default 512; 0 skips)")
    parser.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens for tg (default 128; 0 skips)")
    parser.add_argument("-t", "--threads", type=int, default=None,
                        help="CPU threads (default: the CPUs this process may use)")
    parser.add_argument("-r", "--repetitions", type=int, default=DEFAULT_REPETITIONS,
                        help=f"timed repetitions, median reported (default {DEFAULT_REPETITIONS})")
    parser.add_argument("--precision", choices=("fast", "reference"), default="fast",
                        help="the engine's arithmetic (default fast)")
    parser.add_argument("--all-logits", action="store_true",
                        help="pp computes logits for every prompt position (Model.forward), not just the last")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up repetition")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory bandwidth probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_device_arguments(parser)


def run(args) -> int:
    threads = args.threads if args.threads is not None else len(os.sched_getaffinity(0))
    for value, name, low in ((args.n_prompt, "-p", 0), (args.n_gen, "-n", 0), (threads, "-t", 1),
                             (args.repetitions, "-r", 1)):
        if value < low:
            raise Qwen35Error(f"{name} must be at least {low}, got {value}")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise Qwen35Error("nothing to measure: -p and -n are both 0")
    path = resolve_model_argument(args.model, "qwen35 bench").path

    import torch

    import qwen35

    torch.set_num_threads(threads)
    progress = _Progress(enabled=not args.json and sys.stderr.isatty())
    progress.show(f"loading {path.name}")
    options = load_options(args, path, context=args.n_prompt + args.n_gen, command="qwen35 bench")
    model = qwen35.load_model(path, precision=args.precision, **options,
                              progress=lambda done, total: progress.show(f"loading {path.name}: "
                                                                         f"{done / 2**20:,.0f} of {total / 2**20:,.0f} MiB"))
    if args.n_prompt + args.n_gen > model.config.context_length:
        raise Qwen35Error(f"-p plus -n exceeds the model's context of {model.config.context_length} tokens")
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, max(args.n_prompt, 1)), generator=generator).to(model.device)
    gen_tokens = torch.randint(0, vocab, (1, max(args.n_gen, 1)), generator=generator)

    pp_samples, tg_samples = [], []
    total = args.repetitions + (0 if args.no_warmup else 1)
    for rep in range(total):
        warm_up = not args.no_warmup and rep == 0
        label = "warm-up" if warm_up else f"rep {rep + (1 if args.no_warmup else 0)}/{args.repetitions}"
        if args.n_prompt:
            progress.show(f"pp{args.n_prompt} {label}")
            seconds = time_prefill(model, prompt, args.all_logits)
            if not warm_up:
                pp_samples.append(args.n_prompt / seconds)
        if args.n_gen:
            progress.show(f"tg{args.n_gen} {label}")
            seconds = time_decode(model, gen_tokens)
            if not warm_up:
                tg_samples.append(args.n_gen / seconds)
    peak_rss = peak_rss_bytes()  # before the probe's own buffer
    bandwidth = None
    if not args.no_bandwidth:
        progress.show("bandwidth probe")
        on_gpu = model.device.type == "cuda" and all(d.type == "cuda" for d in model.network.devices)
        bandwidth = measure_gpu_bandwidth(model.device) if on_gpu else measure_read_bandwidth(threads)
    progress.clear()

    result = _result(args, path, model, threads, pp_samples, tg_samples, bandwidth, peak_rss)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0


# ------------------------------------------------------------------ timing


def time_prefill(model, prompt, all_logits: bool = False) -> float:
    """Seconds to take the whole prompt into a fresh cache.

    As llama-bench (and the server's prefill) does, the output head runs on the last
    position only, in the model's prefill chunks; `all_logits` times logits for every position.
    """
    cache = model.make_cache(1)
    _synchronize(model)
    started = time.perf_counter()
    model.forward(prompt, cache, last_only=not all_logits)
    _synchronize(model)
    return time.perf_counter() - started


def time_decode(model, tokens) -> float:
    """Seconds of len(tokens) single-token forward calls on a fresh cache (on a GPU, replays of a captured
    step, as llama.cpp's CUDA backend replays its graphs; the capture is not timed)."""
    from qwen35.engine.cuda_graphs import GraphDecoder, graphs_supported

    cache = model.make_cache(1)
    decoder = GraphDecoder(model, cache, tokens.shape[1] + 1) if graphs_supported(model) else None
    _synchronize(model)
    started = time.perf_counter()
    for i in range(tokens.shape[1]):
        if decoder is not None:
            decoder.step(tokens[:, i])
        else:
            model.forward(tokens[:, i:i + 1], cache)
    _synchronize(model)
    return time.perf_counter() - started


def _synchronize(model) -> None:
    if model.device.type == "cuda":
        import torch

        torch.cuda.synchronize(model.device)


def measure_gpu_bandwidth(device, nbytes: int = 1 << 30, repetitions: int = 20) -> float:
    """Bytes per second a large device-to-device copy moves on the GPU, reads plus writes (the HBM roofline)."""
    import torch

    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repetitions):
        target.copy_(source)
    torch.cuda.synchronize(device)
    return 2 * nbytes * repetitions / (time.perf_counter() - started)


def measure_read_bandwidth(threads: int, nbytes: int = BANDWIDTH_BUFFER_BYTES, repetitions: int = 8) -> float:
    """Bytes per second that `threads` threads read from memory: the best of summing a large buffer.

    A reduction is bound by reads alone (no writes), as a decode step's weight reads are.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(nbytes // 4, dtype=torch.float32)
        buffer.sum()  # touch every page before timing
        best = float("inf")
        for _ in range(repetitions):
            started = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - started)
        return buffer.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)


def decode_bytes_per_token(path: Path) -> int | None:
    """Weight bytes one decoded token reads from a GGUF: every text-model tensor once, routed experts
    at top-k/E, one embedding row, no MTP block. None for other formats."""
    if path.is_dir():
        return None
    from qwen35.formats.gguf import GGUFModel

    gguf = GGUFModel(path)
    try:
        arch = gguf.architecture
        block_count = int(gguf.metadata.get(f"{arch}.block_count", 0))
        n_layers = block_count - int(gguf.metadata.get(f"{arch}.nextn_predict_layers", 0))
        n_experts = int(gguf.metadata.get(f"{arch}.expert_count", 0))
        n_used = int(gguf.metadata.get(f"{arch}.expert_used_count", 0))
        tied = "output.weight" not in gguf.tensors
        total = 0.0
        for name, info in gguf.tensors.items():
            block = _BLOCK_RE.match(name)
            if block and int(block.group(1)) >= n_layers:
                continue  # the MTP block is not used to decode
            if name == "token_embd.weight" and not tied:
                total += info.nbytes / info.shape[-1]  # one row
            elif "_exps." in name and n_experts:
                total += info.nbytes * n_used / n_experts
            else:
                total += info.nbytes
        return int(total)
    finally:
        gguf.close()


# ------------------------------------------------------------------ report


def _median(samples: list[float]) -> float | None:
    return statistics.median(samples) if samples else None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _result(args, path, model, threads, pp_samples, tg_samples, bandwidth, peak_rss: int) -> dict:
    import torch

    tg = _median(tg_samples)
    bytes_per_token = decode_bytes_per_token(path)
    roofline = bandwidth / bytes_per_token if bandwidth and bytes_per_token else None
    return {
        "model": str(path),
        "architecture": model.config.architecture,
        "layers": model.config.num_layers,
        "model_bytes": _model_bytes(path),
        "precision": args.precision,
        "n_prompt": args.n_prompt,
        "n_gen": args.n_gen,
        "threads": threads,
        "repetitions": args.repetitions,
        "pp_logits": "all" if args.all_logits else "last",
        "pp_tok_s": _median(pp_samples),
        "tg_tok_s": tg,
        "pp_samples": pp_samples,
        "tg_samples": tg_samples,
        "peak_rss_bytes": peak_rss,
        "bytes_per_token": bytes_per_token,
        "bandwidth_bytes_s": bandwidth,
        "tg_roofline_tok_s": roofline,
        "tg_roofline_fraction": tg / roofline if tg and roofline else None,
        "torch": torch.__version__,
        "backend": _backend(model),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
    }


def _backend(model) -> str:
    """The card, or the CPU's vector extensions, or both for a split model (-ngl / --n-cpu-moe)."""
    import torch

    devices = model.network.devices
    gpus = sorted({torch.cuda.get_device_name(d) for d in devices if d.type == "cuda"})
    cpu = f"torch {torch.backends.cpu.get_cpu_capability()}"
    if not gpus:
        return cpu
    return " + ".join([f"CUDA {name}" for name in gpus] + (["CPU"] if any(d.type == "cpu" for d in devices) else []))


def _model_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def _human_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _spread(samples: list[float]) -> str:
    return f" ± {statistics.stdev(samples):.2f}" if len(samples) > 1 else ""


def format_table(result: dict) -> str:
    """llama-bench's markdown table, with the median and the spread of the repetitions."""
    name = Path(result["model"]).name
    size = _human_bytes(result["model_bytes"])
    rows = []
    if result["n_prompt"]:
        rows.append((f"pp{result['n_prompt']}", f"{result['pp_tok_s']:.2f}{_spread(result['pp_samples'])}"))
    if result["n_gen"]:
        rows.append((f"tg{result['n_gen']}", f"{result['tg_tok_s']:.2f}{_spread(result['tg_samples'])}"))
    header = ("model", "size", "backend", "threads", "test", "t/s (median)")
    backend = result.get("backend") or f"torch {result['cpu_capability']}"
    lines = [header] + [(name, size, backend, str(result["threads"]), test, speed) for test, speed in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    out.append("")
    out.append(f"peak RSS {_human_bytes(result['peak_rss_bytes'])}")
    if result["bytes_per_token"]:
        out.append(f"weights read per decoded token {result['bytes_per_token'] / 2**20:,.1f} MiB")
    if result["bandwidth_bytes_s"]:
        where = "GPU copy" if result.get("backend", "").startswith("CUDA") else f"{result['threads']} threads"
        out.append(f"measured read bandwidth {result['bandwidth_bytes_s'] / 1e9:.1f} GB/s ({where})")
    if result["tg_roofline_fraction"] is not None:
        out.append(f"decode roofline {result['tg_roofline_tok_s']:.1f} tok/s; tg reaches "
                   f"{100 * result['tg_roofline_fraction']:.0f}% of it")
    return "\n".join(out)


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.started = time.perf_counter()

    def show(self, text: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.started
            print(f"\r\033[K[{elapsed:6.1f} s] {text}", end="", file=sys.stderr, flush=True)

    def clear(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
