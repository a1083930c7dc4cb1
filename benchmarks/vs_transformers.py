"""qwen35 against HF transformers on the same checkpoint folder, the same threads, the same tests.

    python benchmarks/vs_transformers.py /path/to/Qwen3.5-0.8B -t 2
    python benchmarks/vs_transformers.py --make 0.8b --layers 24 -o /work/bench-models/0.8b-hf -t 2

pp = one forward over a prompt of -p random tokens on an empty cache; tg = -n
single-token forwards on an empty cache (llama-bench's tests); median of -r
repetitions after a warm-up. transformers runs as its `generate` would: the
checkpoint's dtype (or --dtype), only the last position's logits in the prefill,
its own cache, and whatever kernels it finds (without flash-linear-attention it
uses its PyTorch reference forms of the delta rule). Each engine runs in its own
process. `--make SIZE` first writes a random checkpoint with a family size's real
shapes (transformers' own model class and save_pretrained; no download).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_llamacpp import _fmt, _ratio, _run_json  # noqa: E402  (shared driver helpers)


def transformers_side(model_dir: str, n_prompt: int, n_gen: int, threads: int, repetitions: int,
                      seed: int, dtype: str) -> dict:
    import resource

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(0, vocab, (1, max(n_prompt, 1)), generator=generator)
    gen_tokens = torch.randint(0, vocab, (1, max(n_gen, 1)), generator=generator)

    @torch.inference_mode()
    def prefill() -> float:
        started = time.perf_counter()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - started

    @torch.inference_mode()
    def decode() -> float:
        cache = None
        started = time.perf_counter()
        for i in range(n_gen):
            cache = model(input_ids=gen_tokens[:, i:i + 1], past_key_values=cache, use_cache=True).past_key_values
        return time.perf_counter() - started

    pp, tg = [], []
    for rep in range(repetitions + 1):  # the first is the warm-up
        if n_prompt:
            seconds = prefill()
            if rep:
                pp.append(n_prompt / seconds)
        if n_gen:
            seconds = decode()
            if rep:
                tg.append(n_gen / seconds)
    return {
        "engine": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "dtype": str(model.dtype), "n_prompt": n_prompt, "n_gen": n_gen, "threads": threads,
        "repetitions": repetitions,
        "pp_tok_s": statistics.median(pp) if pp else None, "tg_tok_s": statistics.median(tg) if tg else None,
        "pp_samples": pp, "tg_samples": tg,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def make_random_checkpoint(size: str, layers: int | None, out: Path, seed: int = 0) -> Path:
    """A random text-only checkpoint (bf16 safetensors) with a catalog size's real shapes."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    from qwen35.plan.catalog import find_model

    spec = find_model(size)
    n_layers = layers or spec.n_layers
    common = dict(
        vocab_size=spec.vocab, hidden_size=spec.hidden, num_hidden_layers=n_layers,
        num_attention_heads=spec.n_head, num_key_value_heads=spec.n_head_kv, head_dim=spec.head_dim,
        linear_num_key_heads=spec.linear_k_heads, linear_num_value_heads=spec.linear_v_heads,
        linear_key_head_dim=spec.linear_k_dim, linear_value_head_dim=spec.linear_v_dim,
        linear_conv_kernel_dim=spec.conv_kernel, tie_word_embeddings=spec.tied_embeddings,
        layer_types=["full_attention" if spec.is_full_attention(i) else "linear_attention" for i in range(n_layers)],
    )
    torch.manual_seed(seed)
    if spec.is_moe:
        config = Qwen3_5MoeTextConfig(num_experts=spec.n_experts, num_experts_per_tok=spec.n_experts_used,
                                      moe_intermediate_size=spec.expert_ffn,
                                      shared_expert_intermediate_size=spec.shared_ffn, **common)
        model = Qwen3_5MoeForCausalLM(config)
    else:
        model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(intermediate_size=spec.ffn, **common))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("model", nargs="?", help="an HF checkpoint folder")
    parser.add_argument("-p", "--n-prompt", type=int, default=512)
    parser.add_argument("-n", "--n-gen", type=int, default=128)
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--repetitions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto", help="transformers' dtype: auto (the checkpoint's), bfloat16, float32")
    parser.add_argument("--make", metavar="SIZE", help="first write a random checkpoint of this family size to -o")
    parser.add_argument("--layers", type=int, help="with --make: this many layers")
    parser.add_argument("-o", "--output", type=Path, help="with --make: the folder to write")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--transformers-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        if not args.output:
            parser.error("--make needs -o FOLDER")
        args.model = str(make_random_checkpoint(args.make, args.layers, args.output, args.seed))
    if not args.model or not os.path.isdir(args.model):
        parser.error(f"no such checkpoint folder: {args.model}")
    if args.transformers_side:
        print(json.dumps(transformers_side(args.model, args.n_prompt, args.n_gen, args.threads,
                                           args.repetitions, args.seed, args.dtype)))
        return 0
    common = ["-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads), "-r", str(args.repetitions)]
    ours = _run_json([sys.executable, "-m", "qwen35", "bench", args.model, *common, "--json"], "qwen35 bench")
    theirs = _run_json([sys.executable, os.path.abspath(__file__), "--transformers-side", args.model, *common,
                        "--seed", str(args.seed), "--dtype", args.dtype], "transformers")
    result = {"model": args.model, "threads": args.threads, "n_prompt": args.n_prompt, "n_gen": args.n_gen,
              "qwen35": ours, "transformers": theirs,
              "pp_ratio": _ratio(ours["pp_tok_s"], theirs["pp_tok_s"]),
              "tg_ratio": _ratio(ours["tg_tok_s"], theirs["tg_tok_s"])}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{os.path.basename(os.path.normpath(args.model))}, {args.threads} threads")
    print(f"| engine | pp{args.n_prompt} t/s | tg{args.n_gen} t/s | peak RSS GiB |\n| --- | --- | --- | --- |")
    for name, side in (("qwen35", ours), (f"transformers ({theirs['dtype']})", theirs)):
        print(f"| {name} | {_fmt(side['pp_tok_s'])} | {_fmt(side['tg_tok_s'])} | {_fmt(side['peak_rss_bytes'] / 2**30)} |")
    print(f"| qwen35 / transformers | {_fmt(result['pp_ratio'], 3)} | {_fmt(result['tg_ratio'], 3)} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
