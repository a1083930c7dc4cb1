"""Model references as people type them: Ollama-style family tags and llama.cpp-style hub repos.

    qwen3.5:35b-a3b, qwen3.5:27b-q8_0, qwen3.5:27b-ud-q4_k_xl, qwen3.5:9b-fp16, qwen3.5[:latest]
    owner/name, owner/name:Q4_K_M, hf.co/owner/name[:QUANT], https://huggingface.co/owner/name

Pure parsing: no network, no hardware. What `qwen3.5` alone means on this machine (the planner's
pick) and which files a quant names are decided in pull.py and files.py.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, replace

from qwen35.errors import Qwen35Error, UnknownNameError

FAMILY = "qwen3.5"
FORMATS = ("gguf", "safetensors")
SAFETENSORS_REPOS = "Qwen/Qwen3.5-{size}"  # the official bf16 checkpoints

ACCEPTED_FORMS = (
    "qwen3.5[:latest], qwen3.5:SIZE[-QUANT] (e.g. qwen3.5:35b-a3b, qwen3.5:27b-q8_0), "
    "owner/name[:QUANT], hf.co/owner/name[:QUANT] or https://huggingface.co/owner/name"
)

# Hub rules for a repo id part: letters, digits, '-', '_', '.', not starting or ending with '-'
# or '.', no '--' or '..' (huggingface_hub's validate_repo_id), at most 96 characters.
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?")
_QUANT_TEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SIZE = re.compile(r"(?P<size>\d+(?:\.\d+)?b(?:-a\d+(?:\.\d+)?b)?)(?:-(?P<quant>.+))?")
_HUB_PREFIX = re.compile(r"^(?:https?://)?(?:www\.)?(?:hf\.co|huggingface\.co)/", re.IGNORECASE)


class ModelRefError(Qwen35Error):
    """Text that is not a model reference we understand."""


@dataclass(frozen=True)
class ModelRef:
    """What to pull. Exactly one of `size` (a family tag), `repo` (a hub repo) or `pick` is set.

    `quant` is a canonical mix name (Q4_K_M, UD-Q4_K_XL, F16 ...) for family tags and the text as
    given, upper-cased, for repos (a repo may hold quants we have no table for). `format` is None
    when the repo's files decide (GGUF if it has any).
    """

    text: str
    size: str | None = None  # catalog name: "35b-a3b"
    repo: str | None = None  # "owner/name"
    quant: str | None = None
    format: str | None = None
    pick: bool = False  # "qwen3.5" / "qwen3.5:latest": the planner's pick for this machine

    @property
    def is_family(self) -> bool:
        return self.size is not None or self.pick

    @property
    def hub_repo(self) -> str:
        """The repo to list; a family tag's depends on the format."""
        if self.repo is not None:
            return self.repo
        if self.size is None:
            raise Qwen35Error("the planner's pick has no repo until a size is chosen")
        if self.format == "safetensors":
            return SAFETENSORS_REPOS.format(size=self.size.upper())
        from qwen35.plan.advisor import HF_REPOS

        return HF_REPOS.format(size=self.size.upper())

    @property
    def name(self) -> str:
        """The manifest name: qwen3.5:35b-a3b-q4_k_m, qwen3.5:35b-a3b, owner/name:Q4_K_M, owner/name."""
        if self.pick:
            return f"{FAMILY}:latest"
        if self.size is not None and self.format != "safetensors":
            return f"{FAMILY}:{self.size}" + (f"-{self.quant.lower()}" if self.quant else "")
        base = self.hub_repo
        return f"{base}:{self.quant}" if self.quant and self.format != "safetensors" else base

    def with_options(self, quant: str | None = None, format: str | None = None) -> ModelRef:
        """Apply --quant / --format; a quant given twice must agree."""
        ref = self
        if format is not None:
            if format not in FORMATS:
                raise ModelRefError(f"unknown format {format!r}: use gguf or safetensors")
            ref = replace(ref, format=format)
        if quant is not None:
            canonical = family_quant(quant) if ref.is_family else repo_quant(quant)
            if ref.quant is not None and ref.quant != canonical:
                raise ModelRefError(f"{ref.text!r} names quant {ref.quant} but --quant says {canonical}")
            ref = replace(ref, quant=canonical)
        if ref.format == "safetensors" and ref.quant is not None:
            raise ModelRefError(f"safetensors checkpoints are not quantized: drop the quant {ref.quant} "
                                "or use --format gguf")
        return ref


def family_quant(text: str) -> str:
    """A mix name as the planner knows it, strictly: 'q4_k_m' -> Q4_K_M, 'fp16' -> F16, 'ud-q4_k_xl'."""
    from qwen35.plan.advisor import PICK_MIXES
    from qwen35.plan.mixes import MIXES

    known = list(MIXES) + [m for m in PICK_MIXES if m not in MIXES]
    by_key = {name.replace("_", "-"): name for name in known}
    key = text.strip().upper().replace("_", "-")
    if key == "FP16":
        return "F16"
    if key in by_key:
        return by_key[key]
    close = difflib.get_close_matches(key, list(by_key), n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(by_key[c] for c in close)}? " if close else ""
    raise UnknownNameError(f"unknown quant {text!r}: {hint}known: {', '.join(known)}")


def repo_quant(text: str) -> str:
    """Any quant a repo may publish (IQ2_XXS, Q4_K_XL, MXFP4_MOE ...), matched case-insensitively."""
    if not _QUANT_TEXT.fullmatch(text.strip()):
        raise ModelRefError(f"not a quant name: {text!r} (e.g. Q4_K_M, Q8_0, UD-Q4_K_XL)")
    return text.strip().upper()


def parse_model_ref(text: str) -> ModelRef:
    """A ModelRef from a tag or a repo reference; ModelRefError / UnknownNameError say what is wrong."""
    raw = text.strip()
    if not raw:
        raise ModelRefError(f"empty model name: use {ACCEPTED_FORMS}")
    lowered = raw.lower()
    if lowered == FAMILY or lowered.startswith(FAMILY + ":"):
        return _parse_family(raw, lowered[len(FAMILY) + 1:])
    hub = _HUB_PREFIX.sub("", raw, count=1)
    from_url = hub != raw
    if not from_url and "://" in raw:
        raise ModelRefError(f"not a Hugging Face address: {raw!r}: use https://huggingface.co/owner/name "
                            "(HF_ENDPOINT points at a mirror)")
    if from_url:
        hub = re.sub(r"/+$", "", hub)
    if "/" in hub:
        return _parse_repo(raw, hub, from_url)
    raise ModelRefError(f"not a model name: {raw!r}: use {ACCEPTED_FORMS}")


def _parse_family(raw: str, tag: str) -> ModelRef:
    from qwen35.plan.catalog import find_model

    if tag in ("", "latest"):
        return ModelRef(raw, pick=True)
    match = _SIZE.fullmatch(tag)
    if match is None:
        # Let the catalog name the sizes it has; a tag with no size at all lands here too.
        find_model(tag.split("-")[0] or tag)
        raise ModelRefError(f"not a model tag: {raw!r}: use qwen3.5:SIZE[-QUANT], e.g. qwen3.5:35b-a3b-q4_k_m")
    spec = find_model(match["size"])
    quant = family_quant(match["quant"]) if match["quant"] else None
    return ModelRef(raw, size=spec.name, quant=quant)


def _parse_repo(raw: str, text: str, from_url: bool) -> ModelRef:
    repo, _, quant = text.partition(":")
    if from_url and "/" in repo:
        # huggingface.co/owner/name/tree/main or .../blob/main/file: the repo is the first two parts
        repo = "/".join(repo.split("/")[:2]) if re.search(r"/(tree|blob|resolve)/", repo) else repo
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or "--" in repo or ".." in repo:
        raise ModelRefError(
            f"not a hub repo id: {repo!r} in {raw!r}: owner/name, each part letters, digits, '-', '_' or '.' "
            "(no '--' or '..', not starting or ending with '-' or '.', at most 96 characters)"
        )
    if quant.lower() in ("", "latest"):
        return ModelRef(raw, repo=repo)
    return ModelRef(raw, repo=repo, quant=repo_quant(quant))
