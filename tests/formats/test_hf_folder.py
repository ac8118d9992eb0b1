"""Hugging Face folders are read as transformers reads them, and never outside themselves.

- model.safetensors beside a stale index + shards: merger averages what from_pretrained loads;
- an index naming ``../x`` or an absolute path, a weights or side file linked out of the
  checkpoint, a folder or a FIFO where a file should be, non-string weight_map values: a clear
  error naming the file, exit 1, no output, inputs unchanged;
- the HF cache's own links (snapshot -> ../../blobs, and the cache-wide Xet store) stay readable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from helpers import check_against_reference, make_run, weights_of
from merger.cli import app

runner = CliRunner()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(root.rglob("*")) if not p.is_fifo()}


def average(root: Path, out: Path):
    return runner.invoke(app, ["average", str(root), "--revisions", "step1000..step3000", "-o", str(out)])


def test_single_file_wins_over_a_stale_index(tmp_path):
    """transformers loads model.safetensors when it is there, whatever index lies beside it."""
    root, sds = make_run(tmp_path / "run")
    stale = {k: torch.zeros_like(v) for k, v in sds[1].items()}
    save_file(stale, str(root / "step2000" / "model-00001-of-00001.safetensors"))
    (root / "step2000" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in stale}}))
    r = average(root, tmp_path / "out")
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "out", sds, weights_of("uniform", 3))

    from transformers import AutoModelForCausalLM  # what merger read is what transformers loads

    model = AutoModelForCausalLM.from_pretrained(root / "step2000")
    name = "gpt_neox.embed_in.weight"
    assert torch.equal(model.state_dict()[name].to(sds[1][name].dtype), sds[1][name])


@pytest.mark.parametrize("bad", ["../step1000/model.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_index_entries_outside_the_folder_are_refused(tmp_path, bad):
    root, sds = make_run(tmp_path / "run", max_shard_size=20_000)
    index = root / "step2000" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first = sorted(d["weight_map"])[0]
    d["weight_map"][first] = bad
    index.write_text(json.dumps(d))
    before = snapshot(tmp_path)
    r = average(root, tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "model.safetensors.index.json" in r.output and "unexpected" not in r.output
    assert "hint:" in r.output
    assert snapshot(tmp_path) == before


NUL = "\x00"


@pytest.mark.parametrize("where, expected", [
    ("file", "weight_map['gpt_neox.embed_in.weight'] is 'model-00001-of-00015.safetensors\\x00', a file name "
             "with a NUL byte"),
    ("only", "weight_map['gpt_neox.embed_in.weight'] is '\\x00', a file name with a NUL byte"),
    ("raw", "corrupt index file (not JSON: Invalid control character"),  # a NUL byte unescaped in the JSON text
    ("tensor", "says tensor 'gpt_neox.embed_in.weight\\x00' is in"),
])
def test_nul_byte_in_an_index_is_refused(tmp_path, where, expected):
    """Found by the index fuzzer: a NUL in a shard's name gave "unexpected ValueError: embedded null
    byte" (os.stat refuses such a path). Now: the index file named, what is wrong, exit 1."""
    root, _ = make_run(tmp_path / "run", max_shard_size=20_000)
    index = root / "step2000" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name = "gpt_neox.embed_in.weight"
    if where == "file":
        d["weight_map"][name] += NUL
    elif where == "only":
        d["weight_map"][name] = NUL
    elif where == "tensor":
        d["weight_map"][name + NUL] = d["weight_map"].pop(name)
    text = json.dumps(d)
    index.write_text(text.replace('"metadata"', f'"meta{NUL}data"') if where == "raw" else text)
    before = snapshot(tmp_path)
    r = average(root, tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.output, r.output
    err = r.stderr
    assert err.startswith(f"Error: {root / 'step2000'}") and "model.safetensors.index.json" in err, err
    assert expected in err and "hint: re-download the file" in err, err
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["weights", "config"])
def test_links_out_of_the_checkpoint_are_refused(tmp_path, what):
    root, _ = make_run(tmp_path / "run")
    secret = tmp_path / "elsewhere"
    secret.mkdir()
    name = "model.safetensors" if what == "weights" else "config.json"
    target = secret / name
    os.replace(root / "step3000" / name, target)
    (root / "step3000" / name).symlink_to(target)
    before = snapshot(tmp_path)
    r = average(root, tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert f"step3000/{name}" in r.output and "outside the checkpoint" in r.output
    assert "hint: replace the link with the file itself" in r.output
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.merger-partial"))


def test_links_inside_the_checkpoint_are_followed(tmp_path):
    root, sds = make_run(tmp_path / "run")
    folder = root / "step3000"
    (folder / "real").mkdir()
    os.replace(folder / "model.safetensors", folder / "real" / "w.safetensors")
    (folder / "model.safetensors").symlink_to("real/w.safetensors")
    r = average(root, tmp_path / "out")
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "out", sds, weights_of("uniform", 3))


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_weights_path_that_is_not_a_file(tmp_path, kind):
    root, _ = make_run(tmp_path / "run")
    p = root / "step2000" / "model.safetensors"
    p.unlink()
    p.mkdir() if kind == "folder" else os.mkfifo(p)
    r = average(root, tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "step2000/model.safetensors" in r.output and "not a regular file" in r.output
    assert "a folder" in r.output if kind == "folder" else "FIFO" in r.output


def test_hf_cache_snapshots_stay_readable(tmp_path):
    """A snapshot's files are links into the repo's blobs/: inside the checkpoint for merger."""
    from merger.testing.hubcache import write_cache_revision

    root, sds = make_run(tmp_path / "run")
    cache = tmp_path / "cache"
    for s in (1000, 2000, 3000):
        write_cache_revision(cache, "org/tiny", f"step{s}", root / f"step{s}")
    repo = cache / "models--org--tiny"
    snaps = [repo / "snapshots" / (repo / "refs" / f"step{s}").read_text() for s in (1000, 2000, 3000)]
    assert all((p / "model.safetensors").is_symlink() for p in snaps)
    r = runner.invoke(app, ["average", *map(str, snaps), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "out", sds, weights_of("uniform", 3))
