"""The guide's three kinds of tables, computed: memory by quant, memory by context, picks by hardware."""

from __future__ import annotations

from dataclasses import replace

from qwen35.plan.advisor import best_for_model, evaluate_catalog, recommend
from qwen35.plan.catalog import ModelSpec, find_model
from qwen35.plan.estimator import GiB, Request
from qwen35.plan.hardware import build_hardware

GUIDE_MODELS = ("27b", "35b-a3b", "122b-a10b")
GUIDE_QUANTS = ("Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
GUIDE_CONTEXTS = (4096, 32768, 131072, 262144)
# The setups of the guide's "pick by VRAM" and "pick by hardware" tables.
GUIDE_HARDWARE = (
    ("RTX 3060 12GB", dict(gpu="3060")),
    ("RTX 4060 Ti 16GB", dict(gpu="4060 ti")),
    ("RTX 3090 24GB", dict(gpu="3090")),
    ("RTX 4090 24GB", dict(gpu="4090")),
    ("RTX 5090 32GB", dict(gpu="5090")),
    ("2x RTX 3090 48GB", dict(gpu="3090", gpus=2)),
    ("RTX 6000 Ada 48GB", dict(gpu="6000 ada")),
    ("Mac M4 Max 64GB", dict(gpu="m4 max 64")),
    ("Mac M4 Max 128GB", dict(gpu="m4 max 128")),
    ("Mac M3 Ultra 256GB", dict(gpu="m3 ultra 256")),
)


def _gib(n: int) -> float:
    return round(n / GiB, 1)


def vram_table(request: Request, models: tuple[ModelSpec, ...] | None = None, quants=GUIDE_QUANTS) -> list[dict]:
    """Total memory (weights + KV + state + buffers + overhead) by model and quant."""
    specs = models or tuple(find_model(m) for m in GUIDE_MODELS)
    rows = []
    for spec in specs:
        row = {"model": spec.display_name}
        for quant in quants:
            row[quant] = _gib(evaluate_catalog(spec, quant, request, None).memory.total_bytes)
        rows.append(row)
    return rows


def context_table(request: Request, quant: str = "Q4_K_M", models: tuple[ModelSpec, ...] | None = None,
                  contexts=GUIDE_CONTEXTS) -> list[dict]:
    specs = models or tuple(find_model(m) for m in GUIDE_MODELS)
    rows = []
    for spec in specs:
        row = {"model": spec.display_name, "quant": quant}
        for ctx in contexts:
            memory = evaluate_catalog(spec, quant, replace(request, ctx=ctx), None).memory
            row[f"{ctx // 1024}K"] = _gib(memory.total_bytes)
        rows.append(row)
    return rows


def picks_table(request: Request, min_speed: float, ram_gb: float | None = None) -> list[dict]:
    """For each of the guide's setups: our pick, and the best quant of the 27B and the 35B-A3B that fits whole."""
    rows = []
    for label, flags in GUIDE_HARDWARE:
        hardware = build_hardware(**flags, ram_gb=ram_gb if flags["gpu"][0] != "m" else None, detect=False)
        hw_request = replace(request, backend=hardware.backend)
        rec = recommend(hardware, hw_request, min_speed)
        row = {"hardware": label}
        if rec.pick:
            row["pick"] = f"{rec.pick.spec.name} {rec.pick.mix}"
            row["memory_gib"] = _gib(rec.pick.memory.total_bytes)
            row["decode_tok_s"] = round(rec.pick.decode, 1)
            row["placement"] = rec.pick.placement.flag if not rec.pick.fits else "fits"
        for name in ("27b", "35b-a3b"):
            best = best_for_model(find_model(name), hw_request, hardware, min_speed)
            fits = best is not None and best.fits
            key = name.replace("-", "_")
            row[f"pick_{key}"] = best.mix if fits else "too large"
            row[f"decode_{key}_tok_s"] = round(best.decode, 1) if fits else None
        rows.append(row)
    return rows


__all__ = ["vram_table", "context_table", "picks_table", "GUIDE_HARDWARE"]
