"""What `qwen35 bench` reports, in llama-bench's output formats: md, json, jsonl and csv.

The json object keeps its first version's keys for scripts (`pp_tok_s`, `tg_tok_s` and their
samples: the first pp and tg tests) and lists every test under `tests`. jsonl and csv give one
record per test, each with the machine's and the model's fields, as llama-bench's do.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

OUTPUT_FORMATS = ("md", "json", "jsonl", "csv")


@dataclass
class BenchTest:
    """One llama-bench test: a prompt of n_prompt tokens and/or n_gen generated, after n_depth in the cache."""

    n_prompt: int
    n_gen: int
    n_depth: int
    samples: list[float] = field(default_factory=list)  # tokens per second, one per repetition

    @property
    def name(self) -> str:
        """llama-bench's test names: pp512, tg128, pp512+tg128, with ' @ d4096' after a depth."""
        parts = ([f"pp{self.n_prompt}"] if self.n_prompt else []) + ([f"tg{self.n_gen}"] if self.n_gen else [])
        return "+".join(parts) + (f" @ d{self.n_depth}" if self.n_depth else "")

    @property
    def tok_s(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def stdev(self) -> float | None:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else None

    def as_dict(self) -> dict:
        return {"test": self.name, **asdict(self), "tok_s": self.tok_s, "stdev": self.stdev}


def make_result(args, path: Path, model, threads: int, tests: list[BenchTest], bandwidth: float | None,
                peak_rss: int, bytes_per_token: int | None) -> dict:
    import torch

    first_pp = next((t for t in tests if t.n_prompt and not t.n_gen), None)
    first_tg = next((t for t in tests if t.n_gen and not t.n_prompt), None)
    tg = first_tg.tok_s if first_tg else None
    roofline = bandwidth / bytes_per_token if bandwidth and bytes_per_token else None
    return {
        "model": str(path),
        "architecture": model.config.architecture,
        "layers": model.config.num_layers,
        "model_bytes": _model_bytes(path),
        "precision": args.precision,
        "n_prompt": first_pp.n_prompt if first_pp else 0,
        "n_gen": first_tg.n_gen if first_tg else 0,
        "threads": threads,
        "repetitions": args.repetitions,
        "pp_logits": "all" if args.all_logits else "last",
        "pp_tok_s": first_pp.tok_s if first_pp else None,
        "tg_tok_s": tg,
        "pp_samples": first_pp.samples if first_pp else [],
        "tg_samples": first_tg.samples if first_tg else [],
        "tests": [test.as_dict() for test in tests],
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


def format_report(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result)
    if output == "jsonl":
        return "\n".join(json.dumps(record) for record in _records(result))
    if output == "csv":
        records = _records(result)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return text.getvalue().rstrip("\n")
    return format_table(result)


_RECORD_KEYS = ("model", "architecture", "model_bytes", "precision", "backend", "threads", "repetitions",
                "pp_logits", "torch", "cpu_capability")


def _records(result: dict) -> list[dict]:
    """One flat record per test, with the run's fields first (llama-bench's jsonl and csv)."""
    common = {key: result[key] for key in _RECORD_KEYS}
    return [{**common, **{key: value for key, value in test.items() if key != "samples"},
             "samples": " ".join(f"{value:.3f}" for value in test["samples"])} for test in result["tests"]]


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


def format_table(result: dict) -> str:
    """llama-bench's markdown table, with the median and the spread of the repetitions."""
    name = Path(result["model"]).name
    size = _human_bytes(result["model_bytes"])
    header = ("model", "size", "backend", "threads", "test", "t/s (median)")
    backend = result.get("backend") or f"torch {result['cpu_capability']}"
    lines = [header] + [
        (name, size, backend, str(result["threads"]), test["test"],
         f"{test['tok_s']:.2f}" + (f" ± {test['stdev']:.2f}" if test["stdev"] is not None else ""))
        for test in result["tests"]
    ]
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
