"""The `pull`, `list` and `rm` subcommands (registered through pull_command, list_command, rm_command)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

PULL_EXAMPLES = """\
MODEL is a family tag (Ollama style) or a hub repo (llama.cpp -hf style):
  qwen3.5                     the pick of `qwen35 plan` for this machine
  qwen3.5:35b-a3b             one size, at the planner's best quant for this machine (else Q4_K_M)
  qwen3.5:27b-q8_0            one size and quant (also -ud-q4_k_xl, -bf16, -fp16 ...)
  unsloth/Qwen3.5-9B-GGUF:Q4_K_M, hf.co/owner/name:QUANT, https://huggingface.co/owner/name

Files go to the Hugging Face cache (HF_HOME, HF_HUB_CACHE), shared with huggingface-cli;
HF_ENDPOINT picks a mirror, HF_TOKEN or `huggingface-cli login` opens gated repos, and
$QWEN35_HOME/models.json (default ~/.cache/qwen35) lists what was pulled.
"""


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = PULL_EXAMPLES
    parser.add_argument("model", metavar="MODEL", help="qwen3.5:35b-a3b, qwen3.5:27b-q8_0, owner/name[:QUANT] ...")
    parser.add_argument("--quant", help="the quant to download (Q4_K_M, Q8_0, UD-Q4_K_XL ...), if MODEL has none")
    parser.add_argument("--format", choices=("gguf", "safetensors"),
                        help="gguf (default where the repo has GGUF files) or the HF safetensors checkpoint")
    parser.add_argument("--no-mmproj", action="store_true", help="skip the vision projector (mmproj) file")


def run_pull(args: argparse.Namespace) -> int:
    from qwen35.hub.pull import pull

    entry = pull(args.model, quant=args.quant, format=args.format, mmproj=not args.no_mmproj,
                 announce=lambda message: print(message, flush=True))
    quant = entry.quant or "safetensors"
    vision = " + mmproj" if entry.mmproj else ""
    print(f"pulled {entry.name} ({quant}{vision}, {human_size(entry.size)}) to {entry.path}; "
          f"run it with: qwen35 run {entry.name}")
    line = plan_line(entry)
    if line:
        print(line)
    return 0


def plan_line(entry) -> str | None:
    """What `qwen35 plan` says of a pulled GGUF on this machine, in one line (None where it cannot tell)."""
    from qwen35.errors import Qwen35Error
    from qwen35.hub.pull import machine_hardware
    from qwen35.plan import advisor
    from qwen35.plan.estimator import GiB, Request
    from qwen35.plan.sources import load_gguf

    if entry.format != "gguf":
        return None
    try:
        loaded = load_gguf([entry.path])
        hardware = machine_hardware()
        request = Request(backend=hardware.backend)
        candidate = advisor.evaluate(loaded.spec, loaded.weights, loaded.mix, request, hardware)
    except Qwen35Error:
        return None
    needed = f"{candidate.memory.total_bytes / GiB:.1f} GiB with {request.ctx // 1024}K tokens of context"
    if not candidate.runs:
        return f"on this machine ({hardware.description}): it needs {needed}, more than there is"
    placement = candidate.placement
    where = {"full": "all on the GPU", "unified": "in memory"}.get(placement.mode, f"split as {placement.flag}")
    return (f"on this machine ({hardware.description}): {needed}, {where}, about {candidate.decode:.0f} tok/s "
            f"decode (qwen35 plan --gguf {entry.name} for the details)")


def add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON array on stdout")


def run_list(args: argparse.Namespace) -> int:
    from qwen35.hub.manifest import Manifest

    manifest = Manifest.load()
    rows = []
    for name, entry in sorted(manifest.models.items()):
        rows.append((name, None, entry))
    for alias, target in sorted(manifest.aliases.items()):
        rows.append((alias, target, manifest.models[target]))
    rows.sort(key=lambda row: row[0])
    if args.json:
        print(json.dumps([{**vars(entry), "name": name, "alias_of": target, "complete": entry.is_complete()}
                          for name, target, entry in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    if not rows:
        console.print("no models pulled yet: `qwen35 pull qwen3.5` fetches the best one for this machine")
        return 0
    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "QUANT", "SIZE", "MODIFIED"):
        table.add_column(column, no_wrap=True)
    for name, target, entry in rows:
        quant = (entry.quant or entry.format) + (" +mmproj" if entry.mmproj else "")
        state = "" if entry.is_complete() else " (files missing: pull again)"
        table.add_row(name + (f" -> {target}" if target else ""), quant, human_size(entry.size),
                      ago(entry.pulled_at) + state)
    console.print(table)
    return 0


def add_rm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="a name `qwen35 list` shows")


def run_rm(args: argparse.Namespace) -> int:
    from qwen35.errors import Qwen35Error
    from qwen35.hub.manifest import Manifest, delete_cached_file
    from qwen35.hub.pull import lookup_name

    with Manifest.editing() as manifest:
        name = args.name
        if manifest.get(name) is None:
            try:
                name = lookup_name(args.name)
            except Qwen35Error:
                pass
        entry, aliases = manifest.remove(name)
        in_use = manifest.files_in_use()
    freed = sum(delete_cached_file(p) for p in entry.local_files if p not in in_use)
    kept = sum(p in in_use for p in entry.local_files)
    note = f"{human_size(freed)} freed" + (f", {kept} file(s) kept: another model uses them" if kept else "")
    print(f"deleted {', '.join([entry.name, *aliases])} ({note})")
    return 0


def human_size(size: int) -> str:
    """Decimal units, as `ollama list` prints them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def ago(stamp: str) -> str:
    try:
        then = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    for unit, span in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= span:
            count = int(seconds // span)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "just now"

