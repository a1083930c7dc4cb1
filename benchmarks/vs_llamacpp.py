"""qwen35 against llama.cpp on the same GGUF file, the same threads, the same tests.

    python benchmarks/vs_llamacpp.py /work/bench-models/0.8b-Q4_K_M.gguf -t 2
    python benchmarks/vs_llamacpp.py MODEL --llama-python /work/llama-venv/bin/python --json

Both sides measure as llama-bench does: pp = a prompt of -p random tokens evaluated
in one batch on an empty context; tg = -n random tokens decoded one at a time on an
empty context; median of -r repetitions after a warm-up. With --rounds N the two
engines take turns N times and each figure is the median over the rounds: on a machine
whose memory bandwidth drifts from minute to minute (a shared VM), both then sample the
same minutes. Each engine runs in its own
process (so peak RSS is its own): qwen35 as `qwen35 bench --json`, llama.cpp through
the llama-cpp-python package (the `bench` extra, built from source on install) in
whichever Python has it (--llama-python; by default this one, then $QWEN35_LLAMA_PYTHON).

This file imports only the standard library at the top: the llama.cpp side runs it
with `--llama-side` in a Python that need not have qwen35 installed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


# ------------------------------------------------------------------ llama.cpp side


def llama_side(model: str, n_prompt: int, n_gen: int, threads: int, repetitions: int, seed: int) -> dict:
    """llama-bench's pp and tg through llama-cpp-python; runs in the Python that has llama_cpp."""
    import random
    import resource

    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model, n_ctx=max(n_prompt, n_gen) + 16, n_batch=2048, n_ubatch=512,  # llama-bench's -b/-ub
        n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
        flash_attn=True,  # llama-bench's default "auto" turns it on for the CPU backend
    )
    draw = random.Random(seed)
    vocab = llm.n_vocab()
    prompt = [draw.randrange(vocab) for _ in range(n_prompt)]
    gen_tokens = [draw.randrange(vocab) for _ in range(max(n_gen, 1))]

    def timed(tokens_per_call: list[list[int]]) -> float:
        llm.reset()  # empties the KV cache and the recurrent state
        started = time.perf_counter()
        for tokens in tokens_per_call:
            llm.eval(tokens)
            llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - started

    pp, tg = [], []
    for rep in range(repetitions + 1):  # the first is the warm-up
        if n_prompt:
            seconds = timed([prompt])
            if rep:
                pp.append(n_prompt / seconds)
        if n_gen:
            seconds = timed([[t] for t in gen_tokens[:n_gen]])
            if rep:
                tg.append(n_gen / seconds)
    return {
        "engine": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "n_prompt": n_prompt, "n_gen": n_gen, "threads": threads, "repetitions": repetitions,
        "pp_tok_s": statistics.median(pp) if pp else None,
        "tg_tok_s": statistics.median(tg) if tg else None,
        "pp_samples": pp, "tg_samples": tg,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


# ------------------------------------------------------------------ driver


def find_llama_python(explicit: str | None) -> str:
    candidates = [explicit] if explicit else [sys.executable, os.environ.get("QWEN35_LLAMA_PYTHON")]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True)
        if probe.returncode == 0:
            return python
    raise SystemExit("vs_llamacpp: no Python with llama_cpp found: install the bench extra "
                     "(pip install 'qwen35[bench]') or pass --llama-python PATH")


def _run_json(command: list[str], what: str, env: dict | None = None) -> dict:
    print(f"running {what} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"vs_llamacpp: {what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio(ours, theirs):
    return ours / theirs if ours and theirs else None


def compare(args) -> dict:
    common = ["-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads), "-r", str(args.repetitions)]
    llama_python = find_llama_python(args.llama_python)
    # llama.cpp ignores oneDNN's settings; run it without them so that its environment is plain.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ONEDNN_")}
    rounds = []
    for _ in range(args.rounds):
        ours = _run_json([args.qwen35_python, "-m", "qwen35", "bench", args.model, *common, "--json"], "qwen35 bench")
        theirs = _run_json([llama_python, os.path.abspath(__file__), "--llama-side", args.model, *common,
                            "--seed", str(args.seed)], "llama.cpp", env=env)
        rounds.append((ours, theirs))
    ours, theirs = (_median_round([r[side] for r in rounds]) for side in (0, 1))
    return {
        "model": args.model, "threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
        "rounds": len(rounds), "qwen35": ours, "llama_cpp": theirs,
        "pp_ratio": _ratio(ours["pp_tok_s"], theirs["pp_tok_s"]),
        "tg_ratio": _ratio(ours["tg_tok_s"], theirs["tg_tok_s"]),
    }


def _median_round(results: list[dict]) -> dict:
    """The first round's result with pp/tg replaced by their medians over the rounds (and the
    per-round figures kept), peak RSS the largest."""
    merged = dict(results[0])
    for key in ("pp_tok_s", "tg_tok_s"):
        values = [r[key] for r in results if r.get(key)]
        merged[key] = statistics.median(values) if values else None
        merged[key.replace("_tok_s", "_rounds")] = [r.get(key) for r in results]
    merged["peak_rss_bytes"] = max(r.get("peak_rss_bytes") or 0 for r in results)
    return merged


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_comparison(result: dict) -> str:
    pp, tg = f"pp{result['n_prompt']} t/s", f"tg{result['n_gen']} t/s"
    rows = [("engine", pp, tg, "peak RSS GiB")]
    for name, side in (("qwen35", result["qwen35"]), ("llama.cpp", result["llama_cpp"])):
        rows.append((name, _fmt(side["pp_tok_s"]), _fmt(side["tg_tok_s"]), _fmt(side["peak_rss_bytes"] / 2**30)))
    rows.append(("qwen35 / llama.cpp", _fmt(result["pp_ratio"], 3), _fmt(result["tg_ratio"], 3), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    ours = result["qwen35"]
    if ours.get("tg_roofline_fraction") is not None:
        lines.append(f"\nqwen35 decode: {100 * ours['tg_roofline_fraction']:.0f}% of the roofline "
                     f"({ours['bytes_per_token'] / 2**20:,.0f} MiB/token at {ours['bandwidth_bytes_s'] / 1e9:.1f} GB/s)")
    return f"{os.path.basename(result['model'])}, {result['threads']} threads\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="engines take turns this many times (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama-python", help="a Python with llama_cpp installed (default: this one)")
    parser.add_argument("--qwen35-python", default=sys.executable, help="the Python with qwen35 (default: this one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--llama-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.model):
        parser.error(f"no such model file: {args.model}")
    if args.llama_side:
        print(json.dumps(llama_side(args.model, args.n_prompt, args.n_gen, args.threads, args.repetitions, args.seed)))
        return 0
    result = compare(args)
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
