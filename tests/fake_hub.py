"""A small Hugging Face Hub for tests: the endpoints huggingface_hub 2.4 calls to list and download.

- `GET /api/models/{repo}[/revision/{rev}]?blobs=True` (`HfApi.model_info(files_metadata=True)`): the
  repo's commit sha and its files with sizes.
- `HEAD` / `GET /{repo}/resolve/{rev}/{path}` (`hf_hub_download`): `X-Repo-Commit`, `ETag` and
  `Content-Length` on both; `Range: bytes=N-` answered with 206 and `Content-Range`. No `X-Xet-*`
  headers, so the client downloads over plain HTTP.
- Errors as the Hub writes them: 404 + `X-Error-Code: RepoNotFound` / `RevisionNotFound` /
  `EntryNotFound`, and 401 + `GatedRepo` for a gated repo asked without a token.

Every request is recorded (method, path, Range header) so tests can count downloads, and a file can
be set to drop its connection part-way through once, to exercise resuming.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeFile:
    data: bytes
    sha256: str = ""

    def __post_init__(self):
        self.sha256 = hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeRepo:
    files: dict[str, FakeFile]
    sha: str
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    # (repo, path) -> bytes to send before dropping the connection, once
    drops: dict[tuple[str, str], int] = field(default_factory=dict)
    token: str = "hf_test_token"
    _server: ThreadingHTTPServer | None = None

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path], gated: bool = False) -> FakeRepo:
        contents = {path: FakeFile(src.read_bytes() if isinstance(src, Path) else src) for path, src in files.items()}
        sha = hashlib.sha1(repo_id.encode() + b"".join(f.sha256.encode() for f in contents.values())).hexdigest()
        self.repos[repo_id] = FakeRepo(contents, sha, gated)
        return self.repos[repo_id]

    def downloads(self, repo_id: str | None = None) -> list[Request]:
        """The GETs of file contents (not listings), optionally of one repo."""
        prefix = f"/{repo_id}/resolve/" if repo_id else None
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path
                and (prefix is None or r.path.startswith(prefix))]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self._handle(body=True)

    def do_HEAD(self):
        self._handle(body=False)

    def _handle(self, body: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        self.hub.requests.append(Request(self.command, path, self.headers.get("Range"),
                                         self.headers.get("Authorization")))
        if match := _INFO.match(path):
            return self._info(match["repo"], match["rev"] or "main", body)
        if match := _RESOLVE.match(path):
            return self._resolve(match["repo"], match["rev"], match["path"], body)
        self._error(404, None, "no such endpoint", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id", body)
            return None
        return repo

    def _info(self, repo_id: str, revision: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        siblings = [{"rfilename": name, "size": len(f.data), "blobId": f.sha256[:40],
                     "lfs": {"size": len(f.data), "sha256": f.sha256, "pointerSize": 134}}
                    for name, f in sorted(repo.files.items())]
        payload = json.dumps({"id": repo_id, "sha": repo.sha, "gated": "auto" if repo.gated else False,
                              "private": False, "siblings": siblings}).encode()
        self._send(200, {"Content-Type": "application/json"}, payload if body else b"", len(payload))

    def _resolve(self, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(repo_id, revision, body)
        if repo is None:
            return
        if repo.gated and self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            return self._error(401, "GatedRepo", "Access to this model is restricted", body)
        file = repo.files.get(name)
        if file is None:
            return self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": repo.sha})
        size, start = len(file.data), 0
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{file.sha256}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status = 200
        if body and (wanted := self.headers.get("Range")):
            match = re.fullmatch(r"bytes=(\d+)-", wanted)
            if not match or int(match[1]) >= size:
                return self._error(416, None, "Range not satisfiable", body)
            start, status = int(match[1]), 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        payload = file.data[start:] if body else b""
        drop_after = self.hub.drops.pop((repo_id, name), None) if body else None
        if drop_after is not None:
            self._send(status, headers, payload[:drop_after], size - start, close=True)
            return
        self._send(status, headers, payload, size - start)

    def _error(self, status: int, code: str | None, message: str, body: bool, extra: dict | None = None) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        payload = json.dumps({"error": message}).encode()
        self._send(status, headers, payload if body else b"", len(payload))

    def _send(self, status: int, headers: dict, payload: bytes, length: int, close: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        if close:  # fewer bytes than Content-Length promised, then hang up: a broken connection
            self.wfile.flush()
            self.close_connection = True
