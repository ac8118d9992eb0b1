"""Every error names the file or option and says how to fix it; never "unexpected ... report it"
(issue 12, part 5). The header cases are in tests/formats/test_safetensors_strict.py, the
non-regular files in test_input_safety.py; these are the others, each through the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file
from typer.testing import CliRunner

from helpers.evalfixtures import random_model
from merger.cli import app
from merger.testing import synth
from helpers.trajectory import Trajectory
from helpers.checks import check_refused, leftovers, tree_digest

runner = CliRunner()


@pytest.fixture
def traj(tmp_path):
    return Trajectory(tmp_path)


def test_weights_whose_sum_overflows_are_normalised_exactly(traj, tmp_path):
    """``--weights 1e308,1e308,1e308`` are equal weights: the uniform average, bit for bit."""
    r = runner.invoke(app, ["average", str(traj.root), "--method", "weights", "--weights", "1e308,1e308,1e308",
                            "-o", str(traj.out)])
    assert r.exit_code == 0, r.output
    uni = tmp_path / "uniform"
    assert runner.invoke(app, ["average", str(traj.root), "-o", str(uni)]).exit_code == 0
    assert (traj.out / "model.safetensors").read_bytes() == (uni / "model.safetensors").read_bytes()
    r = runner.invoke(app, ["average", str(traj.root), "--method", "weights", "--weights", "-1e308,-1e308,1e308",
                            "-o", str(tmp_path / "neg")])
    assert r.exit_code == 1 and "--weights sum to -1e+308" in r.stderr and "hint:" in r.stderr, r.output


def test_eval_limit_inf(tmp_path):
    """(Already refused on main: kept so that it stays refused.)"""
    r = runner.invoke(app, ["eval", str(tmp_path), "--limit", "inf"])
    assert r.exit_code == 1 and "--limit inf: must be a number of documents" in r.stderr and "hint:" in r.stderr


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_output_dir_that_is_a_file(tmp_path, command):
    model = random_model(tmp_path / "model")
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    args = [str(model)] if command == "eval" else [str(tmp_path), "--window", "2"]
    for target, expected in ((f, f"--output-dir {f} is a file, not a folder"),
                             (f / "sub", f"--output-dir {f / 'sub'}: its parent {f} is a file")):
        r = runner.invoke(app, [command, *args, "--output-dir", str(target), "--limit", "2"])
        assert r.exit_code == 1, r.output
        assert expected in r.stderr and "hint: give --output-dir a folder" in r.stderr, r.stderr
        assert "unexpected" not in r.output and f.read_text() == "keep me"


def test_paths_that_are_not_utf8(tmp_path):
    """A run folder whose name holds the byte 0xff (valid on Linux): merged, and the model card and
    merger.json written, through a real subprocess whose stdout/stderr are strict UTF-8."""
    traj = Trajectory(tmp_path)
    bad = os.fsdecode(os.fsencode(str(tmp_path)) + b"/run\xff")
    shutil.move(str(traj.root), bad)
    out = os.fsdecode(os.fsencode(str(tmp_path)) + b"/merged\xfe")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PYTHONIOENCODING": "utf-8"}  # strict
    r = subprocess.run([sys.executable, "-m", "merger", "average", bad, "-o", out], capture_output=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    assert "# merged\\udcfe" in (Path(out) / "README.md").read_text()  # the byte, escaped
    assert [s["name"] for s in json.loads((Path(out) / "merger.json").read_text())["sources"]] == \
        ["step1000", "step2000", "step3000"]
    got = load((Path(out) / "model.safetensors").read_bytes())  # the library refuses non-UTF-8 paths
    assert got.keys() == traj.sds[0].keys()


def test_a_run_with_zero_tensors(tmp_path):
    root = tmp_path / "run"
    for s in (1000, 2000):
        (root / f"step{s}").mkdir(parents=True)
        save_file({}, str(root / f"step{s}" / "model.safetensors"))
    out = tmp_path / "merged"
    before = tree_digest(root)
    r = runner.invoke(app, ["average", str(root), "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, [f"{root / 'step2000'}: the checkpoint holds no tensors",
                                                    "failed save"], out=out, inputs=root, before=before)


def test_differing_float8_is_called_floating(tmp_path):
    root = tmp_path / "run"
    for i, s in enumerate((1000, 2000)):
        synth.save_checkpoint(root / f"step{s}", {"w": torch.full((4,), i + 1.0).to(torch.float8_e4m3fn),
                                                  "b": torch.ones(3)}, config={"model_type": "gpt_neox"})
    out = tmp_path / "merged"
    before = tree_digest(root)
    r = runner.invoke(app, ["average", str(root), "-o", str(out)])
    err = check_refused(r.exit_code, r.stderr, r.output, [
        "tensor 'w' is float8_e4m3fn, which merger copies but doesn't average, and it differs between revisions: "
        "step1000 vs step2000", "convert the checkpoints to bfloat16 or float16"], out=out, inputs=root,
        before=before)
    assert "not floating" not in err


def test_average_eval_without_a_tokenizer_is_refused_before_merging(traj):
    """The latest revision has no tokenizer: ``--eval`` can't run, so nothing is merged at all."""
    before = tree_digest(traj.inputs)
    r = runner.invoke(app, ["average", str(traj.root), "--eval", "-o", str(traj.out)])
    check_refused(r.exit_code, r.stderr, r.output, [
        f"--eval: the merged model would have no tokenizer: step3000 ({traj.root / 'step3000'}) holds none of",
        "merge without --eval"], out=traj.out, inputs=traj.inputs, before=before)
    assert leftovers(traj.out) == []
