"""Hub downloads through a loopback fake Hub (tests/helpers/fakehub.py): the real huggingface_hub code
path, the *stream* schedule, and ``--no-keep``'s bound of two revisions on disk."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import fakehub
from helpers import WIDE, check_against_reference, files_equal
from merger.testing import synth
from merger.cli import app
from merger.testing.hubcache import repo_folder_name

fake_hub = fakehub.fake_hub
runner = CliRunner()
STEPS = [1000, 2000, 3000, 4000, 5000, 6000]


def publish(hub, tmp_path, repo="org/wide", fmt="bin"):
    sds = []
    for s in STEPS:
        sds.append(synth.pythia_state_dict(WIDE, seed=5, step=s))
        folder = synth.save_checkpoint(tmp_path / "src" / f"step{s}", sds[-1], fmt=fmt, config=WIDE.config())
        hub.add_revision(repo, f"step{s}", folder)
    return sds


class DiskWatcher(threading.Thread):
    """Polls the repo's blobs and counts how many distinct weight files are on disk at once."""

    def __init__(self, repo_dir: Path, size: int):
        super().__init__(daemon=True)
        self.repo_dir, self.size, self.most, self.done = repo_dir, size, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            blobs = self.repo_dir / "blobs"
            try:  # complete weight blobs, and partial downloads (*.incomplete) of them
                big = [p for p in blobs.iterdir() if p.suffix == ".incomplete" or p.stat().st_size > self.size // 2]
                self.most = max(self.most, len(big))
            except OSError:  # a file vanished while we looked
                pass
            time.sleep(0.005)


def test_stream_no_keep_holds_two_revisions(fake_hub, tmp_path):
    sds = publish(fake_hub, tmp_path)
    fake_hub.delay_per_file = 0.2  # slow downloads, so the watcher sees them
    weight_size = (tmp_path / "src" / "step1000" / "pytorch_model.bin").stat().st_size
    watcher = DiskWatcher(fake_hub.cache_dir / repo_folder_name("org/wide"), weight_size)
    overlap = []

    def slow_fold(nbytes):  # a slow first fold: the next revision must be downloading meanwhile
        if not overlap:
            time.sleep(0.6)
            overlap.append(fake_hub.bytes_served.get(("org/wide", "pytorch_model.bin"), 0))

    from merger.api import average
    from merger.plan import Options

    watcher.start()
    plan, _ = average(["org/wide"], revisions="step1000..step6000", options=Options(keep=False),
                      output=tmp_path / "out", progress=slow_fold, command=["test"])
    watcher.done.set()
    watcher.join()
    assert plan.schedule == "stream"
    check_against_reference(tmp_path / "out", sds, [1 / 6] * 6)
    assert overlap[0] > weight_size, "the second revision wasn't downloading while the first was folded"
    assert watcher.most == 2, f"{watcher.most} revisions on disk at once"
    blobs = list((fake_hub.cache_dir / repo_folder_name("org/wide") / "blobs").glob("*"))
    assert all(p.stat().st_size < weight_size // 2 for p in blobs), "a weight file stayed in the cache"
    m = json.loads((tmp_path / "out" / "merger.json").read_text())
    from huggingface_hub import HfApi

    branches = {b.name: b.target_commit for b in HfApi().list_repo_refs("org/wide").branches}
    assert [s["commit"] for s in m["sources"]] == [branches[f"step{s}"] for s in STEPS]
    assert all(len(s["files"][0]["sha256"]) == 64 for s in m["sources"])  # the Hub's LFS sha256
    assert (tmp_path / "out" / "config.json").read_bytes() == \
        (tmp_path / "src" / "step6000" / "config.json").read_bytes()


@pytest.mark.parametrize("to", [[], ["--to", "dcp"]])
def test_stream_equals_blocks_and_keeps_cache(fake_hub, tmp_path, to):
    """Also as DCP records (``--to dcp``), which the stream's writer frames too."""
    publish(fake_hub, tmp_path, fmt="safetensors")
    r = runner.invoke(app, ["average", "org/wide", "-r", "step2000..step6000", "--every", "2000",
                            "--method", "ema", "--decay", "0.6", "-o", str(tmp_path / "stream"), "--json", *to])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["schedule"] == "stream"
    downloads = fake_hub.count("GET", contains=".safetensors")
    assert downloads == 3  # only the selected revisions' weights, once each
    # now everything is cached: the same command plans *blocks*, and gives the same bits
    r = runner.invoke(app, ["average", "org/wide", "-r", "step2000..step6000", "--every", "2000",
                            "--method", "ema", "--decay", "0.6", "-o", str(tmp_path / "blocks"), "--json", *to])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["schedule"] == "blocks"
    assert fake_hub.count("GET", contains=".safetensors") == downloads
    pattern = "*.distcp" if to else "*.safetensors"
    assert list((tmp_path / "stream").glob(pattern)) and files_equal(tmp_path / "stream", tmp_path / "blocks", pattern)
    if to:
        assert files_equal(tmp_path / "stream", tmp_path / "blocks", ".metadata")


def test_download_dry_run_and_unknown_repo(fake_hub, tmp_path):
    publish(fake_hub, tmp_path)
    r = runner.invoke(app, ["average", "org/wide", "-r", "step1000..step6000", "--every", "2500", "--dry-run"])
    assert r.exit_code == 1 and "revision for step 3500 not found" in r.stderr
    r = runner.invoke(app, ["average", "org/wide", "-r", "..step3000", "--dry-run", "--json", "--no-keep"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["schedule"] == "stream" and d["download_bytes"] > 0 and [i["revision"] for i in d["inputs"]] == \
        ["step1000", "step2000", "step3000"]
    assert fake_hub.count("GET", contains=".bin") == 0  # a dry run downloads nothing
    r = runner.invoke(app, ["average", "org/nothing", "-r", "step1..step2"])
    assert r.exit_code == 1 and "no such model repo" in r.stderr


@pytest.mark.parametrize("budget", ["2MB"])
def test_no_keep_needs_the_accumulator_to_fit(fake_hub, tmp_path, budget):
    publish(fake_hub, tmp_path)
    r = runner.invoke(app, ["average", "org/wide", "-r", "..step3000", "--no-keep", "--max-memory", budget,
                            "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "--no-keep streams revisions" in r.stderr
    assert not (tmp_path / "o").exists()
