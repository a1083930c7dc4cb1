"""Which Qwen 3.5 model, quant and context fit this machine, and how fast they run."""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import replace

from qwen35.errors import Qwen35Error

TABLES = ("vram", "context", "picks")

EXAMPLES = """\
With no flags: the best pick for this machine (detected: NVIDIA GPUs, Apple chips,
RAM), its alternatives and why. --model/--quant size one model tensor by tensor;
--gguf FILE... and --hf DIR read a real model's headers (never its weights);
--table vram|context|picks computes the usual guide tables. --json for tools.

examples:
  qwen35 plan
  qwen35 plan --gpu 3090 --ctx 64k
  qwen35 plan --model 35b-a3b --quant Q4_K_M --ctx 4096 --json
  qwen35 plan --gguf Qwen3.5-27B-Q4_K_M.gguf mmproj-F16.gguf --vision
  qwen35 plan --table picks
"""


def parse_tokens(text: str) -> int:
    """'4096', '32k', '128K', '1m' -> tokens (k = 1024)."""
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (use e.g. 4096, 32k, 128k)")
    number = float(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2).lower()]
    if number != int(number) or abs(number) > 1 << 40:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}")
    return int(number)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXAMPLES
    what = parser.add_argument_group("what to plan (default: the best pick for this machine)")
    what.add_argument("--model", help="a size: 0.8b 2b 4b 9b 27b 35b-a3b 122b-a10b 397b-a17b (qwen3.5:35b-a3b works too)")
    what.add_argument("--quant", help="a llama.cpp mix: BF16 F16 Q8_0 Q6_K Q5_K_M Q5_K_S Q4_K_M Q4_K_S "
                                      "IQ4_XS Q4_0 Q3_K_L Q3_K_M Q3_K_S Q2_K UD-Q4_K_XL")
    what.add_argument("--gguf", nargs="+", metavar="FILE", help="GGUF file(s): the model (any shard) and optionally its mmproj")
    what.add_argument("--hf", metavar="DIR", help="an HF checkpoint folder (config.json + safetensors)")
    what.add_argument("--table", choices=TABLES, help="compute a guide table: memory by quant, by context, or picks by hardware")
    use = parser.add_argument_group("how it is run")
    use.add_argument("--ctx", type=parse_tokens, help="context per sequence in tokens (default 32k; --table vram 4k, picks 8k)")
    use.add_argument("--parallel", type=int, default=1, help="parallel sequences (llama.cpp -np), default 1")
    use.add_argument("--cache-type", default="f16",
                     help="KV cache type: f16 (default), bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1 (-ctk/-ctv)")
    use.add_argument("--mtp", action="store_true", help="load the MTP layer (speculative decoding)")
    use.add_argument("--vision", action="store_true", help="load the vision projector")
    use.add_argument("--ubatch", type=int, default=512, help="micro-batch size for the compute buffers (default 512)")
    use.add_argument("--min-speed", type=float, default=None, help="slowest decode (tok/s) a pick may have (default 10)")
    hw = parser.add_argument_group("hardware (default: detected)")
    hw.add_argument("--gpu", help="GPU or Apple chip: 3090, 'rtx 4090', 'm4 max 128', h100 ...")
    hw.add_argument("--vram", type=float, metavar="GB", help="VRAM per GPU in GiB (with or instead of --gpu)")
    hw.add_argument("--ram", type=float, metavar="GB", help="system RAM in GiB (unified memory on a Mac)")
    hw.add_argument("--gpus", type=int, help="number of GPUs (layers are split across them)")
    hw.add_argument("--ram-type", help="system RAM for CPU runs and offload: ddr4-3200 (default guess), ddr5-5600, ...")
    hw.add_argument("--no-detect", action="store_true", help="do not look at this machine (memory only unless flags say)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="one JSON object on stdout")
    out.add_argument("--tensors", action="store_true", help="list every tensor with its type and bytes")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from qwen35.plan import advisor, report
    from qwen35.plan.catalog import find_model
    from qwen35.plan.estimator import Request
    from qwen35.plan.mixes import find_mix

    default_ctx = {"vram": 4096, "picks": 8192}.get(args.table, 32768)
    request = Request(ctx=args.ctx if args.ctx is not None else default_ctx, parallel=args.parallel,
                      cache_type=args.cache_type.lower(), load_mtp=args.mtp, load_vision=args.vision,
                      n_ubatch=args.ubatch)
    request.validate()
    min_speed = advisor.DEFAULT_MIN_SPEED if args.min_speed is None else args.min_speed
    if min_speed < 0 or min_speed > 1e6:
        raise Qwen35Error(f"--min-speed must be a number of tokens/s between 0 and 1e6, not {min_speed:g}")
    sources = [name for name in ("model", "gguf", "hf", "table") if getattr(args, name)]
    if len(sources) > 1 and sources != ["model", "table"]:
        raise Qwen35Error(f"give only one of --{', --'.join(sources)}")
    mix = find_mix(args.quant) if args.quant else None
    spec = find_model(args.model) if args.model else None
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=120)  # piped: tables as wide as they need

    if args.table:
        return _tables(args, request, spec, mix, min_speed, console)

    hardware = _hardware(args)
    if hardware is not None:
        request = replace(request, backend=hardware.backend)

    if args.gguf or args.hf:
        from qwen35.plan.sources import load_gguf, load_hf
        from qwen35.plan.weights import predict_weights

        loaded = load_gguf([_local_model(t) for t in args.gguf]) if args.gguf else load_hf(_local_model(args.hf))
        weights, mix_name = loaded.weights, loaded.mix
        if args.hf and mix is not None:  # the GGUF that --quant would make from this checkpoint
            weights, mix_name = predict_weights(loaded.spec, mix), mix.name
        candidate = advisor.evaluate(loaded.spec, weights, mix_name, request, hardware)
        if loaded.origin == "gguf":
            given = args.gguf[0]
            candidate.model_path = given if not os.path.exists(given) else loaded.files[0]  # a pulled name as given
        return _show_model(args, console, candidate, hardware, loaded.origin, loaded.files)

    if spec is not None:
        if mix is not None:
            candidate = advisor.evaluate_catalog(spec, mix.name, request, hardware)
        else:
            best = advisor.best_for_model(spec, request, hardware, min_speed) if hardware else None
            candidate = best or advisor.evaluate_catalog(spec, "Q4_K_M", request, hardware)
        return _show_model(args, console, candidate, hardware, "catalog")

    if hardware is None:
        raise Qwen35Error("no hardware to plan for: drop --no-detect, or give --gpu, --vram or --ram")
    rec = advisor.recommend(hardware, request, min_speed)
    if args.json:
        print(json.dumps(report.plan_json(rec, hardware, request, min_speed), indent=2))
    else:
        report.render_plan(console, rec, hardware, request)
    return 0 if rec.pick else 1


def _local_model(text: str) -> str:
    """--gguf / --hf take files, or names `qwen35 pull` has fetched; never a download (plan reads headers)."""
    if os.path.exists(text):
        return text
    from qwen35.hub import resolve_model

    return str(resolve_model(text, pull_if_missing=False).path)


def _hardware(args):
    from qwen35.plan.hardware import build_hardware

    given = any(v is not None for v in (args.gpu, args.vram, args.ram, args.gpus))
    if args.no_detect and not given:
        return None
    return build_hardware(gpu=args.gpu, vram_gb=args.vram, ram_gb=args.ram, gpus=args.gpus,
                          ram_type=args.ram_type, detect=not args.no_detect)


def _show_model(args, console, candidate, hardware, source: str, files=None) -> int:
    from qwen35.plan import report

    if args.json:
        print(json.dumps(report.model_json(candidate, hardware, source, files), indent=2))
    else:
        report.render_model(console, candidate, hardware, show_tensors=args.tensors)
    return 0


def _tables(args, request, spec, mix, min_speed, console) -> int:
    from qwen35.plan import report, tables

    models = (spec,) if spec is not None else None
    if args.table == "vram":
        rows = tables.vram_table(request, models, (mix.name,) if mix else tables.GUIDE_QUANTS)
        title = f"Memory (GiB) by quant at {request.ctx:,} tokens of context"
    elif args.table == "context":
        rows = tables.context_table(request, mix.name if mix else "Q4_K_M", models)
        title = "Memory (GiB) by context"
    else:
        rows = tables.picks_table(request, min_speed, args.ram)
        title = f"Picks at {request.ctx:,} tokens of context (whole model in fast memory)"
    if args.json:
        print(json.dumps({"table": args.table, "request": report.request_json(request), "rows": rows}, indent=2))
    else:
        report.render_rows(console, title, rows, list(rows[0]) if rows else [])
    return 0
