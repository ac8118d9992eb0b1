"""A fake Hugging Face Hub on loopback: the real huggingface_hub download path, with no network.

``FakeHub`` is a threaded ``http.server`` on ``127.0.0.1`` (ephemeral port) answering what
huggingface_hub 2.4 requests for ``HfApi.list_repo_refs`` / ``model_info`` / ``repo_info`` /
``list_repo_tree``, ``hf_hub_download`` and ``snapshot_download``::

    GET  /api/models/{org}/{name}/refs               branches with targetCommit
    GET  /api/models/{org}/{name}[/revision/{rev}]   sha, siblings (+size/blobId/lfs if blobs=true)
    GET  /api/models/{org}/{name}/tree/{rev}         file listing (snapshot_download)
    HEAD/GET /{org}/{name}/resolve/{rev}/{file}      regular file: 200, ETag = git blob sha1;
                                                     LFS file: 302 to the CDN, X-Linked-Etag sha256
    HEAD/GET http://localhost:{port}/cdn-lfs/{org}/{name}/{sha256}/{file}   LFS bytes (Range)

The CDN is this same server reached as ``localhost`` rather than ``127.0.0.1``: another origin, so
the client takes the real off-Hub path (HEAD stops at the 302, the GET goes to ``Location``).

Xet (``FakeHub(xet_cas=folder)``): LFS files are also uploaded with hf_xet itself into a *local*
CAS (hf_xet's ``local://`` endpoint: real xorbs and shards on disk, the real Xet file hashes), and
the 302 of ``/resolve`` carries ``X-Xet-Hash`` + ``X-Xet-Refresh-Route``; the refresh route
``GET /api/models/{org}/{name}/xet-read-token/{rev}`` answers ``X-Xet-Cas-Url: local://<folder>``.
So ``hf_hub_download`` takes the real Xet path: hf_xet reconstructs the file from the local CAS
and huggingface_hub publishes it to the cache-wide shared blob store. Without ``xet_cas`` no
``X-Xet-*`` header or ``xetHash`` field is ever sent and plain HTTP is used. Errors
carry ``X-Error-Code`` (``RepoNotFound`` 401, ``RevisionNotFound`` 404, ``EntryNotFound`` 404),
which ``hf_raise_for_status`` maps to RepositoryNotFoundError / RevisionNotFoundError /
EntryNotFoundError. Repo ids are ``namespace/name``; repos are flat (no sub-folders).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import socket
import threading
import time
from collections import Counter
import dataclasses
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest

LFS_SUFFIXES = (".bin", ".safetensors")
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API = re.compile(rf"/api/models/{_REPO}(?:/(?P<kind>refs|revision|tree)(?:/(?P<rev>[^/]+)/?)?)?")
_RESOLVE = re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
_XET_TOKEN = re.compile(rf"/api/models/{_REPO}/xet-read-token/(?P<rev>[^/]+)")
_CDN = re.compile(rf"/cdn-lfs/{_REPO}/(?P<sha>[0-9a-f]{{64}})/(?P<file>.+)")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: the Hub's ``blobId`` and the ETag of a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class HubFile:
    """A file of a commit. LFS files have ``sha256``; their ``blob_id`` is the pointer's git id."""

    name: str
    data: bytes
    blob_id: str
    sha256: str | None = None
    pointer_size: int | None = None
    xet_hash: str | None = None

    @classmethod
    def make(cls, name: str, data: bytes) -> HubFile:
        if not name.endswith(LFS_SUFFIXES):
            return cls(name, data, git_blob_sha1(data))
        sha = hashlib.sha256(data).hexdigest()
        ptr = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n"
        return cls(name, data, git_blob_sha1(ptr.encode()), sha, len(ptr))

    @property
    def etag(self) -> str:
        """The cache blob name huggingface_hub uses: sha256 for LFS, git blob sha1 otherwise."""
        return self.sha256 or self.blob_id

    def lfs(self, oid_key: str) -> dict:
        """The ``lfs`` field as the Hub writes it (``sha256`` in model info, ``oid`` in trees)."""
        return {oid_key: self.sha256, "size": len(self.data), "pointerSize": self.pointer_size}


def xet_upload(cas: Path, data: bytes) -> str:
    """Store ``data`` in the local CAS ``cas`` with hf_xet's own uploader; return its Xet hash."""
    import hf_xet

    with hf_xet.XetSession().new_upload_commit(endpoint=f"local://{cas}") as commit:
        handle = commit.start_upload_bytes(data)
    return handle.result().xet_info.hash


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, **headers: str):
        super().__init__(message)
        self.status, self.message = status, message
        self.headers = {"X-Error-Message": message.encode("ascii", "replace").decode(), **headers}
        if code:
            self.headers["X-Error-Code"] = code


class FakeHub:
    """In-memory Hub: ``add_revision`` registers commits, served while the context is open.

    Observability (guarded by ``lock``; readable from the test thread while a download runs):
      ``requests``      ``(method, path)`` in arrival order (path without its query string);
      ``ranges``        ``(path, Range header)`` of the body requests that asked for a range;
      ``bytes_served``  Counter ``(repo_id, filename) -> body bytes sent``, updated as they go out.
    Knobs: ``delay_per_file`` seconds spread over each file body (a download stays in progress
    that long); ``xet_token_delay`` seconds before a Xet CAS token is handed out;
    ``drop_once[(repo_id, filename)] = n`` cuts that file's next body after n bytes;
    ``delay_blobs[etag] = s`` holds that one file's body back for s seconds (one revision is slow).
    """

    def __init__(self, *, xet_cas: Path | None = None) -> None:
        self.xet_cas = xet_cas  # a folder: serve LFS files through Xet from this local CAS
        self.branches: dict[str, dict[str, str]] = {}  # repo -> branch -> commit
        self.commits: dict[str, dict[str, dict[str, HubFile]]] = {}  # repo -> commit -> files
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []
        self.bytes_served: Counter[tuple[str, str]] = Counter()
        self.delay_per_file = 0.0
        self.xet_token_delay = 0.0  # seconds before answering xet-read-token (a Xet download waits)
        self.delay_blobs: dict[str, float] = {}  # etag -> seconds before that file's body is sent
        self.closing = threading.Event()  # set on exit: delays end early
        self.drop_once: dict[tuple[str, str], int] = {}
        self.cache_dir: Path | None = None  # set by the ``fake_hub`` fixture
        self.lock = threading.Lock()
        self.url = self.cdn_url = ""  # http://127.0.0.1:PORT and http://localhost:PORT once started

    def add_revision(self, repo_id: str, branch: str, folder: Path) -> str:
        """Commit the flat files of ``folder`` on ``branch`` (created or moved); return the sha.

        Deterministic: sha1 of repo, branch, parent commit and the files' names and etags. Files
        are read now (later changes to ``folder`` don't show); older commits stay reachable.
        """
        paths = sorted(p for p in Path(folder).iterdir() if p.is_file())
        files = {p.name: HubFile.make(p.name, p.read_bytes()) for p in paths}
        if self.xet_cas is not None:
            files = {n: dataclasses.replace(f, xet_hash=xet_upload(self.xet_cas, f.data)) if f.sha256 else f
                     for n, f in files.items()}
        parent = self.branches.get(repo_id, {}).get(branch, "")
        h = hashlib.sha1(f"{repo_id}\n{branch}\n{parent}\n".encode())
        for f in files.values():
            h.update(f"{f.name} {f.etag}\n".encode())
        sha = h.hexdigest()
        with self.lock:
            self.commits.setdefault(repo_id, {})[sha] = files
            self.branches.setdefault(repo_id, {})[branch] = sha
        return sha

    def lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, HubFile]]:
        """``(commit, files)`` of a branch or full commit sha; raises the Hub's error otherwise."""
        if repo_id not in self.commits:
            raise _HubError(401, "RepoNotFound", "Repository not found")
        sha = self.branches[repo_id].get(revision, revision)
        if sha not in self.commits[repo_id]:
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return sha, self.commits[repo_id][sha]

    def count(self, method: str | None = None, contains: str = "") -> int:
        """How many logged requests have ``method`` (any if None) and ``contains`` in their path."""
        with self.lock:
            return sum((method in (None, m)) and contains in p for m, p in self.requests)

    def __enter__(self) -> FakeHub:  # noqa: PYI034
        self._server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": self}))
        port = self._server.server_address[1]
        self.url, self.cdn_url = f"http://127.0.0.1:{port}", f"http://localhost:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.closing.set()
        self._server.stop()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    """Keeps each connection's socket and handler thread, so ``stop`` can end and join them all."""

    def __init__(self, *args) -> None:
        self.conns: dict[socket.socket, threading.Thread] = {}
        super().__init__(*args)

    def process_request(self, request, client_address) -> None:
        t = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                             name="fakehub-conn", daemon=True)
        self.conns[request] = t
        t.start()

    def stop(self) -> None:
        self.shutdown()
        for conn, thread in list(self.conns.items()):  # end idle keep-alive handlers now
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(timeout=5)
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx pools connections
    timeout = 30  # bound on an idle connection
    hub: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        hub, url = self.hub, urlsplit(self.path)
        with hub.lock:
            hub.requests.append((self.command, url.path))
        try:
            if m := _API.fullmatch(url.path):
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                obj = self._api(m["repo"], m["kind"], unquote(m["rev"] or ""), query)
                self._send(200, json.dumps(obj).encode())
            elif (m := _XET_TOKEN.fullmatch(url.path)) and hub.xet_cas is not None:
                hub.lookup(m["repo"], unquote(m["rev"]))
                time.sleep(hub.xet_token_delay)
                self._send(200, b"{}", {"X-Xet-Cas-Url": f"local://{hub.xet_cas}",
                                         "X-Xet-Access-Token": "fake-xet-token",
                                         "X-Xet-Token-Expiration": str(int(time.time()) + 3600)})
            elif m := _RESOLVE.fullmatch(url.path):
                self._resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]))
            elif m := _CDN.fullmatch(url.path):
                commits = hub.commits.get(m["repo"], {}).values()
                f = next((f for fs in commits for f in fs.values() if f.sha256 == m["sha"]), None)
                if f is None:
                    raise _HubError(404, None, "Not found")
                self._send_file(m["repo"], f, {"ETag": f'"{f.sha256}"', "Content-Disposition":
                                               f'attachment; filename="{f.name}";'})
            else:
                raise _HubError(404, None, "Not found")
        except _HubError as e:
            self._send(e.status, json.dumps({"error": e.message}).encode(), e.headers)
        except (BrokenPipeError, ConnectionResetError):  # the client went away mid-body
            self.close_connection = True

    do_HEAD = do_GET

    def _api(self, repo: str, kind: str | None, rev: str, query: dict):
        hub = self.hub
        if kind == "refs":
            if repo not in hub.branches:
                raise _HubError(401, "RepoNotFound", "Repository not found")
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                        for b, c in hub.branches[repo].items()]
            prs = {"pullRequests": []} if query.get("include_prs") else {}
            return {"branches": branches, "converts": [], "tags": [], **prs}
        if kind is not None and not rev:
            raise _HubError(404, None, "Not found")
        sha, files = hub.lookup(repo, rev or "main")
        if kind == "tree":  # recursive or not, the same: repos are flat
            return [{"type": "file", "oid": f.blob_id, "size": len(f.data), "path": f.name}
                    | ({"lfs": f.lfs("oid")} if f.sha256 else {})
                    | ({"xetHash": f.xet_hash} if f.xet_hash else {}) for f in files.values()]
        siblings = [{"rfilename": f.name} for f in files.values()]
        if query.get("blobs", "").lower() in ("1", "true"):  # files_metadata=True
            for s, f in zip(siblings, files.values()):
                s.update({"size": len(f.data), "blobId": f.blob_id}
                         | ({"lfs": f.lfs("sha256")} if f.sha256 else {}))
        return {"id": repo, "modelId": repo, "sha": sha, "private": False, "gated": False,
                "disabled": False, "tags": [], "lastModified": "2024-01-01T00:00:00.000Z",
                "siblings": siblings}

    def _resolve(self, repo: str, rev: str, filename: str) -> None:
        sha, files = self.hub.lookup(repo, rev)
        if (f := files.get(filename)) is None:  # X-Repo-Commit: the client caches the miss
            raise _HubError(404, "EntryNotFound", f"{filename} not in {rev}",
                            **{"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f.blob_id}"'}
        if f.sha256 is None:
            return self._send_file(repo, f, headers)
        location = f"{self.hub.cdn_url}/cdn-lfs/{repo}/{f.sha256}/{quote(f.name)}"
        if f.xet_hash:  # as the Hub does for Xet-backed files: hash + where to get a CAS token
            headers |= {"X-Xet-Hash": f.xet_hash,
                        "X-Xet-Refresh-Route": f"{self.hub.url}/api/models/{repo}/xet-read-token/{sha}"}
        self._send(302, b"", headers | {"Location": location, "X-Linked-Etag": f'"{f.sha256}"',
                                        "X-Linked-Size": str(len(f.data))})

    def _head(self, status: int, headers: dict, length: int) -> None:
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(length)}.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self._head(status, {"Content-Type": "application/json", **(headers or {})}, len(body))
        if self.command != "HEAD":  # HEAD: the same headers, no body
            self.wfile.write(body)

    def _send_file(self, repo: str, f: HubFile, headers: dict) -> None:
        """``f``'s bytes: 200, or 206 for ``Range: bytes=a-[b]`` or ``bytes=-n``."""
        n, start, end, status = len(f.data), 0, len(f.data), 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())) and any(m.groups()):
            a, b = m.groups()
            start, end = (int(a), min(int(b) + 1 if b else n, n)) if a else (max(n - int(b), 0), n)
            if start >= n:
                return self._send(416, b"", {"Content-Range": f"bytes */{n}"})
            status, headers = 206, headers | {"Content-Range": f"bytes {start}-{end - 1}/{n}"}
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes", **headers}
        self._head(status, headers, end - start)
        if self.command == "HEAD":
            return
        hub, key = self.hub, (repo, f.name)
        with hub.lock:
            if rng:
                hub.ranges.append((urlsplit(self.path).path, rng))
            drop = hub.drop_once.pop(key, None)
        body = memoryview(f.data)[start:end if drop is None else min(end, start + drop)]
        hub.closing.wait(hub.delay_blobs.get(f.etag, 0.0))
        pieces = 8 if hub.delay_per_file > 0 else 1
        step = max(1, math.ceil(len(body) / pieces))
        for i in range(0, max(len(body), 1), step):
            if hub.delay_per_file > 0:  # before each piece: the last byte leaves after it all
                time.sleep(hub.delay_per_file / pieces)
            self.wfile.write(body[i:i + step])
            with hub.lock:
                hub.bytes_served[key] += len(body[i:i + step])
        if drop is not None:
            self.close_connection = True  # EOF before Content-Length: a broken transfer


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    """Switch huggingface_hub's offline mode for the rest of the test: the env vars (merger reads
    them at call time) and ``constants.HF_HUB_OFFLINE`` (frozen at import; the request hook and
    ``is_offline_mode()`` read it)."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1" if offline else "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running ``FakeHub`` that huggingface_hub talks to, online, with a fresh empty cache
    (``hub.cache_dir``, the default ``cache_dir`` too). Sets the env vars and patches what
    huggingface_hub froze at import (see below); teardown stops the server and closes the pooled
    HTTP client, then monkeypatch restores it all. The empty agent-harness registry keeps
    ``/api/agent-harnesses`` (fetched once per process) out of ``hub.requests``.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _cache_manager, _detect_agent, _http

    cache = tmp_path / "fakehub-cache"
    cache.mkdir()
    with FakeHub() as hub:
        hub.cache_dir = cache
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        set_offline(monkeypatch, False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        origin = _http._url_origin(hub.url)
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {origin})
        monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
        monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(_detect_agent, "_registry", _detect_agent._EMPTY_REGISTRY)
        _http.close_session()
        try:
            yield hub
        finally:
            _http.close_session()
