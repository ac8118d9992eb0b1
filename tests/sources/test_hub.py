"""Hub revisions through the real huggingface_hub code path, offline, from a hand-built HF cache.

The cache holds ``EleutherAI/pythia-70m`` with refs step100000..step143000 every 1000 (each a
40-hex commit, no newline) and snapshots with config.json and pytorch_model.bin in pythia-70m's
real architecture and buffers; ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` come from conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import WIDE, check_against_reference, fakehub, load_dir
from merger.testing import synth
from merger.cli import app
from merger.testing.hubcache import repo_folder_name, write_cache_revision

runner = CliRunner()
SELECTED = list(range(100000, 143000, 5000)) + [143000]


@pytest.fixture(scope="module")
def pythia_cache(tmp_path_factory):
    """EleutherAI/pythia-70m in the test HF cache; returns {step: state dict} of the selected steps."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    src = tmp_path_factory.mktemp("pythia-src")
    shape = synth.SHAPES["70m"]
    sds = {}
    steps = range(100000, 143001, 1000)
    # every selected step gets its own weights; the others reuse the nearest older one's
    bases = [step if step in SELECTED else max(s for s in SELECTED if s <= step) for step in steps]
    for i, (step, base) in enumerate(zip(steps, bases)):
        folder = src / f"step{base}"
        if base not in sds:
            sds[base] = synth.pythia_state_dict(shape, seed=7, step=base)
            synth.save_checkpoint(folder, sds[base], fmt="bin", config=shape.config())
        write_cache_revision(cache, "EleutherAI/pythia-70m", f"step{step}", folder)
        if i + 1 == len(bases) or bases[i + 1] != base:
            shutil.rmtree(folder)  # its blobs are in the cache now: 1.6 GB on disk, not 3.2
    return sds


@pytest.mark.slow  # a Pythia-70m-sized Hub cache, merged and loaded (~80 s on 2 cores)
def test_pythia_design_card_command(pythia_cache, tmp_path, monkeypatch):
    """`merger average --revisions step100000..step143000 --every 5000`, exactly as typed."""
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["average", "--revisions", "step100000..step143000", "--every", "5000"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "merged" / "pythia-70m-uniform-step100000-step143000"
    m = json.loads((out / "merger.json").read_text())
    assert [s["revision"] for s in m["sources"]] == [f"step{s}" for s in SELECTED]
    refs = Path(os.environ["HF_HUB_CACHE"]) / repo_folder_name("EleutherAI/pythia-70m") / "refs"
    for s in m["sources"]:
        assert s["repo_id"] == "EleutherAI/pythia-70m"
        assert s["commit"] == (refs / s["revision"]).read_text() and len(s["commit"]) == 40
        assert s["files"][0]["file"] == "pytorch_model.bin" and len(s["files"][0]["sha256"]) == 64
    check_against_reference(out, [pythia_cache[s] for s in SELECTED], [1 / len(SELECTED)] * len(SELECTED))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 512 and model.dtype == torch.float16
    # the cache is untouched: still only symlinks into blobs, no file written in snapshots
    snap = Path(m["sources"][0]["path"])
    assert all(p.is_symlink() for p in snap.iterdir())


@pytest.mark.slow  # the module's Pythia-70m-sized Hub cache takes ~20 s to write
def test_dry_run_lists_pinned_revisions(pythia_cache):
    r = runner.invoke(app, ["average", "--revisions", "step140000..step143000", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [i["revision"] for i in d["inputs"]] == ["step140000", "step141000", "step142000", "step143000"]
    assert d["schedule"] == "blocks" and all(len(i["commit"]) == 40 for i in d["inputs"])
    # step141000 and step142000 reuse step140000's weight file: reported from the blob hashes
    assert ["step140000", "step141000"] in d["duplicate_revisions"]


@pytest.mark.parametrize("args,message", [
    (["--revisions", "step100000..step143000", "--every", "1500"], "revision for step 101500 not found"),
    (["--revisions", "step100500"], "nearest existing revisions: step100000, step101000"),
    (["--revisions", "step200000..step300000"], "selects no revision"),
    (["--revisions", "step100000..step143000", "--every", "0"], "--every 0"),
    (["--revisions", "step100000..step143000", "--every", "-5"], "--every -5"),
    (["EleutherAI/pythia-12b", "--revisions", "step1..step2"], "not in the local HF cache"),
    (["--revisions", "step143000..step100000"], "after its end"),
])
@pytest.mark.slow  # the module's Pythia-70m-sized Hub cache takes ~20 s to write
def test_bad_revisions_are_clear_errors(pythia_cache, tmp_path, args, message):
    r = runner.invoke(app, ["average", *args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the module's Pythia-70m-sized Hub cache takes ~20 s to write
def test_strict_refuses_identical_revisions(pythia_cache, tmp_path):
    r = runner.invoke(app, ["average", "--revisions", "step140000,step141000", "--strict", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1 and "identical weight files: step140000 == step141000" in r.stderr


def test_sharded_revisions_with_different_layouts(tmp_path):
    """A repo whose branches use different shard layouts (Pythia's big models do)."""
    cache = Path(os.environ["HF_HUB_CACHE"])
    shape = synth.SHAPES["tiny"]
    layouts = [("bin", 120_000), ("bin", None), ("safetensors", 90_000), ("bin", 50_000)]
    sds = []
    for i, (fmt, shard) in enumerate(layouts):
        sds.append(synth.pythia_state_dict(shape, seed=3, step=i))
        folder = synth.save_checkpoint(tmp_path / f"src{i}", sds[-1], fmt=fmt, max_shard_size=shard,
                                       config=shape.config())
        write_cache_revision(cache, "local/sharded", f"step{i * 10}", folder)
    r = runner.invoke(app, ["average", "local/sharded", "--revisions", "step0..step30", "-o", str(tmp_path / "o"),
                            "--max-shard-size", "100KB"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "o").glob("model-*.safetensors"))) > 1
    index = json.loads((tmp_path / "o" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sds[0])
    check_against_reference(tmp_path / "o", sds, [0.25] * 4)
    assert set(load_dir(tmp_path / "o")) == set(sds[0])


fake_hub = fakehub.fake_hub


def test_an_online_merge_leaves_refs_for_an_offline_one(fake_hub, tmp_path, monkeypatch):
    """merger downloads by commit sha (revisions pinned first), which leaves huggingface_hub no
    refs/<branch>: merger writes them, so the same command offline finds the branches in the cache
    and merges the same bytes."""
    sds, commits = [], {}
    for s in (100, 200):
        sds.append(synth.pythia_state_dict(WIDE, seed=3, step=s))
        folder = synth.save_checkpoint(tmp_path / "src" / f"step{s}", sds[-1], config=WIDE.config())
        commits[f"step{s}"] = fake_hub.add_revision("org/refs", f"step{s}", folder)
    args = ["average", "org/refs", "--revisions", "step100..step200"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "online")])
    assert r.exit_code == 0, r.output
    refs = fake_hub.cache_dir / repo_folder_name("org/refs") / "refs"
    assert {p.name: p.read_text() for p in refs.iterdir()} == commits
    fakehub.set_offline(monkeypatch, True)
    served = fake_hub.count()
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "offline")])
    assert r.exit_code == 0, r.output
    assert fake_hub.count() == served, "the offline run asked the Hub"
    check_against_reference(tmp_path / "offline", sds, [0.5, 0.5])
    assert (tmp_path / "online/model.safetensors").read_bytes() == (tmp_path / "offline/model.safetensors").read_bytes()
