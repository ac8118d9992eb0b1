"""merger and a Hugging Face cache laid out by huggingface_hub itself, shared Xet store included.

Every cache here is written by huggingface_hub 2.4's own download code against the loopback fake
Hub (tests/helpers/fakehub.py) in Xet mode: the fake Hub stores LFS files in a local CAS with hf_xet's own
uploader and hands out ``local://`` CAS URLs, so ``hf_hub_download`` takes the real Xet path
(hf_xet reconstructs the file) and publishes it to the cache-wide shared store
``<cache>/blobs/<xx>/<xet-hash>``, with per-repo ``blobs/<etag>`` symlinks and ``.refs``
manifests. Nothing of the layout is written by hand. The partial download is a real one too: a
child process running ``hf_hub_download`` is killed while it waits for its Xet token, which
leaves the library's own ``<etag>.<uuid>.incomplete`` behind.

The world (:func:`world`), before merger runs:
  org/run     step1000..step4000 (tiny Pythia, safetensors, identical config.json everywhere)
  org/mirror  main = step1000's files: its weights share one shared-store entry with org/run's
  cached:     org/mirror@main (all files); org/run@step2000 (all, by branch: refs/step2000);
              org/run@step3000's config.json, and an interrupted download of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.utils import _shared_blobs
from typer.testing import CliRunner

from helpers import fakehub
from helpers import check_against_reference
from merger.testing import synth
from merger.cli import app
from merger.errors import EvalError
from merger.testing.hubcache import repo_folder_name

fake_hub = fakehub.fake_hub
runner = CliRunner()
STEPS = [1000, 2000, 3000, 4000]
WEIGHTS = "model.safetensors"


def _interrupted_download(hub, repo: str, filename: str, revision: str) -> None:
    """``hf_hub_download`` in a child process, SIGKILLed while it waits for its Xet CAS token: the
    library has opened its process-unique ``blobs/<etag>.<uuid>.incomplete`` by then."""
    hub.xet_token_delay = 4.0
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub.cache_dir), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    code = ("from huggingface_hub import hf_hub_download; "
            f"hf_hub_download({repo!r}, {filename!r}, revision={revision!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    blobs = hub.cache_dir / repo_folder_name(repo) / "blobs"
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None and time.monotonic() < deadline and not list(blobs.glob("*.incomplete")):
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
        hub.xet_token_delay = 0.0
    assert list(blobs.glob("*.incomplete")), "the child never started its download"


@pytest.fixture
def world(fake_hub, tmp_path):
    """The cache described in the module docstring; returns (sds by step, source folders, commits)."""
    fake_hub.xet_cas = tmp_path / "cas"
    shape = synth.SHAPES["tiny"]
    sds, folders, commits = {}, {}, {}
    for s in STEPS:
        sds[s] = synth.pythia_state_dict(shape, seed=11, step=s)
        folders[s] = synth.save_checkpoint(tmp_path / "src" / f"step{s}", sds[s], fmt="safetensors",
                                           config=shape.config())
        commits[s] = fake_hub.add_revision("org/run", f"step{s}", folders[s])
    commits["mirror"] = fake_hub.add_revision("org/mirror", "main", folders[1000])
    snapshot_download("org/mirror", revision="main")
    snapshot_download("org/run", revision="step2000")
    hf_hub_download("org/run", "config.json", revision="step3000")
    _interrupted_download(fake_hub, "org/run", WEIGHTS, "step3000")
    return sds, folders, commits


def _tree(cache: Path) -> dict[str, bytes | str]:
    """Every path under ``cache``: a symlink's target, a file's bytes (locks left out)."""
    out = {}
    for p in sorted(cache.rglob("*")):
        rel = p.relative_to(cache).as_posix()
        if p.is_symlink():
            out[rel] = os.readlink(p)
        elif p.is_file() and not rel.startswith(".locks") and not rel.endswith(".lock"):
            out[rel] = p.read_bytes()
    return out


def _store_entry(cache: Path, repo: str, etag: str) -> Path | None:
    return _shared_blobs.shared_blob_target(cache / repo_folder_name(repo) / "blobs" / etag, cache)


def test_world_is_the_shared_xet_layout(world, fake_hub):
    """The fixture really is huggingface_hub's shared-store layout (else the tests below prove little)."""
    _, folders, _ = world
    cache = fake_hub.cache_dir
    sha = hashlib.sha256((folders[1000] / WEIGHTS).read_bytes()).hexdigest()
    xet = fake_hub.commits["org/run"][world[2][1000]][WEIGHTS].xet_hash
    entry = _store_entry(cache, "org/mirror", sha)
    assert entry == cache / "blobs" / xet[:2] / xet and entry.is_file() and sha != xet
    manifest = entry.with_name(xet + ".refs").read_text().splitlines()
    assert manifest == [f"{repo_folder_name('org/mirror')}/blobs/{sha}"]
    info = scan_cache_dir(cache)
    assert info.warnings == [] and len(info.incomplete_files) == 1
    assert {r.repo_id for r in info.repos} == {"org/run", "org/mirror"}


def test_no_keep_deletes_only_what_it_downloaded(world, fake_hub, tmp_path):
    """``--no-keep`` through the CLI, stream schedule: what was cached before the run, the shared
    store entry org/mirror still links to, the blob step2000 shares, the interrupted download:
    all stay byte for byte; what merger downloaded goes; huggingface_hub sees a clean cache."""
    sds, folders, commits = world
    cache = fake_hub.cache_dir
    before = _tree(cache)
    incomplete = {f.file_path for f in scan_cache_dir(cache).incomplete_files}
    r = runner.invoke(app, ["average", "org/run", "-r", "step1000..step4000", "--no-keep",
                            "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["schedule"] == "stream"
    check_against_reference(tmp_path / "out", [sds[s] for s in STEPS], [0.25] * 4)

    after = _tree(cache)
    assert {k: after.get(k) for k in before} == before, "something cached before the run changed or went"
    run = cache / repo_folder_name("org/run")
    assert not (run / "snapshots" / commits[1000]).exists() and not (run / "snapshots" / commits[4000]).exists()
    assert sorted(os.listdir(run / "snapshots" / commits[3000])) == ["config.json"]
    info = scan_cache_dir(cache)
    assert info.warnings == [], info.warnings
    assert {f.file_path for f in info.incomplete_files} == incomplete  # not merger's to remove
    assert _shared_blobs.unreferenced_shared_blobs(cache) == {}  # no orphan left in the store
    dangling = [p for p in cache.rglob("*") if p.is_symlink() and not p.exists()]
    assert dangling == []
    # the store now holds exactly the payloads of the files still cached: mirror's (== step1000's)
    # and step2000's weights; step1000's reference to the shared one is gone from its manifest
    xets = {fake_hub.commits["org/run"][commits[s]][WEIGHTS].xet_hash for s in (1000, 2000)}
    assert {p.name for p in _shared_blobs.shared_store_blob_paths(cache)} == xets
    sha1000 = hashlib.sha256((folders[1000] / WEIGHTS).read_bytes()).hexdigest()
    entry = _store_entry(cache, "org/mirror", sha1000)
    assert entry.with_name(entry.name + ".refs").read_text().splitlines() == \
        [f"{repo_folder_name('org/mirror')}/blobs/{sha1000}"]
    # provenance: the real sha256 of each weight file, never the store's Xet hash
    m = json.loads((tmp_path / "out" / "merger.json").read_text())
    for s, src in zip(STEPS, m["sources"]):
        f = next(f for f in src["files"] if f["file"] == WEIGHTS)
        assert f["sha256"] == hashlib.sha256((folders[s] / WEIGHTS).read_bytes()).hexdigest()
        assert f["sha256"] != fake_hub.commits["org/run"][commits[s]][WEIGHTS].xet_hash


def test_offline_resolution_from_the_shared_store(world, fake_hub, tmp_path, monkeypatch):
    """Offline, refs and files come from huggingface_hub's view of the cache, sha256 from the
    etag: a merge of step1000 (linked from org/mirror's store entry, no download) and step2000."""
    sds, folders, commits = world
    hf_hub_download("org/run", WEIGHTS, revision="step1000")
    hf_hub_download("org/run", "config.json", revision="step1000")
    assert fake_hub.count("GET", "/cdn-lfs/") == 0  # Xet only: nothing came over plain HTTP
    fakehub.set_offline(monkeypatch, True)
    fake_hub.requests.clear()
    from merger.sources.hflocal import CachedRepo

    repo = CachedRepo("org/run")
    assert repo.refs() == {f"step{s}": commits[s] for s in (1000, 2000, 3000)}
    for s in (1000, 2000):
        files = repo.files(commits[s])
        data = (folders[s] / WEIGHTS).read_bytes()
        assert files[WEIGHTS] == (len(data), hashlib.sha256(data).hexdigest())
        assert files["config.json"][1] is None  # a git blob sha1 is no sha256
    r = runner.invoke(app, ["average", "org/run", "-r", "step1000,step2000", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "o", [sds[1000], sds[2000]], [0.5, 0.5])
    m = json.loads((tmp_path / "o" / "merger.json").read_text())
    assert [f["sha256"] for s in m["sources"] for f in s["files"]] == \
        [hashlib.sha256((folders[s] / WEIGHTS).read_bytes()).hexdigest() for s in (1000, 2000)]
    r = runner.invoke(app, ["average", "org/run", "-r", "step2000,step3000", "-o", str(tmp_path / "p")])
    assert r.exit_code == 1 and "step3000" in r.stderr and "has no weights in the local cache" in r.stderr
    assert fake_hub.requests == []
    assert scan_cache_dir(fake_hub.cache_dir).warnings == []


def test_a_corrupted_repo_is_named_and_never_pruned(world, fake_hub, tmp_path, monkeypatch):
    """A ref to a missing snapshot makes huggingface_hub's scan skip the repo: merger says so
    offline, and ``delete_downloaded`` deletes nothing in it."""
    _, _, commits = world
    run = fake_hub.cache_dir / repo_folder_name("org/run")
    (run / "refs" / "step9000").write_text("f" * 40)
    fakehub.set_offline(monkeypatch, True)
    r = runner.invoke(app, ["average", "org/run", "-r", "step2000,step3000", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "corrupted" in r.stderr and "missing commit" in r.stderr
    before = _tree(fake_hub.cache_dir)
    from merger.sources.hflocal import delete_downloaded

    assert delete_downloaded("org/run", commits[2000], [WEIGHTS, "config.json"]) == 0
    assert _tree(fake_hub.cache_dir) == before


@pytest.mark.parametrize("env,offline", [
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, False),  # HF_HUB_OFFLINE wins when set
    ({"TRANSFORMERS_OFFLINE": "1"}, True),  # the fallback when HF_HUB_OFFLINE isn't set
    ({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "0"}, True),
    ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "yes"}, True),
    ({}, False),
])
def test_one_offline_rule_for_the_package(fake_hub, monkeypatch, env, offline):
    """hub resolution and ``merger eval``'s model lookup follow huggingface_hub's own rule."""
    from huggingface_hub import constants

    from merger.eval import harness as merger_eval
    from merger.sources import hflocal

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # the environment, read now, decides; with neither variable set, what the library froze does
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", not offline if env else offline)
    assert hflocal.is_offline() is offline
    library = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants as c; "
                              "print(c.HF_HUB_OFFLINE, c.is_offline_mode())"],
                             env=os.environ.copy(), capture_output=True, text=True, check=True).stdout.split()
    assert library == [str(offline)] * 2  # what huggingface_hub itself computes from this environment
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    fake_hub.requests.clear()
    with pytest.raises(EvalError, match="org/none"):  # neither online nor in the cache
        merger_eval.resolve_model("org/none@main")
    assert (fake_hub.requests != []) is not offline  # asked the Hub exactly when online


def test_one_repo_id_rule():
    from merger.sources.hflocal import is_repo_id
    from merger.sources.hub import looks_like_repo_id

    assert looks_like_repo_id is is_repo_id
    for ok in ("EleutherAI/pythia-70m", "org/run", "a_b/c.d-e"):
        assert is_repo_id(ok), ok
    for bad in ("pythia-70m", "a/b/c", "../x", "org/..", "org/a--b", "org/x.git", "/abs", "org/", "-a/b", "a b/c"):
        assert not is_repo_id(bad), bad


def _child_env(hub) -> dict:
    """The environment of a child ``merger`` process that talks to ``hub`` (plain env vars only)."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(hub.cache_dir), "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow  # a killed download subprocess, then a resumed one (~16 s)
def test_stream_resume_after_sigkill(fake_hub, tmp_path):
    """``merger average --no-keep`` (a real process, stream schedule) is SIGKILLed after folding the
    first revision, while the second one's download is held back by the fake Hub; the same command
    with ``--resume`` downloads only what is left and writes the same bytes as an uninterrupted run."""
    shape = synth.SHAPES["tiny"]
    sds, sha = [], {}
    for s in STEPS:
        sds.append(synth.pythia_state_dict(shape, seed=13, step=s))
        folder = synth.save_checkpoint(tmp_path / "src" / f"step{s}", sds[-1], fmt="safetensors",
                                       config=shape.config())
        fake_hub.add_revision("org/run", f"step{s}", folder)
        sha[s] = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    fake_hub.delay_blobs[sha[2000]] = 120.0
    cmd = [sys.executable, "-m", "merger", "average", "org/run", "-r", "step1000..step4000", "--no-keep"]
    out, partial = tmp_path / "out", tmp_path / ".out.merger-partial"
    proc = subprocess.Popen(cmd + ["-o", str(out)], env=_child_env(fake_hub), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    run = fake_hub.cache_dir / repo_folder_name("org/run")
    deadline, folded = time.monotonic() + 120, 0
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                folded = json.loads((partial / "progress.json").read_text())["stream"]["folded"]
            except (OSError, ValueError, KeyError):
                pass
            if folded == 1:  # step1000's deletion waits for step2000's download: it is still cached
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert folded == 1, err.decode()
    assert fake_hub.bytes_served[("org/run", WEIGHTS)] < 2 * (tmp_path / "src/step1000" / WEIGHTS).stat().st_size
    assert not out.exists() and (partial / "stream-state.safetensors").is_file()
    del fake_hub.delay_blobs[sha[2000]]

    r = subprocess.run(cmd + ["-o", str(out), "--resume", "--json"], env=_child_env(fake_hub),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert any("1 revisions already folded" in w for w in res["result"]["warnings"]), res["result"]["warnings"]
    assert fake_hub.count("GET", f"/cdn-lfs/org/run/{sha[1000]}/") == 1  # not downloaded again
    assert not partial.exists()
    check_against_reference(out, sds, [0.25] * 4)
    # --no-keep: all gone, step1000 too (the killed run downloaded and folded it, the resumed run
    # deleted it); only the killed download's own temp file stays: huggingface_hub names it per
    # process and never reuses it (`hf cache prune` removes it), and merger can't tell it from
    # another process's download in progress
    assert [p.name for p in run.glob("blobs/*") if not p.name.endswith(".incomplete")] == []
    assert list(run.glob("snapshots/*")) == []

    r = subprocess.run(cmd + ["-o", str(tmp_path / "ref")], env=_child_env(fake_hub), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for f in sorted(os.listdir(tmp_path / "ref")):
        if f not in ("merger.json", "README.md"):
            assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert scan_cache_dir(fake_hub.cache_dir).warnings == []
