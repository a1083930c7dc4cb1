"""`qwen35 pull`: list a repo at one commit, choose its files, download them into the HF cache.

huggingface_hub does the transfers (its cache layout shared with huggingface-cli, resumed
downloads after a dropped connection, progress bars, HF_TOKEN / `huggingface-cli login`).
HF_ENDPOINT, HF_HOME and HF_HUB_CACHE are read when a pull runs, not when huggingface_hub was
imported, so one process can point at different hubs and caches.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from qwen35.errors import Qwen35Error
from qwen35.hub.files import DEFAULT_QUANT, Selection, SelectionError, model_ggufs, repo_quants, select_gguf, \
    select_snapshot
from qwen35.hub.manifest import Entry, Manifest
from qwen35.hub.tags import ACCEPTED_FORMS, ModelRef, ModelRefError, parse_model_ref

DEFAULT_ENDPOINT = "https://huggingface.co"
GiB = 1024**3


class HubError(Qwen35Error):
    """The hub could not be reached, refused us, or does not have the repo or file."""


class DiskSpaceError(Qwen35Error):
    """The files will not fit where the HF cache lives."""


@dataclass(frozen=True)
class RepoListing:
    repo: str
    revision: str  # commit sha
    sizes: dict[str, int]  # repo path -> bytes


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a GGUF's first shard, or an HF snapshot directory
    mmproj: Path | None
    name: str


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    """huggingface_hub's own precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG."""
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    home = env.get("HF_HOME") or os.path.join(xdg, "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache)))


def is_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any((flag or "").strip().upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


@contextmanager
def hub_errors(endpoint: str, repo: str, filename: str | None = None):
    """huggingface_hub's and httpx's exceptions as one readable line each."""
    import httpx2
    from huggingface_hub import errors as hf

    login = "log in with `huggingface-cli login` or set HF_TOKEN"
    try:
        yield
    except hf.OfflineModeIsEnabled as error:
        raise HubError(f"cannot download {repo}: offline mode is on (HF_HUB_OFFLINE)") from error
    except hf.GatedRepoError as error:
        raise HubError(f"{repo} is gated: accept its terms at {endpoint}/{repo}, then {login}") from error
    except hf.RepositoryNotFoundError as error:
        raise HubError(f"repository {repo} not found on {endpoint} (if it is private, {login})") from error
    except hf.RevisionNotFoundError as error:
        raise HubError(f"{repo} has no such revision on {endpoint}") from error
    except hf.RemoteEntryNotFoundError as error:
        raise HubError(f"{filename} is no longer in {repo} on {endpoint}: pull again") from error
    except hf.LocalEntryNotFoundError as error:  # the HEAD before a download failed, nothing cached
        raise HubError(f"cannot reach {endpoint}: {_reason(error.__cause__ or error)} "
                       "(set HF_ENDPOINT for a mirror)") from error
    except hf.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        if status == 401:
            raise HubError(f"{endpoint} asks for a login to read {repo} (401): {login}") from error
        if status == 403:
            raise HubError(f"{endpoint} refuses access to {repo} (403): check your token's permissions, "
                           f"or {login}") from error
        raise HubError(f"{endpoint} answered HTTP {status} for {repo}: try again later") from error
    except httpx2.TransportError as error:
        raise HubError(f"cannot reach {endpoint}: {_reason(error)} (set HF_ENDPOINT for a mirror)") from error
    except (OSError, hf.XetDownloadError) as error:  # a size check after the transfer, a full disk
        raise HubError(f"downloading {filename or repo} failed: {_reason(error)}") from error
    except ValueError as error:  # huggingface_hub refusing what a hub sent: a file name with '..' or absolute
        raise HubError(f"{repo} on {endpoint}: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def list_repo(repo: str, *, endpoint: str, revision: str = "main") -> RepoListing:
    """The repo's files and sizes at one commit (one request: the model info with blobs)."""
    from huggingface_hub import HfApi

    with hub_errors(endpoint, repo):
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    if not info.sha:
        raise HubError(f"{endpoint} did not say which commit of {repo} it lists")
    return RepoListing(repo, info.sha, {s.rfilename: int(s.size or 0) for s in info.siblings or ()})


# --- what to download ----------------------------------------------------------------------------


def machine_hardware():
    """This machine, detected as `qwen35 plan` does with no flags (tests replace it)."""
    from qwen35.plan.hardware import build_hardware

    return build_hardware(detect=True)


def planner_quant(size: str) -> str | None:
    """The planner's best quant of one size for this machine, if any runs here."""
    from qwen35.plan import advisor
    from qwen35.plan.catalog import find_model
    from qwen35.plan.estimator import Request

    try:
        hardware = machine_hardware()
    except Qwen35Error:
        return None  # nothing detected: fall back to the usual default quant
    best = advisor.best_for_model(find_model(size), Request(), hardware, advisor.DEFAULT_MIN_SPEED)
    return best.mix if best else None


def planner_pick() -> tuple[str, str]:
    """`qwen3.5` alone: the size and quant `qwen35 plan` picks for this machine."""
    from qwen35.plan import advisor
    from qwen35.plan.estimator import Request

    hardware = machine_hardware()
    recommendation = advisor.recommend(hardware, Request())
    if recommendation.pick is None or recommendation.pick.mix is None:
        raise Qwen35Error(f"no Qwen 3.5 model fits this machine ({hardware.description}): "
                          "name one, e.g. qwen3.5:0.8b, or see `qwen35 plan`")
    return recommendation.pick.spec.name, recommendation.pick.mix


def choose_files(ref: ModelRef, listing: RepoListing, *, mmproj: bool = True,
                 announce: Callable[[str], None] | None = None) -> Selection:
    ggufs = model_ggufs(listing.sizes)
    if ref.format == "safetensors" or (not ggufs and ref.format is None and ref.quant is None):
        return select_snapshot(listing.sizes, listing.repo)
    if not ggufs:
        raise SelectionError(f"{listing.repo} has no GGUF files" +
                             (" (it is an HF checkpoint: pull it without a quant)" if ref.quant else ""))
    if ref.quant is not None:
        return select_gguf(listing.sizes, ref.quant, mmproj, listing.repo)
    quant, why = default_quant(ref, listing)
    if announce is not None:
        announce(f"{ref.text}: no quant named, taking {quant} ({why})")
    return select_gguf(listing.sizes, quant, mmproj, listing.repo)


def default_quant(ref: ModelRef, listing: RepoListing) -> tuple[str, str]:
    """No quant named: the planner's for a family size, else Q4_K_M, else a repo's only quant; and why."""
    have = repo_quants(listing.sizes)
    best = planner_quant(ref.size) if ref.size is not None else None
    if best is not None and best.upper() in have:
        return best.upper(), "the planner's best for this machine"
    if DEFAULT_QUANT in have:
        reason = f"the planner's {best} is not in {listing.repo}" if best else "the usual default"
        return DEFAULT_QUANT, reason
    if not ref.is_family and len(have) == 1:
        return have[0], f"the only quant in {listing.repo}"
    example = f"{ref.name}-{have[0].lower()}" if ref.is_family else f"{listing.repo}:{have[0]}"
    raise SelectionError(f"{listing.repo} has no {DEFAULT_QUANT}: name one of its quants, "
                         f"{', '.join(have)} (e.g. {example})")


def missing_bytes(listing: RepoListing, paths, cache_dir: Path) -> int:
    from huggingface_hub import try_to_load_from_cache

    return sum(listing.sizes.get(p, 0) for p in paths
               if not isinstance(try_to_load_from_cache(listing.repo, p, cache_dir=cache_dir,
                                                        revision=listing.revision), str))


def check_disk_space(needed: int, cache_dir: Path) -> None:
    where = cache_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DiskSpaceError(f"not enough disk space in {cache_dir}: the download needs {needed / GiB:.2f} GiB, "
                             f"{free / GiB:.2f} GiB are free (free some space or set HF_HUB_CACHE to a larger disk)")


def download(listing: RepoListing, paths, *, cache_dir: Path, endpoint: str) -> list[Path]:
    from huggingface_hub import hf_hub_download

    local = []
    for path in paths:
        with hub_errors(endpoint, listing.repo, path):
            local.append(Path(hf_hub_download(listing.repo, path, revision=listing.revision,
                                              cache_dir=cache_dir, endpoint=endpoint)))
    return local


def record_branch(listing: RepoListing, cache_dir: Path, branch: str = "main") -> None:
    """Write the cache's `refs/{branch}` -> commit, as huggingface_hub does when it resolves a branch
    itself: other tools reading the cache offline (transformers, huggingface-cli) then find the files
    we fetched by commit."""
    from huggingface_hub.file_download import repo_folder_name

    ref = cache_dir / repo_folder_name(repo_id=listing.repo, repo_type="model") / "refs" / branch
    if ref.is_file() and ref.read_text() == listing.revision:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{branch}.", dir=ref.parent)
    with os.fdopen(fd, "w") as out:
        out.write(listing.revision)
    os.replace(tmp, ref)


# --- pull and resolve ----------------------------------------------------------------------------


def pull(model: str | ModelRef, *, quant: str | None = None, format: str | None = None, mmproj: bool = True,
         cache_dir: str | Path | None = None, endpoint: str | None = None,
         announce: Callable[[str], None] | None = None) -> Entry:
    """Download a model by tag or repo into the HF cache and record it in the manifest.

    `announce` hears the choices made for the caller (the planner's pick, a default quant)."""
    say = announce or (lambda message: None)
    given = parse_model_ref(model) if isinstance(model, str) else model
    ref = given.with_options(quant=quant, format=format)
    endpoint = (endpoint or hub_endpoint()).rstrip("/")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache_dir()
    if is_offline():
        raise HubError(f"cannot pull {ref.text}: offline mode is on (HF_HUB_OFFLINE); unset it to download")
    if ref.pick:
        size, quant_picked = planner_pick()  # that quant is the planner's best for the size: default_quant finds it
        ref = replace(ref, text=f"qwen3.5:{size}", size=size, pick=False)
        say(f"{given.text}: the planner's pick for this machine is {ref.text} at {quant_picked}")
    listing = list_repo(ref.hub_repo, endpoint=endpoint)
    selection = choose_files(ref, listing, mmproj=mmproj, announce=say)
    wanted = list(selection.files) + ([selection.mmproj] if selection.mmproj else [])
    with hub_errors(endpoint, listing.repo):  # the cache lookup refuses a name escaping the cache
        missing = missing_bytes(listing, wanted, cache)
    check_disk_space(missing, cache)
    local = download(listing, wanted, cache_dir=cache, endpoint=endpoint)
    record_branch(listing, cache)

    if selection.format == "safetensors":
        chosen = replace(ref, quant=None, format="safetensors")
        files, mmproj_path, path = local, None, local[0].parent
    else:
        chosen = replace(ref, quant=selection.quant, format="gguf")
        files = local[:len(selection.files)]
        mmproj_path = local[-1] if selection.mmproj else None
        path = files[0]
    entry = Entry(name=chosen.name, repo=listing.repo, revision=listing.revision, format=selection.format,
                  quant=selection.quant, files=[str(p) for p in files], path=str(path),
                  mmproj=str(mmproj_path) if mmproj_path else None,
                  size=sum(listing.sizes.get(p, 0) for p in wanted),
                  pulled_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    # A tag without a quant names what it resolved to, as Ollama's short tags do.
    aliases = (given.name,) if given.name != entry.name and selection.format == "gguf" and given.quant is None \
        and quant is None else ()
    with Manifest.editing() as manifest:
        manifest.add(entry, aliases)
    return entry


def lookup_name(text: str) -> str:
    """The manifest name a reference is stored under (parses, but does not touch the network)."""
    return parse_model_ref(text).name


def looks_like_a_path(text: str) -> bool:
    """A file name or a path as people type them, never a tag or a repo: ./x, ~/x, /x, x.gguf, a\\b."""
    return (text.startswith(("/", "./", "../", "~")) or "\\" in text
            or text.lower().endswith((".gguf", ".safetensors", ".json")))


def resolve_model(text: str, *, pull_if_missing: bool = True,
                  announce: Callable[[str], None] | None = None) -> ResolvedModel:
    """A model for run/serve/bench: a path on disk, a pulled name, or a name to pull now (like `ollama run`).

    `announce` hears that a pull starts and the choices it makes."""
    local = Path(text).expanduser()
    if local.exists():
        return ResolvedModel(local, None, local.name.removesuffix(".gguf"))  # what clients and prompts call it
    if looks_like_a_path(text):  # a mistyped path must not turn into a download
        raise Qwen35Error(f"no model at {text}: no such file or directory")
    try:
        name = lookup_name(text)
    except ModelRefError as error:
        raise ModelRefError(f"{text!r} is neither a file nor a model name: give a path or {ACCEPTED_FORMS}") from error
    entry = Manifest.load().get(name)
    if entry is not None and entry.is_complete():
        return ResolvedModel(Path(entry.path), Path(entry.mmproj) if entry.mmproj else None, entry.name)
    state = "is not complete on disk" if entry is not None else "is not pulled"
    if is_offline():
        raise HubError(f"{name} {state} and offline mode is on (HF_HUB_OFFLINE): "
                       f"run `qwen35 pull {text}` while online")
    if not pull_if_missing:
        raise Qwen35Error(f"{name} {state}: run `qwen35 pull {text}`")
    if announce is not None:
        announce(f"{name} {state}: pulling it")
    entry = pull(text, announce=announce)
    return ResolvedModel(Path(entry.path), Path(entry.mmproj) if entry.mmproj else None, entry.name)


def resolve_model_argument(text: str, command: str) -> ResolvedModel:
    """MODEL of run, serve and bench: resolve_model, with a pull's progress announced on stderr."""
    return resolve_model(text, announce=lambda message: print(f"{command}: {message}", file=sys.stderr, flush=True))
