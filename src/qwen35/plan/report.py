"""What `qwen35 plan` prints: rich tables for people, one JSON object for tools."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qwen35.plan.advisor import Candidate, Recommendation
from qwen35.plan.estimator import GiB, MiB, Request
from qwen35.plan.hardware import Hardware
from qwen35.plan.speed import ASSUMPTIONS, SPEED_CLASSES, headroom_bytes


def gib(n: int | float | None) -> str:
    """Bytes for people: GiB above 1 GiB, else MiB or KiB (binary units, as nvidia-smi and llama.cpp)."""
    if n is None:
        return "-"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size or unit == "KiB":
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def tok_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


# --- JSON --------------------------------------------------------------------------------


def hardware_json(hardware: Hardware | None) -> dict | None:
    if hardware is None:
        return None
    klass = SPEED_CLASSES[hardware.speed_class]
    return {
        "description": hardware.description,
        "kind": hardware.kind,
        "gpus": hardware.n_gpus,
        "fast_memory_bytes": hardware.fast_bytes,
        "usable_bytes": hardware.fast_bytes - headroom_bytes(hardware.fast_bytes),
        "bandwidth_gbs": hardware.bandwidth_gbs,
        "efficiency": klass.efficiency,
        "layer_cost_us": klass.layer_us,
        "moe_layer_extra_us": klass.moe_layer_us,
        "ram_bytes": hardware.ram_bytes,
        "ram_bandwidth_gbs": hardware.cpu_bandwidth_gbs,
        "source": hardware.source,
        "notes": list(hardware.notes),
    }


def request_json(request: Request) -> dict:
    return {"context": request.ctx, "parallel": request.parallel, "cache_type": request.cache_type,
            "load_mtp": request.load_mtp, "load_vision": request.load_vision, "n_ubatch": request.n_ubatch}


def plan_json(rec: Recommendation, hardware: Hardware, request: Request, min_speed: float) -> dict:
    return {
        "hardware": hardware_json(hardware),
        "request": {**request_json(request), "min_speed_tok_s": min_speed},
        "pick": rec.pick.as_dict() if rec.pick else None,
        "reasons": rec.reasons,
        "alternatives": [c.as_dict() for c in rec.alternatives],
        "not_fitting": [{"model": spec.name, "reason": reason} for spec, reason in rec.rejected],
        "assumptions": list(ASSUMPTIONS),
    }


def model_json(candidate: Candidate, hardware: Hardware | None, source: str, files: list[str] | None = None) -> dict:
    out = candidate.as_dict()
    out["source"] = source
    if files:
        out["files"] = files
    out["hardware"] = hardware_json(hardware)
    out["assumptions"] = list(ASSUMPTIONS)
    return out


# --- people ------------------------------------------------------------------------------


def _hardware_line(hardware: Hardware, request: Request) -> str:
    usable = hardware.fast_bytes - headroom_bytes(hardware.fast_bytes)
    ram = f", {hardware.ram_bytes / GiB:.0f} GiB RAM" if hardware.ram_bytes and hardware.kind == "gpu" else ""
    slots = f" x {request.parallel} sequences" if request.parallel > 1 else ""
    return (f"[bold]{hardware.description}[/] ({hardware.source}): {gib(usable)} usable{ram}; "
            f"context {request.ctx:,}{slots}, {request.cache_type} KV cache")


def _placement_text(c: Candidate) -> str:
    if c.placement is None:
        return "-"
    if c.placement.whole:
        return "fits"
    if c.placement.mode == "none":
        return "too large"
    return c.placement.flag.replace("-ngl 999 ", "")


def render_plan(console: Console, rec: Recommendation, hardware: Hardware, request: Request) -> None:
    console.print(_hardware_line(hardware, request))
    for note in hardware.notes:
        console.print(f"[dim]note: {note}[/]")
    if rec.pick is None:
        console.print("[bold red]Nothing in the Qwen 3.5 family fits here at this context.[/] "
                      "Try a shorter --ctx or a q8_0/q4_0 --cache-type.")
    else:
        pick = rec.pick
        console.print()
        console.print(
            f"[bold green]Run {pick.spec.display_name} at {pick.mix}[/]: {gib(pick.memory.total_bytes)}, "
            f"~{tok_s(pick.decode)} tok/s decode, ~{tok_s(pick.speed.prefill_tok_s)} tok/s prefill"
        )
        console.print(f"  [cyan]{pick.command()}[/]")
        for reason in rec.reasons:
            console.print(f"  - {reason}")
    table = Table(title="Best quant of each size on this machine", title_justify="left")
    for column in ("model", "quant", "memory", "placement", "decode tok/s", "prefill tok/s"):
        table.add_column(column, justify="left" if column in ("model", "quant", "placement") else "right")
    rows = ([rec.pick] if rec.pick else []) + rec.alternatives
    for c in rows:
        style = "bold green" if c is rec.pick else None
        table.add_row(c.spec.display_name, c.mix, gib(c.memory.total_bytes), _placement_text(c), tok_s(c.decode),
                      tok_s(c.speed.prefill_tok_s if c.speed else None), style=style)
    for spec, reason in rec.rejected:
        table.add_row(spec.display_name, "-", "-", reason, "-", "-", style="dim")
    console.print()
    console.print(table)
    _assumptions(console)


def render_model(console: Console, c: Candidate, hardware: Hardware | None, show_tensors: bool = False) -> None:
    m = c.memory
    title = f"{c.spec.display_name}" + (f" {c.mix}" if c.mix else "")
    if hardware is not None:
        console.print(_hardware_line(hardware, Request(m.context, m.parallel, m.cache_type)))
    table = Table(title=f"Memory of {title}", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="left")
    rows = [
        ("weights (text model)", m.weights_bytes, ""),
        ("MTP layer", m.mtp_bytes, "loaded" if m.mtp_loaded else "in the file, not loaded (--mtp)"),
        ("vision projector", m.vision_bytes, "loaded" if m.vision_loaded else "not loaded (--vision)"),
        ("KV cache", m.kv_cache_bytes, f"{m.kv_bytes_per_token_cache / 1024:g} KiB/token x {m.context:,} x {m.parallel}"),
        ("DeltaNet state", m.recurrent_state_bytes, f"{m.recurrent_state_bytes_per_sequence / MiB:.1f} MiB per sequence"),
        ("compute buffers", m.compute_bytes, ""),
        ("logits buffer", m.logits_bytes, "n_vocab x n_ubatch x 4"),
        ("runtime overhead", m.overhead_bytes, ""),
    ]
    for name, value, note in rows:
        table.add_row(name, gib(value), note, style="dim" if note.startswith(("in the file", "not loaded")) else None)
    table.add_row("[bold]total[/]", f"[bold]{gib(m.total_bytes)}[/]", "")
    console.print(table)
    types = Table(title="Text model + MTP by tensor type", title_justify="left")
    types.add_column("type")
    types.add_column("bytes", justify="right")
    types.add_column("share", justify="right")
    by_type = c.weights.by_type()
    all_bytes = sum(by_type.values()) or 1
    for name, value in by_type.items():
        types.add_row(name, gib(value), f"{100 * value / all_bytes:.1f}%")
    console.print(types)
    if show_tensors:
        tensors = Table(title="Tensors", title_justify="left")
        for column in ("name", "shape", "type", "bytes", "part"):
            tensors.add_column(column)
        for t in c.weights.tensors:
            tensors.add_row(t.name, "x".join(map(str, t.shape)), t.type_name, f"{t.nbytes:,}", t.part)
        console.print(tensors)
    share = c.spec.n_experts_used / c.spec.n_experts if c.spec.is_moe else 1.0
    params = c.weights.params(share)
    console.print(f"parameters: {params['total'] / 1e9:.2f} B total (text + vision), "
                  f"{params['active'] / 1e9:.2f} B active per token, MTP {params['mtp'] / 1e9:.2f} B")
    if c.placement is not None:
        if c.speed is None:
            console.print("[bold red]does not fit this machine[/]")
        else:
            console.print(
                f"{_placement_text(c)}: ~{tok_s(c.speed.decode_tok_s)} tok/s decode "
                f"(~{tok_s(c.speed.decode_tok_s_at_context)} with the context full), "
                f"~{tok_s(c.speed.prefill_tok_s)} tok/s prefill"
            )
            console.print(f"  [cyan]{c.command()}[/]")
    _assumptions(console)


def render_rows(console: Console, title: str, rows: list[dict], columns: list[str]) -> None:
    table = Table(title=title, title_justify="left")
    for column in columns:
        header = column.replace("_tok_s", " tok/s").replace("_gib", " GiB").replace("_", " ")
        table.add_column(header, justify="left" if column in columns[:1] else "right", no_wrap=column in columns[:1])
    for row in rows:
        table.add_row(*[_cell(row.get(column)) for column in columns])
    console.print(table)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _assumptions(console: Console) -> None:
    console.print()
    console.print("[dim]assumptions:[/]")
    for line in ASSUMPTIONS:
        console.print(f"[dim]  - {line}[/]")
