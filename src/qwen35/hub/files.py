"""Which of a repo's files a pull needs: one quant's GGUF (all its shards) and the mmproj, or a
safetensors checkpoint. Pure: works on the listing (path -> size), never on the network.

GGUF names follow the publishers' convention: the quant is the name's last part,
`Qwen3.5-35B-A3B-Q4_K_M.gguf` (unsloth), `Qwen_Qwen3.5-27B-Q4_K_M.gguf` (bartowski),
`qwen3.5-9b-q8_0.gguf`, with Unsloth's dynamic quants one part longer (`...-UD-Q4_K_XL.gguf`),
split sets as `-00001-of-00003` after it (llama.cpp's gguf-split), sometimes in a folder named
after the quant. So `Q4_K_M` names `X-Q4_K_M.gguf` and not `X-UD-Q4_K_M.gguf`, as on the Hub.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from qwen35.errors import Qwen35Error

DEFAULT_QUANT = "Q4_K_M"  # what `ollama pull` and `llama-server -hf` take when no quant is named
MMPROJ_PREFERENCE = ("F16", "BF16", "F32")  # llama.cpp -hf's order

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")
_DYNAMIC_PREFIXES = ("UD",)  # Unsloth Dynamic: part of the quant's name

# An HF checkpoint's files that loading needs (top level only: no original/, onnx/ ...).
SNAPSHOT_PATTERNS = (
    "config.json", "generation_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
    "processor_config.json", "chat_template.json", "*.jinja", "*.safetensors", "*.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json",
)


class SelectionError(Qwen35Error):
    """The repo does not hold what was asked (a quant, a whole split set, a checkpoint)."""


@dataclass(frozen=True)
class Selection:
    format: str  # "gguf" or "safetensors"
    quant: str | None  # as the file names spell it (upper-cased), None for safetensors
    files: tuple[str, ...]  # repo paths, the first shard first
    mmproj: str | None = None


def is_mmproj(path: str) -> bool:
    return _basename(path).lower().startswith("mmproj") and path.lower().endswith(".gguf")


def model_ggufs(paths) -> list[str]:
    return sorted(p for p in paths if p.lower().endswith(".gguf") and not is_mmproj(p))


def gguf_quant(path: str) -> str:
    """The quant a GGUF's name announces: 'Q4_K_M/X-Q4_K_M-00001-of-00003.gguf' -> 'Q4_K_M'."""
    stem = _split_stem(path)
    parts = re.split(r"[-.]", stem)
    quant = parts[-1].upper()
    if len(parts) > 1 and parts[-2].upper() in _DYNAMIC_PREFIXES:
        quant = f"{parts[-2].upper()}-{quant}"
    return quant


def repo_quants(paths) -> list[str]:
    return sorted({gguf_quant(p) for p in model_ggufs(paths)})


def select_gguf(paths, quant: str, mmproj: bool = True, repo: str = "this repo") -> Selection:
    """The files of `quant` (one file or a complete split set) and, with `mmproj`, the projector."""
    wanted = quant.upper()
    matching = [p for p in model_ggufs(paths) if gguf_quant(p) == wanted]
    if not matching:
        raise SelectionError(f"no {wanted} GGUF in {repo}; it has {', '.join(repo_quants(paths)) or 'none'}")
    groups: dict[str, list[str]] = {}
    for path in matching:
        directory = path.rsplit("/", 1)[0] if "/" in path else ""
        groups.setdefault(f"{directory}/{_split_stem(path)}", []).append(path)
    if len(groups) > 1:
        names = ", ".join(sorted(g[0] for g in groups.values()))
        raise SelectionError(f"several {wanted} models in {repo} ({names}): cannot tell which one to pull")
    files = _complete_set(next(iter(groups.values())))
    return Selection("gguf", wanted, files, choose_mmproj(paths) if mmproj else None)


def choose_mmproj(paths) -> str | None:
    """The vision projector: F16, else BF16, else F32, else the first one."""
    found = sorted(p for p in paths if is_mmproj(p))
    for precision in MMPROJ_PREFERENCE:
        for path in found:
            if gguf_quant(path) == precision:
                return path
    return found[0] if found else None


def select_snapshot(paths, repo: str = "this repo") -> Selection:
    """An HF checkpoint's config, weights, tokenizer and templates."""
    files = sorted(p for p in paths if "/" not in p and any(fnmatch.fnmatchcase(p, pat) for pat in SNAPSHOT_PATTERNS))
    if "config.json" not in files or not any(p.endswith(".safetensors") for p in files):
        raise SelectionError(f"{repo} has neither GGUF files nor a safetensors checkpoint "
                             "(config.json + *.safetensors)")
    return Selection("safetensors", None, tuple(files))


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def _split_stem(path: str) -> str:
    stem = re.sub(r"\.gguf$", "", _basename(path), flags=re.IGNORECASE)
    match = _SPLIT.match(stem)
    return match["stem"] if match else stem


def _complete_set(group: list[str]) -> tuple[str, ...]:
    """One file, or every shard 1..n of a split set in order; a gap is an error, not a partial model."""
    shards = {}
    for path in group:
        match = _SPLIT.match(re.sub(r"\.gguf$", "", _basename(path), flags=re.IGNORECASE))
        if match is None:
            if len(group) > 1:
                raise SelectionError(f"{path} sits beside split shards of the same name: cannot tell which to use")
            return (path,)
        shards[int(match["index"])] = (int(match["count"]), path)
    counts = sorted({count for count, _ in shards.values()})
    stem = _split_stem(sorted(group)[0])
    if len(counts) > 1:
        raise SelectionError(f"split set {stem} is inconsistent: shard counts disagree "
                             f"({', '.join(f'of-{c:05d}' for c in counts)})")
    count = counts[0]
    missing = [i for i in range(1, count + 1) if i not in shards]
    if missing:
        raise SelectionError(f"incomplete split set {stem}: {len(shards)} of {count} shards in the repo "
                             f"(missing {', '.join(f'{i:05d}' for i in missing)})")
    return tuple(shards[i][1] for i in range(1, count + 1))
