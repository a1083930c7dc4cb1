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

As in llama-bench, -p, -n and -d take lists ("512,2048") and ranges ("128-1024*2",
"0-8192+4096"), every combination is a test; -pg PP,TG times a prompt and its generation
together; -d N first fills the cache with N tokens (not timed), so "tg128 @ d8192" is decode
speed at a long context; -o md|json|jsonl|csv picks the output (bench_report.py).
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path

from qwen35.cache_options import add_cache_arguments, cache_options
from qwen35.device_options import add_device_arguments, load_options
from qwen35.errors import Qwen35Error
from qwen35.bench_report import OUTPUT_FORMATS, BenchTest, format_report, make_result
from qwen35 import bench_speculative
from qwen35.hub import resolve_model_argument
from qwen35.speculation_options import add_speculation_arguments, check_speculation_arguments, speculation_from_arguments

DEFAULT_REPETITIONS = 5
BANDWIDTH_BUFFER_BYTES = 512 * 2**20  # well past any CPU's last-level cache
_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="a .gguf file (first shard of a split one), an HF checkpoint folder, "
                                      "or a name to pull (qwen3.5:35b-a3b, owner/name:QUANT)")
    parser.add_argument("-p", "--n-prompt", default="512", metavar="N[,N...]",
                        help="prompt tokens for pp tests (default 512; 0 skips; lists and ranges as llama-bench)")
    parser.add_argument("-n", "--n-gen", default="128", metavar="N[,N...]",
                        help="generated tokens for tg tests (default 128; 0 skips)")
    parser.add_argument("-pg", action="append", default=[], dest="prompt_gen", metavar="PP,TG",
                        help="a prompt of PP tokens then TG generated, timed together (repeatable)")
    parser.add_argument("-d", "--n-depth", default="0", metavar="N[,N...]",
                        help="tokens already in the cache before each test (default 0)")
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
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="md",
                        help="md (llama-bench's table, default), json (one object), jsonl (a line a test) or csv")
    parser.add_argument("--json", action="store_const", const="json", dest="output", help="the same as -o json")
    add_device_arguments(parser)
    add_cache_arguments(parser)
    add_speculation_arguments(parser)
    bench_speculative.add_arguments(parser)


def run(args) -> int:
    threads = args.threads if args.threads is not None else len(os.sched_getaffinity(0))
    for value, name in ((threads, "-t"), (args.repetitions, "-r")):
        if value < 1:
            raise Qwen35Error(f"{name} must be at least 1, got {value}")
    tests = plan_tests(parse_counts(args.n_prompt, "-p"), parse_counts(args.n_gen, "-n"),
                       [parse_pair(text) for text in args.prompt_gen], parse_counts(args.n_depth, "-d"))
    cache_options(args)  # a bad -ctk/-ctv fails before a pull or a load
    check_speculation_arguments(args)
    path = resolve_model_argument(args.model, "qwen35 bench").path

    import torch

    import qwen35

    torch.set_num_threads(threads)
    progress = _Progress(enabled=args.output == "md" and sys.stderr.isatty())
    progress.show(f"loading {path.name}")
    longest = max(test.n_depth + test.n_prompt + test.n_gen for test in tests)
    options = load_options(args, path, context=longest, command="qwen35 bench")
    options.update(cache_options(args))
    model = qwen35.load_model(path, precision=args.precision, **options,
                              progress=lambda done, total: progress.show(f"loading {path.name}: "
                                                                         f"{done / 2**20:,.0f} of {total / 2**20:,.0f} MiB"))
    if longest > model.config.context_length:
        raise Qwen35Error(f"a test needs {longest} tokens of context (-d + -p + -n): more than the model's "
                          f"{model.config.context_length}")
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    longest_prompt = max([test.n_depth for test in tests] + [test.n_prompt for test in tests])
    prompt_tokens = torch.randint(0, vocab, (1, max(longest_prompt, 1)), generator=generator).to(model.device)
    gen_tokens = torch.randint(0, vocab, (1, max(max(test.n_gen for test in tests), 1)), generator=generator)

    total = args.repetitions + (0 if args.no_warmup else 1)
    for test in tests:
        depth = prompt_tokens[:, :test.n_depth] if test.n_depth else None
        for rep in range(total):
            warm_up = not args.no_warmup and rep == 0
            progress.show(f"{test.name} {'warm-up' if warm_up else f'rep {rep + args.no_warmup}/{args.repetitions}'}")
            seconds = time_test(model, test, prompt_tokens, gen_tokens, depth, args.all_logits)
            if not warm_up:
                test.samples.append((test.n_prompt + test.n_gen) / seconds)
    speculation = speculation_from_arguments(args, model, options, "qwen35 bench")
    speculative_tests = []
    if speculation is not None:
        prompt = bench_speculative.speculative_prompt(args, path)
        for n_gen in sorted({test.n_gen for test in tests if test.n_gen and not test.n_prompt and not test.n_depth}):
            speculative_tests.append(bench_speculative.speculative_test(
                model, prompt, n_gen, speculation, args.repetitions, not args.no_warmup, progress))
    peak_rss = peak_rss_bytes()  # before the probe's own buffer
    bandwidth = None
    if not args.no_bandwidth:
        progress.show("bandwidth probe")
        on_gpu = model.device.type == "cuda" and all(d.type == "cuda" for d in model.network.devices)
        bandwidth = measure_gpu_bandwidth(model.device) if on_gpu else measure_read_bandwidth(threads)
    progress.clear()

    result = make_result(args, path, model, threads, tests, bandwidth, peak_rss, decode_bytes_per_token(path))
    result.update(kv_cache_fields(model))
    if speculation is not None:
        result["speculative"] = speculative_tests
    report = format_report(result, args.output)
    if args.output == "md":
        report += (f"\nK/V cache -ctk {result['type_k']} -ctv {result['type_v']}: "
                   f"{result['kv_bytes_per_token'] / 1024:,.2f} KiB per token of context")
        for test in speculative_tests:
            report += "\n" + bench_speculative.markdown_line(test)
    print(report)
    return 0


def kv_cache_fields(model) -> dict:
    """The types the full-attention layers keep K and V in and the bytes they allocate per token (measured
    on a fresh cache: `qwen35 plan --cache-type` prices the same)."""
    from qwen35.engine.cache import DeltaNetState
    from qwen35.engine.quantized_kv import allocated_kv_bytes_per_token, stored_cache_types

    cache = model.make_cache(1)
    store = next((layer for layer in cache.layers if not isinstance(layer, DeltaNetState)), None)
    type_k, type_v = stored_cache_types(store) if store is not None else (None, None)
    return {"type_k": type_k, "type_v": type_v, "kv_bytes_per_token": allocated_kv_bytes_per_token(cache)}


# ------------------------------------------------------------------ what to measure

MAX_TESTS = 256
_RANGE = re.compile(r"(\d+)-(\d+)(?:([+*])(\d+))?")


def parse_counts(text: str, flag: str) -> list[int]:
    """llama-bench's values: "512", "128,512", ranges "first-last" (step 1), "first-last+step", "first-last*factor"."""
    values: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if part.isdigit():
            values.append(int(part))
            continue
        match = _RANGE.fullmatch(part)
        if match is None:
            raise Qwen35Error(f"{flag} {text}: not a count, a list (512,1024) or a range (128-1024*2, 0-8192+4096)")
        value, last, how, step = int(match[1]), int(match[2]), match[3] or "+", int(match[4] or 1)
        if last < value or step < 1 or (how == "*" and (step < 2 or value < 1)):
            raise Qwen35Error(f"{flag} {part}: an empty or endless range")
        while value <= last:
            values.append(value)
            value = value + step if how == "+" else value * step
            if len(values) > MAX_TESTS:
                raise Qwen35Error(f"{flag} {text}: more than {MAX_TESTS} values")
    return values


def parse_pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts) or not any(int(p) for p in parts):
        raise Qwen35Error(f"-pg {text}: give PP,TG token counts, e.g. -pg 512,128")
    return int(parts[0]), int(parts[1])


def plan_tests(prompts: list[int], gens: list[int], pairs: list[tuple[int, int]], depths: list[int]) -> list[BenchTest]:
    """llama-bench's order: at each depth, the pp tests, then tg, then pp+tg; a count of 0 is no test."""
    tests = []
    for depth in depths:
        tests += [BenchTest(n_prompt=n, n_gen=0, n_depth=depth) for n in prompts if n > 0]
        tests += [BenchTest(n_prompt=0, n_gen=n, n_depth=depth) for n in gens if n > 0]
        tests += [BenchTest(n_prompt=p, n_gen=g, n_depth=depth) for p, g in pairs]
    if not tests:
        raise Qwen35Error("nothing to measure: -p and -n are 0 and no -pg is given")
    if len(tests) > MAX_TESTS:
        raise Qwen35Error(f"{len(tests)} tests: at most {MAX_TESTS}")
    return tests


# ------------------------------------------------------------------ timing


def time_test(model, test: BenchTest, prompt_tokens, gen_tokens, depth=None, all_logits: bool = False) -> float:
    """Seconds of one repetition of `test` on a fresh cache holding `depth` (not timed). In a pp+tg test the
    prompt's time and the generation's are added; a GPU's graph capture between them is not counted."""
    cache = model.make_cache(1)
    if depth is not None:
        model.forward(depth, cache, last_only=True)
    seconds = 0.0
    if test.n_prompt:
        seconds += _timed(model, lambda: prefill(model, prompt_tokens[:, :test.n_prompt], cache, all_logits))
    if test.n_gen:
        decoder = _graph_decoder(model, cache, test.n_gen)
        seconds += _timed(model, lambda: decode(model, gen_tokens[:, :test.n_gen], cache, decoder))
    return seconds


def _timed(model, work) -> float:
    _synchronize(model)
    started = time.perf_counter()
    work()
    _synchronize(model)
    return time.perf_counter() - started


def prefill(model, prompt, cache, all_logits: bool = False) -> None:
    """As llama-bench (and the server's prefill) does, the output head runs on the last position only, in
    the model's prefill chunks; `all_logits` times logits for every position."""
    model.forward(prompt, cache, last_only=not all_logits)


def decode(model, tokens, cache, decoder=None) -> None:
    """Single-token forward calls (on a GPU, replays of a captured step, as llama.cpp's CUDA backend replays
    its graphs; the capture, made before, is not timed)."""
    for i in range(tokens.shape[1]):
        if decoder is not None:
            decoder.step(tokens[:, i])
        else:
            model.forward(tokens[:, i:i + 1], cache)


def _graph_decoder(model, cache, n_gen: int):
    from qwen35.engine.cuda_graphs import GraphDecoder, graphs_supported

    if not graphs_supported(model):
        return None
    return GraphDecoder(model, cache, int(cache.lengths.max()) + n_gen + 1)


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


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


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
