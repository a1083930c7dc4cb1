"""From estimates to advice: evaluate a (model, mix) on a machine, and pick what to run.

The pick is the largest model (by quality tier) whose best quant fits the asked
context in fast memory with headroom and decodes at least `min_speed` tokens/s.
Within a tier (27B and 35B-A3B score alike) the faster one wins, which is the MoE
on GPUs. Within a model, the highest quant that fits. Q2_K only when nothing else
fits; partial offload only when nothing fits whole.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from qwen35.plan.catalog import CATALOG, ModelSpec
from qwen35.plan.estimator import GiB, MemoryEstimate, Request, estimate_memory
from qwen35.plan.hardware import Hardware
from qwen35.plan.mixes import MIXES
from qwen35.plan.speed import Placement, SpeedEstimate, estimate_speed, headroom_bytes, place
from qwen35.plan.weights import Weights, predict_weights

# Best first. UD-Q4_K_XL sits above Q4_K_M: a little larger, calibrated.
PICK_MIXES = ("BF16", "Q8_0", "Q6_K", "Q5_K_M", "UD-Q4_K_XL", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
QUANT_CLASS = {"Q3_K_M": 1, "Q3_K_L": 1, "Q3_K_S": 1, "Q2_K": 0}  # everything else: 2 (4 bits and up)
TIER = {"0.8b": 1, "2b": 2, "4b": 3, "9b": 4, "27b": 5, "35b-a3b": 5, "122b-a10b": 6, "397b-a17b": 7}
DEFAULT_MIN_SPEED = 10.0

HF_REPOS = "unsloth/Qwen3.5-{size}-GGUF"


@dataclass
class Candidate:
    spec: ModelSpec
    mix: str | None
    weights: Weights
    memory: MemoryEstimate
    placement: Placement | None
    speed: SpeedEstimate | None
    model_path: str | None = None  # a GGUF on disk, for the command line

    @property
    def runs(self) -> bool:
        return self.placement is not None and self.placement.mode != "none"

    @property
    def fits(self) -> bool:
        return self.placement is not None and self.placement.whole

    @property
    def quant_class(self) -> int:
        return QUANT_CLASS.get(self.mix or "", 2)

    @property
    def decode(self) -> float:
        return self.speed.decode_tok_s if self.speed else 0.0

    def command(self) -> str:
        """The qwen35 command line that serves this candidate (llama.cpp's flag spellings)."""
        size = self.spec.name.upper()
        where = ""
        if self.model_path:
            source = str(self.model_path)
        elif self.mix and self.spec.name in TIER:
            # The tag `qwen35 pull` takes (serve pulls it on first use); where it downloads from follows.
            source = f"qwen3.5:{self.spec.name}-{self.mix.lower()}"
            where = f"  # from hf.co/{HF_REPOS.format(size=size)}"
        else:
            source = "MODEL.gguf"
        parts = ["qwen35 serve", source, f"-c {self.memory.context * self.memory.parallel}"]
        if self.memory.parallel > 1:
            parts.append(f"-np {self.memory.parallel}")
        if self.placement is not None and self.placement.flag:
            parts.append(self.placement.flag)
        if self.memory.cache_type != "f16":
            parts.append(f"-ctk {self.memory.cache_type} -ctv {self.memory.cache_type}")
        if self.memory.mtp_loaded:  # the MTP layer is loaded to guess tokens: speculative decoding with it
            parts.append("--spec-type draft-mtp")
        return " ".join(parts) + where

    def as_dict(self) -> dict:
        share = self.spec.n_experts_used / self.spec.n_experts if self.spec.is_moe else 1.0
        params = self.weights.params(share)
        out = {
            "model": self.spec.name,
            "display_name": self.spec.display_name,
            "quant": self.mix,
            "moe": self.spec.is_moe,
            **self.memory.as_dict(),
            "params_total": params["total"],
            "params_active": int(params["active"]),
            "params_mtp": params["mtp"],
            "params_vision": params["vision"],
            "decode_tok_s": round(self.speed.decode_tok_s, 1) if self.speed else None,
            "decode_tok_s_at_context": round(self.speed.decode_tok_s_at_context, 1) if self.speed else None,
            "prefill_tok_s": round(self.speed.prefill_tok_s) if self.speed else None,
            "bytes_read_per_token": self.speed.bytes_per_token if self.speed else None,
            "fits": self.fits if self.placement else None,
            "placement": None,
            "command": self.command(),
            "tensor_types": self.weights.by_type(),
        }
        if self.placement is not None:
            out["placement"] = {
                "mode": self.placement.mode,
                "llama_cpp_flags": self.placement.flag,
                "gpu_layers": self.placement.gpu_layers,
                "cpu_moe_layers": self.placement.cpu_moe_layers,
                "fast_memory_bytes": self.placement.fast_bytes_used,
                "ram_bytes": self.placement.ram_bytes_used,
            }
        return out


@functools.lru_cache(maxsize=256)
def catalog_weights(spec: ModelSpec, mix: str) -> Weights:
    return predict_weights(spec, MIXES[mix])


def evaluate(spec: ModelSpec, weights: Weights, mix: str | None, request: Request, hardware: Hardware | None) -> Candidate:
    memory = estimate_memory(spec, weights, request)
    if hardware is None:
        return Candidate(spec, mix, weights, memory, None, None)
    placement = place(spec, weights, memory, hardware)
    speed = estimate_speed(spec, weights, memory, hardware, placement)
    return Candidate(spec, mix, weights, memory, placement, speed)


def evaluate_catalog(spec: ModelSpec, mix: str, request: Request, hardware: Hardware | None) -> Candidate:
    return evaluate(spec, catalog_weights(spec, mix), mix, request, hardware)


def _model_key(c: Candidate, min_speed: float):
    return (c.quant_class >= 1, c.decode >= min_speed, c.fits, -PICK_MIXES.index(c.mix))


def _overall_key(c: Candidate, min_speed: float):
    return (c.quant_class >= 1, c.decode >= min_speed, c.fits, TIER.get(c.spec.name, 0), c.quant_class, c.decode)


def best_for_model(spec: ModelSpec, request: Request, hardware: Hardware, min_speed: float) -> Candidate | None:
    runnable = [c for c in (evaluate_catalog(spec, mix, request, hardware) for mix in PICK_MIXES) if c.runs]
    return max(runnable, key=lambda c: _model_key(c, min_speed)) if runnable else None


@dataclass
class Recommendation:
    pick: Candidate | None
    alternatives: list[Candidate]
    reasons: list[str]
    rejected: list[tuple[ModelSpec, str]] = field(default_factory=list)


def recommend(hardware: Hardware, request: Request, min_speed: float = DEFAULT_MIN_SPEED,
              models: tuple[ModelSpec, ...] = CATALOG) -> Recommendation:
    request.validate()
    per_model: list[Candidate] = []
    rejected: list[tuple[ModelSpec, str]] = []
    for spec in models:
        best = best_for_model(spec, request, hardware, min_speed)
        if best is None:
            smallest = evaluate_catalog(spec, PICK_MIXES[-1], request, None)
            rejected.append((spec, f"too large: {smallest.memory.total_bytes / GiB:.1f} GiB at {PICK_MIXES[-1]}"))
        else:
            per_model.append(best)
    if not per_model:
        return Recommendation(None, [], ["nothing in the family fits this machine at this context"], rejected)
    ranked = sorted(per_model, key=lambda c: _overall_key(c, min_speed), reverse=True)
    pick = ranked[0]
    return Recommendation(pick, ranked[1:], _reasons(pick, ranked, hardware, request, min_speed), rejected)


def _reasons(pick: Candidate, ranked: list[Candidate], hardware: Hardware, request: Request, min_speed: float) -> list[str]:
    usable = hardware.fast_bytes - headroom_bytes(hardware.fast_bytes)
    where = {"gpu": "VRAM", "apple": "unified memory the GPU may use", "cpu": "RAM"}[hardware.kind]
    reasons = []
    if pick.fits:
        reasons.append(
            f"largest model that fits whole: {pick.placement.fast_bytes_used / GiB:.1f} GiB of {usable / GiB:.1f} GiB "
            f"usable {where} (keeping {headroom_bytes(hardware.fast_bytes) / GiB:.1f} GiB free) "
            f"at {request.ctx:,} tokens of context"
        )
    else:
        reasons.append(f"nothing this good fits whole in {where}; {pick.placement.flag} keeps part in system RAM")
    if pick.mix != PICK_MIXES[0]:
        better = PICK_MIXES[PICK_MIXES.index(pick.mix) - 1]
        reasons.append(f"{pick.mix} is the highest quant of {pick.spec.display_name} that fits ({better} does not)")
    same_tier = [c for c in ranked[1:] if TIER.get(c.spec.name) == TIER.get(pick.spec.name) and c.runs]
    for other in same_tier:
        if pick.spec.is_moe and not other.spec.is_moe:
            reasons.append(
                f"MoE over dense of similar quality: ~{pick.decode:.0f} tok/s vs ~{other.decode:.0f} for "
                f"{other.spec.display_name} {other.mix}"
            )
        elif other.spec.is_moe and not pick.spec.is_moe:
            reasons.append(
                f"{pick.spec.display_name} over {other.spec.display_name}: {other.mix} of the MoE "
                f"{'runs only partly offloaded' if not other.fits else 'is a weaker quant or slower here'}"
            )
    if pick.decode < min_speed:
        reasons.append(f"nothing runs at {min_speed:g} tok/s or more here; this is the fastest usable option")
    bigger = [c for c in ranked[1:] if TIER.get(c.spec.name, 0) > TIER.get(pick.spec.name, 0)]
    for other in bigger[:1]:
        if other.quant_class < 1:
            why = f"only at {other.mix}, too lossy to recommend"
        elif not other.fits:
            why = f"only partly offloaded ({other.placement.flag}), at ~{other.decode:.1f} tok/s"
        else:
            why = f"at ~{other.decode:.1f} tok/s, below {min_speed:g} tok/s"
        reasons.append(f"{other.spec.display_name} would run {why}")
    return reasons
