"""What `qwen35 pull` fetched: `$QWEN35_HOME/models.json` (default ~/.cache/qwen35).

The files themselves stay in the Hugging Face cache, shared with huggingface-cli and other tools;
the manifest maps our names to them. Short tags (`qwen3.5:35b-a3b`, a repo pulled without a quant)
are aliases of the full name, as Ollama's tags are.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen35.errors import Qwen35Error

VERSION = 1


def qwen35_home() -> Path:
    return Path(os.environ.get("QWEN35_HOME") or Path.home() / ".cache" / "qwen35").expanduser()


def manifest_path() -> Path:
    return qwen35_home() / "models.json"


@dataclass
class Entry:
    name: str
    repo: str
    revision: str  # the commit sha every file was downloaded at
    format: str  # "gguf" or "safetensors"
    quant: str | None
    files: list[str]  # local paths, the model's first shard first (safetensors: the snapshot's files)
    path: str  # what to load: the first shard, or the snapshot directory
    mmproj: str | None
    size: int  # bytes, mmproj included
    pulled_at: str  # ISO 8601, UTC

    @property
    def local_files(self) -> list[Path]:
        return [Path(p) for p in self.files] + ([Path(self.mmproj)] if self.mmproj else [])

    def is_complete(self) -> bool:
        return all(p.is_file() for p in self.local_files)


@dataclass
class Manifest:
    path: Path
    models: dict[str, Entry] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # short name -> full name

    @classmethod
    def load(cls, path: Path | None = None) -> Manifest:
        path = path or manifest_path()
        if not path.exists():
            return cls(path)
        try:
            data = json.loads(path.read_text())
            models = {name: Entry(**fields) for name, fields in data.get("models", {}).items()}
            aliases = {str(k): str(v) for k, v in data.get("aliases", {}).items() if v in models}
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise Qwen35Error(f"cannot read the model list {path}: {error} (remove it to start afresh)") from error
        return cls(path, models, aliases)

    @classmethod
    @contextmanager
    def editing(cls, path: Path | None = None) -> Iterator[Manifest]:
        """Load, change, save under a lock, so two pulls at once do not lose each other's entry."""
        from filelock import FileLock, Timeout

        path = path or manifest_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(f"{path}.lock", timeout=60):
                manifest = cls.load(path)
                yield manifest
                manifest.save()
        except Timeout as error:
            raise Qwen35Error(f"the model list {path} stayed locked for a minute: is another qwen35 stuck?") from error

    def save(self) -> None:
        """Atomically: another process reading the list sees the old one or the new one, never half."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": VERSION, "models": {n: asdict(e) for n, e in sorted(self.models.items())},
                   "aliases": dict(sorted(self.aliases.items()))}
        fd, tmp = tempfile.mkstemp(prefix=".models.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(payload, out, indent=2)
                out.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, name: str) -> Entry | None:
        return self.models.get(self.aliases.get(name, name))

    def add(self, entry: Entry, aliases: tuple[str, ...] = ()) -> None:
        self.models[entry.name] = entry
        self.aliases.pop(entry.name, None)
        for alias in aliases:
            if alias != entry.name:
                self.models.pop(alias, None)
                self.aliases[alias] = entry.name

    def remove(self, name: str) -> tuple[Entry, list[str]]:
        """Drop a model (by its name or an alias) and every alias of it; returns it and the aliases."""
        entry = self.get(name)
        if entry is None:
            raise Qwen35Error(f"no model named {name!r}: `qwen35 list` shows what is pulled")
        del self.models[entry.name]
        dropped = sorted(a for a, target in self.aliases.items() if target == entry.name)
        for alias in dropped:
            del self.aliases[alias]
        return entry, dropped

    def files_in_use(self) -> set[Path]:
        return {p for e in self.models.values() for p in e.local_files}


def delete_cached_file(path: Path) -> int:
    """Remove a file a pull put in the HF cache: its snapshot link and, if no other snapshot links
    to it, the blob. Returns the bytes freed. Paths outside an HF cache layout are left alone."""
    parts = path.parts
    if "snapshots" not in parts or not any(p.startswith(("models--", "datasets--")) for p in parts):
        return 0
    repo_dir = Path(*parts[:parts.index("snapshots")])
    if not path.is_symlink():  # caches on file systems without symlinks hold copies
        size = path.stat().st_size if path.exists() else 0
        path.unlink(missing_ok=True)
        _prune_empty(path.parent, repo_dir / "snapshots")
        return size
    blob = path.resolve()
    path.unlink()
    _prune_empty(path.parent, repo_dir / "snapshots")
    still_linked = any(link.is_symlink() and link.resolve() == blob for link in (repo_dir / "snapshots").rglob("*"))
    if still_linked or not blob.is_file():
        return 0
    size = blob.stat().st_size
    blob.unlink()
    return size


def _prune_empty(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent
