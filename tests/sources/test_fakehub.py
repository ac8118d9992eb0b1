"""The fake Hub (tests/helpers/fakehub.py) drives the REAL huggingface_hub code paths over loopback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

from helpers import fakehub
import pytest
import torch
from helpers.fakehub import FakeHub, git_blob_sha1, set_offline
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

fake_hub = fakehub.fake_hub  # the fixture, used by name below

REPO = "org/tiny"


def _folder(path: Path, seed: int, big: int = 0) -> Path:
    """A checkpoint: a torch .bin (LFS), a .safetensors-named LFS blob, a config.json (regular)."""
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    torch.save({"w": torch.randn(10 + big)}, path / "pytorch_model.bin")
    (path / "model.safetensors").write_bytes(os.urandom(3000))
    (path / "config.json").write_text(f'{{"seed": {seed}}}')
    return path


@pytest.fixture
def repo(fake_hub, tmp_path):
    """Two branches of REPO; returns (hub, {branch: (commit, folder)})."""
    revs = {}
    for i, branch in enumerate(["main", "step1000"]):
        folder = _folder(tmp_path / branch, seed=i)
        revs[branch] = (fake_hub.add_revision(REPO, branch, folder), folder)
    return fake_hub, revs


def test_fixture_overrides_offline_conftest(fake_hub):
    assert constants.HF_HUB_OFFLINE is False and os.environ["HF_HUB_OFFLINE"] == "0"
    assert constants.ENDPOINT == fake_hub.url == os.environ["HF_ENDPOINT"]
    assert fake_hub.url.startswith("http://127.0.0.1:") and not fake_hub.url.endswith(":0")
    assert constants.HF_HUB_CACHE == str(fake_hub.cache_dir)


def test_commit_sha_deterministic(tmp_path):
    folder = _folder(tmp_path / "a", seed=0)
    a, b = FakeHub(), FakeHub()
    sha = a.add_revision(REPO, "main", folder)
    assert sha == b.add_revision(REPO, "main", folder) and len(sha) == 40 and int(sha, 16) >= 0
    assert a.add_revision(REPO, "main", folder) != sha  # a new commit on top of the old one
    assert a.lookup(REPO, sha)[0] == sha  # the old commit stays reachable by sha


def test_list_repo_refs(repo):
    hub, revs = repo
    refs = HfApi().list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {k: v[0] for k, v in revs.items()}
    assert {b.ref for b in refs.branches} == {"refs/heads/main", "refs/heads/step1000"}
    assert refs.tags == [] and refs.converts == []
    assert hub.requests == [("GET", f"/api/models/{REPO}/refs")]


def test_model_info_files_metadata(repo):
    hub, revs = repo
    commit, folder = revs["step1000"]
    info = HfApi().model_info(REPO, revision="step1000", files_metadata=True)
    assert info.sha == commit and info.id == REPO
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {"pytorch_model.bin", "model.safetensors", "config.json"}
    for name in ("pytorch_model.bin", "model.safetensors"):
        data = (folder / name).read_bytes()
        assert sib[name].size == len(data) == sib[name].lfs.size
        assert sib[name].lfs.sha256 == hashlib.sha256(data).hexdigest()
        assert sib[name].lfs.pointer_size > 100
    cfg = (folder / "config.json").read_bytes()
    assert sib["config.json"].lfs is None and sib["config.json"].blob_id == git_blob_sha1(cfg)
    assert sib["config.json"].size == len(cfg)
    # by commit sha, and without files metadata (only names)
    plain = HfApi().model_info(REPO, revision=commit)
    assert plain.sha == commit and all(s.size is None for s in plain.siblings)
    assert HfApi().model_info(REPO).sha == revs["main"][0]  # no revision: /api/models/{repo}
    assert hub.requests == [("GET", f"/api/models/{REPO}/revision/step1000"),
                            ("GET", f"/api/models/{REPO}/revision/{commit}"),
                            ("GET", f"/api/models/{REPO}")]


def test_download_into_standard_cache_layout(repo, tmp_path):
    hub, revs = repo
    commit, folder = revs["step1000"]
    cache = tmp_path / "dl-cache"
    path = Path(hf_hub_download(REPO, "pytorch_model.bin", revision=commit, cache_dir=cache))
    data = (folder / "pytorch_model.bin").read_bytes()
    storage = cache / "models--org--tiny"
    assert path == storage / "snapshots" / commit / "pytorch_model.bin" and path.is_symlink()
    assert path.resolve() == (storage / "blobs" / hashlib.sha256(data).hexdigest()).resolve()
    assert path.read_bytes() == data
    assert torch.equal(torch.load(path)["w"], torch.load(folder / "pytorch_model.bin")["w"])
    assert not (storage / "refs").exists()  # downloaded by commit: no ref written
    # LFS: HEAD on /resolve answers 302 to the CDN origin, the body comes from there
    sha256 = hashlib.sha256(data).hexdigest()
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/{commit}/pytorch_model.bin"),
                            ("GET", f"/cdn-lfs/{REPO}/{sha256}/pytorch_model.bin")]
    assert hub.bytes_served[(REPO, "pytorch_model.bin")] == len(data)
    # by commit again: served from the snapshot, no request at all
    hub.requests.clear()
    assert hf_hub_download(REPO, "pytorch_model.bin", revision=commit, cache_dir=cache) == str(path)
    assert hub.requests == []
    # by branch name: HEAD to learn the commit, refs/<branch> written, blob already there (no GET)
    assert hf_hub_download(REPO, "pytorch_model.bin", revision="step1000",
                           cache_dir=cache) == str(path)
    assert (storage / "refs" / "step1000").read_text() == commit
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/step1000/pytorch_model.bin")]
    # a regular (non-LFS) file: 200 straight from /resolve, blob named by its git sha1
    hub.requests.clear()
    cfg = Path(hf_hub_download(REPO, "config.json", revision="main", cache_dir=cache))
    main = revs["main"][0]
    assert cfg.read_bytes() == (revs["main"][1] / "config.json").read_bytes()
    assert cfg.resolve().name == git_blob_sha1(cfg.read_bytes())
    assert (storage / "refs" / "main").read_text() == main
    assert hub.requests == [("HEAD", f"/{REPO}/resolve/main/config.json"),
                            ("GET", f"/{REPO}/resolve/main/config.json")]


def test_errors_map_to_huggingface_hub_exceptions(repo):
    hub, _ = repo
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "pytorch_model.bin", revision="main")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        HfApi().list_repo_refs("org/missing")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "pytorch_model.bin", revision="step999")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "pytorch_model.bin", revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(REPO, revision="step999")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.bin", revision="main")
    assert all(m == "HEAD" or p.startswith("/api/") for m, p in hub.requests)


def test_offline_served_from_cache_without_requests(repo, monkeypatch):
    hub, revs = repo
    commit, folder = revs["step1000"]
    online = hf_hub_download(REPO, "pytorch_model.bin", revision="step1000")  # fixture's cache
    assert Path(online).is_relative_to(hub.cache_dir)
    snap = snapshot_download(REPO, revision="step1000")
    assert sorted(os.listdir(snap)) == sorted(os.listdir(folder))
    set_offline(monkeypatch, True)
    hub.requests.clear()
    assert hf_hub_download(REPO, "pytorch_model.bin", revision=commit) == online
    assert hf_hub_download(REPO, "pytorch_model.bin", revision="step1000") == online
    assert snapshot_download(REPO, revision="step1000") == snap
    with pytest.raises(EntryNotFoundError):  # LocalEntryNotFoundError: main was never downloaded
        hf_hub_download(REPO, "pytorch_model.bin", revision="main")
    assert hub.requests == []


def test_snapshot_download_endpoints(repo):
    hub, revs = repo
    commit, folder = revs["main"]
    snap = Path(snapshot_download(REPO, revision="main"))
    assert snap.name == commit
    assert all((snap / n).read_bytes() == (folder / n).read_bytes() for n in os.listdir(folder))
    paths = [p for _, p in hub.requests]
    assert paths[:2] == [f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}/tree/{commit}"]
    assert hub.count("HEAD", "/resolve/") == 3 and hub.count("GET", "/cdn-lfs/") == 2


def test_resume_uses_range(repo, monkeypatch):
    hub, revs = repo
    # http_get writes what httpx yields in DOWNLOAD_CHUNK_SIZE (10 MB) pieces: a cut inside the
    # first piece restarts from 0 without a Range. Small pieces make the resume a Range request.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 500)
    commit, folder = revs["main"]
    data = (folder / "model.safetensors").read_bytes()
    hub.drop_once[(REPO, "model.safetensors")] = 1000  # the first body is cut after 1000 bytes
    path = hf_hub_download(REPO, "model.safetensors", revision=commit)  # retried after ~1 s
    assert Path(path).read_bytes() == data
    assert hub.count("GET", "/cdn-lfs/") == 2 and [r for _, r in hub.ranges] == ["bytes=1000-"]
    assert hub.bytes_served[(REPO, "model.safetensors")] == len(data)  # nothing sent twice


def test_delay_makes_download_observable(repo):
    hub, revs = repo
    commit, folder = revs["main"]
    hub.delay_per_file = 0.4
    size = (folder / "model.safetensors").stat().st_size
    result, start = [], time.monotonic()
    t = threading.Thread(target=lambda: result.append(
        hf_hub_download(REPO, "model.safetensors", revision=commit)))
    t.start()
    deadline = time.monotonic() + 5
    while hub.bytes_served[(REPO, "model.safetensors")] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    served = hub.bytes_served[(REPO, "model.safetensors")]
    blobs = hub.cache_dir / "models--org--tiny" / "blobs"
    in_progress = [p.name for p in blobs.iterdir()]
    t.join(timeout=10)
    assert 0 < served < size and any(n.endswith(".incomplete") for n in in_progress)
    assert result and Path(result[0]).read_bytes() == (folder / "model.safetensors").read_bytes()
    assert time.monotonic() - start >= 0.4
