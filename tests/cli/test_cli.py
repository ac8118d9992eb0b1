"""`merger average` through the real entry points: CliRunner in-process and `python -m merger`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from helpers import check_against_reference, make_run
from merger.testing import synth
from merger.cli import app

runner = CliRunner()


def tree_bytes(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_success_human_output(tiny_run, tmp_path):
    root, sds = tiny_run
    r = runner.invoke(app, ["average", str(root), "--revisions", "step1000..step3000", "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    assert "merged 3 checkpoints" in r.stdout and "merge plan" in r.stderr
    check_against_reference(tmp_path / "o", sds, [1 / 3] * 3)


def test_json_is_clean_on_stdout(tiny_run, tmp_path):
    root, sds = tiny_run
    r = runner.invoke(app, ["average", str(root), "-r", "step1000,step3000", "--method", "weights",
                            "--weights", "1,3", "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["plan"]["weights"] == [0.25, 0.75] and d["result"]["output"] == str(tmp_path / "o")
    check_against_reference(tmp_path / "o", [sds[0], sds[2]], [0.25, 0.75])


def test_dry_run_writes_nothing(tiny_run, tmp_path):
    root, _ = tiny_run
    r = runner.invoke(app, ["average", str(root), "-r", "..step3000", "--method", "ema", "--decay", "0.5",
                            "-o", str(tmp_path / "o"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "0.250000" in r.stdout and "0.500000" in r.stdout and "schedule: blocks" in r.stdout
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["average", str(root), "-r", "..step3000", "--dry-run", "--json"])
    d = json.loads(r.stdout)
    assert d["schedule"] == "blocks" and d["read_bytes"] > 0 and d["estimated_memory"] <= d["max_memory"]


def test_explicit_folders_and_every(tmp_path):
    root, sds = make_run(tmp_path / "run", steps=(100, 200, 300, 400, 500), name="checkpoint-{step}")
    r = runner.invoke(app, ["average", str(root), "-r", "checkpoint-100..checkpoint-500", "--every", "200",
                            "-o", str(tmp_path / "a"), "--json"])
    assert r.exit_code == 0, r.output
    assert [i["name"] for i in json.loads(r.stdout)["plan"]["inputs"]] == \
        ["checkpoint-100", "checkpoint-300", "checkpoint-500"]
    # explicit folders, given out of order: sorted by step
    r = runner.invoke(app, ["average", str(root / "checkpoint-300"), str(root / "checkpoint-100"),
                            "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "b", [sds[0], sds[2]], [0.5, 0.5])


def _error(args, *expected):
    r = runner.invoke(app, ["average", *args])
    assert r.exit_code == 1, r.output
    assert "Error:" in r.stderr and "Traceback" not in r.output
    for e in expected:
        assert e in r.stderr, r.stderr
    return r


def test_mismatch_reports_every_problem(tmp_path):
    root, sds = make_run(tmp_path / "run", steps=(1, 2, 3))
    bad = dict(sds[1])
    bad["gpt_neox.embed_in.weight"] = bad["gpt_neox.embed_in.weight"][:100].clone()  # shape
    mask = "gpt_neox.layers.0.attention.bias"
    bad[mask] = bad[mask].to(torch.bool)  # dtype (non-floating: floating dtypes may differ, test_mixed_dtypes.py)
    del bad["gpt_neox.final_layer_norm.bias"]  # missing
    synth.save_checkpoint(root / "step2", bad, config=synth.SHAPES["tiny"].config())
    before = tree_bytes(root)
    _error([str(root), "-o", str(tmp_path / "o")], "3 mismatches", "shape [100, 64] in step2",
           "dtype bool in step2", "'gpt_neox.final_layer_norm.bias' is missing from step2")
    assert not (tmp_path / "o").exists() and tree_bytes(root) == before


def test_missing_revision_and_existing_output(tiny_run, tmp_path):
    root, _ = tiny_run
    _error([str(root), "-r", "step1000,step2500", "-o", str(tmp_path / "o")],
           "revision 'step2500' not found", "step2000, step3000")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    _error([str(root), "-o", str(tmp_path / "exists")], "already exists", "--force")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "exists"), "--force"])
    # --force replaces only what merger wrote (issue 12): keep.txt's folder is not a merger output
    assert r.exit_code == 1 and "is not a merger output" in r.stderr
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    assert runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "o")]).exit_code == 0
    (tmp_path / "o" / "stale.txt").write_text("from an older merge")
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "o"), "--force"])
    assert r.exit_code == 0 and not (tmp_path / "o" / "stale.txt").exists()


@pytest.mark.parametrize("args,msg", [
    (["--method", "weights", "--weights", "1,2"], "has 2 values but 3"),
    (["--method", "weights", "--weights", "1,-1,-1"], "sum to -1"),
    (["--method", "weights", "--weights", "1,nan,1"], "NaN"),
    (["--weights", "1,2,3"], "only used with --method weights"),
    (["--max-memory", "lots"], "can't read 'lots' as a size"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device"),
    (["--every", "2"], "--every needs --revisions"),
])
def test_bad_options(tiny_run, tmp_path, args, msg):
    root, _ = tiny_run
    _error([str(root), *args, "-o", str(tmp_path / "o")], msg)
    assert not (tmp_path / "o").exists()


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _error([str(tmp_path / "empty")], "found no checkpoint in it or in its subfolders: it is empty")
    _error([str(tmp_path / "nope" / "x")], "no such folder")


def test_python_dash_m_entry_point(tiny_run, tmp_path):
    """The installed entry point, as a user runs it: JSON on stdout, errors without traceback."""
    root, _ = tiny_run
    ok = subprocess.run([sys.executable, "-m", "merger", "average", str(root), "-o", str(tmp_path / "o"), "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["result"]["written_bytes"] > 0
    bad = subprocess.run([sys.executable, "-m", "merger", "average", str(root), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "already exists" in bad.stderr and "Traceback" not in bad.stderr
    dbg = subprocess.run([sys.executable, "-m", "merger", "average", str(root), "-o", str(tmp_path / "o"),
                          "--debug"], capture_output=True, text=True, timeout=120)
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "OutputError" in dbg.stderr
