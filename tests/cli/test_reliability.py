"""Reliability: every bad input gets a clear error, and nothing is lost.

Each test breaks one thing in a small trajectory and runs the real CLI (``CliRunner`` on
``merger.cli.app``; a ``python -m merger`` subprocess for the disk-full case). The contract,
checked in full by :func:`refused` every time:
- exit code 1, ``Error: ...`` naming what is wrong and where (file, tensor, revision), a hint,
  and no traceback;
- no output folder, and no ``.NAME.merger-*`` leftovers beside where it would have been;
- every input file byte-identical afterwards (the whole input tree is hashed before and after).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from helpers import WIDE
from helpers.checks import check_refused, leftovers, tree_digest
from helpers.trajectory import Trajectory
from merger.testing import synth
from merger.cli import app

runner = CliRunner()


@pytest.fixture
def traj(tmp_path):
    return Trajectory(tmp_path)


# -- broken files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [4, -100], ids=["no-header", "cut-data"])
def test_truncated_safetensors(traj, keep):
    f = traj.root / "step2000" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep])
    traj.refused([], "step2000/model.safetensors", "truncated", "re-download")


@pytest.mark.parametrize("damage", ["json", "length"])
def test_corrupt_safetensors_header(traj, damage):
    f = traj.root / "step1000" / "model.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "json":
        data[8:24] = b"\x00garbage!\xff\xfe{{{{{{"
        expected = "corrupt safetensors header (not UTF-8)"  # \xff\xfe: checked as the library checks it
    else:
        data[:8] = struct.pack("<Q", 1 << 40)
        expected = "corrupt or truncated safetensors header"
    f.write_bytes(bytes(data))
    traj.refused([], "step1000/model.safetensors", expected)


def test_shard_listed_in_index_but_missing(tmp_path):
    traj = Trajectory(tmp_path, max_shard_size=100_000)
    shards = sorted((traj.root / "step2000").glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    traj.refused([], "step2000", f"shard {shards[1].name} is listed in model.safetensors.index.json but missing")


def test_bin_that_is_not_a_zip(tmp_path):
    traj = Trajectory(tmp_path, fmt="bin")
    (traj.root / "step2000" / "pytorch_model.bin").write_bytes(b"this is not a checkpoint\n" * 100)
    traj.refused([], "step2000/pytorch_model.bin", "is not a torch zip checkpoint")


def test_bin_in_torch_legacy_format(tmp_path):
    traj = Trajectory(tmp_path, fmt="bin")
    torch.save(traj.sds[1], traj.root / "step2000" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    traj.refused([], "step2000/pytorch_model.bin", "legacy format")


@pytest.mark.parametrize("kind,expected", [
    ("training-checkpoint", "the entry 'step' is an int"),
    ("nested", "the entry 'model' is a dict (a nested state dict?)"),
    ("module", "holds a non-tensor object (torch.nn.modules.linear.Linear)"),
])
def test_bin_with_non_tensor_pickles(tmp_path, kind, expected):
    traj = Trajectory(tmp_path, fmt="bin")
    sd = traj.sds[1]
    obj = {"training-checkpoint": {**sd, "step": 2000}, "nested": {"model": sd},
           "module": {**sd, "head": torch.nn.Linear(2, 2)}}[kind]
    torch.save(obj, traj.root / "step2000" / "pytorch_model.bin")
    traj.refused([], "step2000/pytorch_model.bin", expected)


class _System:
    """Unpickling this runs ``os.system(cmd)``."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Exec:
    """Unpickling this runs ``exec(code)``."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("payload", ["os.system", "exec"])
@pytest.mark.parametrize("where", ["value", "top-level"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, where):
    traj = Trajectory(tmp_path, fmt="bin")
    marker = tmp_path / "pwned"
    evil = (_System(f"touch {marker}") if payload == "os.system"
            else _Exec(f"open({str(marker)!r}, 'w').write('pwned')"))
    f = traj.root / "step2000" / "pytorch_model.bin"
    torch.save({**traj.sds[1], "evil": evil} if where == "value" else evil, f)
    module = "posix.system)" if payload == "os.system" else "builtin__.exec)"  # pickle protocol 2 spelling
    traj.refused([], "step2000/pytorch_model.bin", "holds a non-tensor object (", module,
                 "never unpickles arbitrary objects")
    assert not marker.exists(), "the pickle's payload ran"
    # the payload is live: an unrestricted unpickler runs it (so the check above can fail)
    try:
        torch.load(f, weights_only=False)
    except Exception:  # noqa: BLE001 - exec returns None, which torch.load may not like
        pass
    assert marker.exists()


# -- revisions that disagree ----------------------------------------------------------------------

def test_tensor_missing_from_one_revision(traj):
    sd = dict(traj.sds[1])
    del sd["gpt_neox.final_layer_norm.bias"]
    traj.save(2000, sd)
    traj.refused([], "tensor 'gpt_neox.final_layer_norm.bias' is missing from step2000 (present in step3000)")


@pytest.mark.parametrize("what", ["shape", "dtype"])
def test_shape_or_dtype_mismatch(traj, what):
    sd = dict(traj.sds[0])
    name = "gpt_neox.layers.1.attention.dense.weight"
    if what == "shape":
        sd[name] = sd[name][:32].clone()
        expected = f"tensor '{name}': shape [32, 64] in step1000 but [64, 64] in step3000"
    else:  # a non-floating tensor (floating dtypes that differ are averaged: tests/engine/test_mixed_dtypes.py)
        name = "gpt_neox.layers.1.attention.bias"
        sd[name] = sd[name].to(torch.int64)
        expected = f"tensor '{name}': dtype int64 in step1000 but uint8 in step3000"
    traj.save(1000, sd)
    traj.refused([], "don't have the same tensors", expected)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("step", [1000, 3000])
def test_nonfinite_in_one_revision(tmp_path, value, step):
    """Found while merging the last tensor, after earlier shards were finished: all removed."""
    traj = Trajectory(tmp_path, shape=WIDE)
    i = (1000, 2000, 3000).index(step)
    sd = dict(traj.sds[i])
    sd["embed_out.weight"] = sd["embed_out.weight"].clone()
    sd["embed_out.weight"][4000, 7] = value
    synth.save_checkpoint(traj.root / f"step{step}", sd, config=WIDE.config())
    traj.refused(["--max-shard-size", "300KB"], f"tensor 'embed_out.weight' holds NaN or Inf in step{step}",
                 "--allow-nonfinite")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64])
def test_integer_or_bool_buffer_differs(traj, dtype):
    name = "gpt_neox.layers.0.attention.bias" if dtype == torch.uint8 else "extra.buffer"
    for i, step in enumerate((1000, 2000, 3000)):
        sd = dict(traj.sds[i])
        if dtype != torch.uint8:
            sd[name] = torch.zeros(16, dtype=dtype)
        if step == 2000:
            sd[name] = sd[name].clone()
            sd[name].view(-1)[0] = 1 - sd[name].view(-1)[0].to(torch.int64)  # the mask's 1 -> 0, zeros' 0 -> 1
        traj.save(step, sd)
    dt = str(dtype).removeprefix("torch.")
    traj.refused([], f"tensor '{name}' ({dt}) is not floating and differs between revisions: step1000 vs step2000")


# -- revision specs and options -------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["-r", "step1000,step2500"], ["revision 'step2500' not found in",
                                   "nearest existing revisions: step1000, step2000, step3000"]),
    (["-r", "step1000..step3000", "--every", "700"], ["revision for step 1700 not found", "or change --every"]),
    (["-r", "step4000..step9000"], ["--revisions step4000..step9000 selects no revision", "step3000"]),
    (["-r", "step3000..step1000"], ["the range starts at step 3000, after its end 1000", "older revision first"]),
    (["-r", ""], ["--revisions is empty"]),
], ids=["missing", "missing-every", "empty-range", "reversed-range", "empty-spec"])
def test_bad_revisions(traj, args, expected):
    traj.refused(args, *expected)


@pytest.mark.parametrize("every", ["0", "-5"])
def test_every_not_positive(traj, every):
    traj.refused(["-r", "step1000..step3000", f"--every={every}"], f"--every {every}: must be a positive number")


@pytest.mark.parametrize("weights,expected", [
    ("1,2", "--weights has 2 values but 3 checkpoints are selected"),
    ("1,-1,-1", "--weights sum to -1"),
    ("1,nan,1", "contains NaN or Inf"),
    ("1,x,2", "can't read '1,x,2' as comma-separated numbers"),
], ids=["count", "negative-sum", "nan", "not-numbers"])
def test_bad_weights(traj, weights, expected):
    traj.refused(["--method", "weights", "--weights", weights], expected)


# -- the output -----------------------------------------------------------------------------------

def test_output_folder_exists(traj):
    traj.out.mkdir()
    (traj.out / "keep.txt").write_text("mine")
    before = tree_digest(traj.inputs)
    r = runner.invoke(app, ["average", str(traj.root), "-o", str(traj.out)])
    assert r.exit_code == 1 and "already exists" in r.stderr and "--force" in r.stderr and "Traceback" not in r.output
    assert [p.name for p in traj.out.iterdir()] == ["keep.txt"] and (traj.out / "keep.txt").read_text() == "mine"
    assert leftovers(traj.out) == [] and tree_digest(traj.inputs) == before


def test_output_inside_an_input(traj):
    traj.refused([], "overlaps the input", "outside the inputs", out=traj.root / "step3000" / "merged")


@pytest.mark.parametrize("where", ["step3000", "."], ids=["is-a-revision", "contains-the-inputs"])
def test_force_never_replaces_an_input(traj, where):
    out = (traj.root / where).resolve()
    before = tree_digest(traj.inputs)
    r = runner.invoke(app, ["average", str(traj.root), "-o", str(out), "--force"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: output folder {out} overlaps the input" in r.stderr and "hint:" in r.stderr
    assert leftovers(out) == [] and tree_digest(traj.inputs) == before  # still there, untouched


def test_output_parent_is_a_file(traj):
    blocker = traj.out.parent / "a-file"
    blocker.write_text("not a folder")
    traj.refused([], f"{blocker} is a file, not a folder", out=blocker / "merged")
    before = tree_digest(traj.inputs)
    r = runner.invoke(app, ["average", str(traj.root), "-o", str(blocker), "--force"])
    assert r.exit_code == 1 and f"Error: output {blocker} exists and is not a folder" in r.stderr
    assert "hint:" in r.stderr and "Traceback" not in r.output
    assert blocker.read_text() == "not a folder" and leftovers(blocker) == [] and tree_digest(traj.inputs) == before


def test_disk_full_while_writing(tmp_path):
    """RLIMIT_FSIZE makes write() fail with EFBIG (CPython ignores SIGXFSZ), as a full disk would."""
    traj = Trajectory(tmp_path)
    out_bytes = sum(t.numel() * t.element_size() for t in traj.sds[-1].values())
    limit = out_bytes // 2
    before = tree_digest(traj.inputs)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run([sys.executable, "-m", "merger", "average", str(traj.root), "-o", str(traj.out)],
                       capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert r.returncode != -signal.SIGXFSZ, "killed by SIGXFSZ: Python should ignore it"
    check_refused(r.returncode, r.stderr, r.stdout + r.stderr,
                  [f"writing model.safetensors of {traj.out} failed: File too large",
                   "disk full or file size limit reached", "free disk space"],
                  out=traj.out, inputs=traj.inputs, before=before)


def test_a_failed_run_leaves_a_rerun_possible(tmp_path):
    """After an error and a fix, the same command works: no lock or partial folder is left behind."""
    traj = Trajectory(tmp_path)
    good = (traj.root / "step2000" / "model.safetensors").read_bytes()
    (traj.root / "step2000" / "model.safetensors").write_bytes(good[:-10])
    traj.refused([], "truncated")
    (traj.root / "step2000" / "model.safetensors").write_bytes(good)
    r = runner.invoke(app, ["average", str(traj.root), "-o", str(traj.out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["result"]["warnings"] == [] and leftovers(traj.out) == []
