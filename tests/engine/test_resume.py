"""A run killed half-way never publishes a half-written model; the next run resumes or starts clean.

The kill is real: ``python -m merger average ...`` in a subprocess, SIGKILLed while shard k+1 is
being written. A merge of a test-sized trajectory takes ~50 ms, far less than the polling a
timer-based kill would need, so the child carries one hook: on its first data write into shard
k+1, when shards 1..k are finished and recorded, it drops a marker file and parks its writer
thread. The test waits for the marker (bounded polling) and kills the process with SIGKILL.
(A self-SIGSTOP was tried first: on a loaded CI machine the run sometimes went on past it.)

Then, with the same arguments, (a) ``--resume`` verifies and keeps shards 1..k and folds only
the rest, (b) a plain run removes the leftovers and starts clean; both give output bit-identical
to an uninterrupted run. In-process tests cover Ctrl-C, changed inputs, a damaged finished shard,
and a second run on the same output.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.checks import Interrupt, leftovers, partial_of, wait_for_marker
from helpers import files_equal, make_run
from merger.testing import synth
from merger.api import average
from merger.cli import app
from merger.errors import OutputError
from merger.plan import Options

runner = CliRunner()
SHAPE = synth.Shape(hidden=128, layers=2, heads=4, vocab=4096, max_pos=64)
FLAGS = ["--max-shard-size", "100KB", "--max-memory", "8MB"]
STOP_AT = 3  # shards finished when the child is killed

# `python -m merger`, plus: on the first data write into shard STOP_AT + 1, announce it (a marker
# file) and park the writer thread, so nothing more is written until the test's SIGKILL lands.
CHILD = """
import os, sys, time
from merger.output import shards
prefix = "model-%05d-of-" % (int(os.environ["MERGER_TEST_STOP_AT"]) + 1)
def park(self):
    if self.path.name.startswith(prefix):
        open(os.environ["MERGER_TEST_MARKER"], "w").close()
        while True:
            time.sleep(1)
orig, orig_owned = shards.ShardWriter.write, shards.ShardWriter.write_owned
def write(self, data, offset, *, absolute=False):
    orig(self, data, offset, absolute=absolute)
    if not absolute:
        park(self)
def write_owned(self, data, offset, address):  # the native pipeline's writes
    fut = orig_owned(self, data, offset, address)
    self.wait(fut)
    park(self)
    return fut
shards.ShardWriter.write, shards.ShardWriter.write_owned = write, write_owned
sys.argv = ["merger", *sys.argv[1:]]
from merger.cli import main
main()
"""


def same_model(a: Path, b: Path) -> bool:
    return files_equal(a, b) and files_equal(a, b, "model.safetensors.index.json")


def kill_mid_run(root: Path, out: Path, timeout: float = 60.0) -> None:
    """Start the merge, wait until it stops inside shard STOP_AT + 1, SIGKILL it."""
    marker = out.parent / f".{out.name}.kill-point"
    env = dict(os.environ, MERGER_TEST_STOP_AT=str(STOP_AT), MERGER_TEST_MARKER=str(marker))
    p = subprocess.Popen([sys.executable, "-c", CHILD, "average", str(root), "-o", str(out), *FLAGS],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_marker(p, marker, timeout)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    p.stderr.close()


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """(trajectory root, reference output, partial folder of a run killed in shard STOP_AT + 1)."""
    base = tmp_path_factory.mktemp("resume")
    root, _ = make_run(base / "run", shape=SHAPE, steps=(1000, 2000, 3000, 4000, 5000))
    ref = base / "ref"
    r = runner.invoke(app, ["average", str(root), "-o", str(ref), *FLAGS, "--json"])
    assert r.exit_code == 0, r.output
    copied = json.loads(r.stdout)["result"]["copied_tensors"]
    assert copied  # the buffers
    n_shards = len(list(ref.glob("model-*.safetensors")))
    assert n_shards >= 2 * STOP_AT, n_shards

    out = base / "killed" / "merged"
    out.parent.mkdir()
    kill_mid_run(root, out)
    assert not out.exists(), "a killed run published its output"
    assert leftovers(out) == [partial_of(out).name]
    partial = partial_of(out)
    progress = json.loads((partial / "progress.json").read_text())
    finished = sorted(progress["shards"])
    assert finished == [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, STOP_AT + 1)]
    for name in finished:  # what progress.json calls finished is byte-identical to the final shard
        assert (partial / name).read_bytes() == (ref / name).read_bytes()
    assert (partial / f"model-{STOP_AT + 1:05d}-of-{n_shards:05d}.safetensors").exists()  # half-written
    return root, ref, partial, finished, copied


def place(partial: Path, tmp_path: Path) -> Path:
    """A copy of the killed run's partial folder beside ``tmp_path/merged``; returns that output path."""
    out = tmp_path / "merged"
    shutil.copytree(partial, partial_of(out))
    return out


def test_resume_after_kill_keeps_finished_shards(killed, tmp_path):
    root, ref, partial, finished, copied = killed
    out = place(partial, tmp_path)
    r = runner.invoke(app, ["average", str(root), "-o", str(out), *FLAGS, "--resume", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["result"]["resumed_shards"] == finished and d["result"]["warnings"] == []
    assert d["result"]["read_bytes"] < d["plan"]["read_bytes"]  # the finished shards' blocks weren't read
    assert same_model(out, ref)
    assert d["result"]["copied_tensors"] == copied  # what the skipped blocks found was restored
    assert not (out / "progress.json").exists() and leftovers(out) == []


def test_plain_rerun_after_kill_starts_clean(killed, tmp_path):
    root, ref, partial, _, _ = killed
    out = place(partial, tmp_path)
    r = runner.invoke(app, ["average", str(root), "-o", str(out), *FLAGS, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["result"]["resumed_shards"] == [] and d["result"]["read_bytes"] == d["plan"]["read_bytes"]
    assert any("removed the unfinished output of an earlier, interrupted run" in w for w in d["result"]["warnings"])
    assert same_model(out, ref)
    assert leftovers(out) == []


def test_resume_after_kill_with_changed_options_starts_clean(killed, tmp_path):
    root, _, partial, _, _ = killed
    out = place(partial, tmp_path)
    r = runner.invoke(app, ["average", str(root), "-o", str(out), *FLAGS, "--method", "linear", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["result"]["resumed_shards"] == []
    assert d["result"]["warnings"] == ["--resume: the inputs or options changed since the interrupted run; "
                                       "started from the beginning"]
    assert not same_model(out, killed[1]) and leftovers(out) == []


# -- in-process: Ctrl-C, damaged shards, changed inputs, two runs at once ------------------------------

OPTS = Options(max_shard_size=20_000, max_memory=600_000)


@pytest.fixture
def tiny(tmp_path):
    root, _ = make_run(tmp_path / "run", steps=(1000, 2000, 3000))
    ref = tmp_path / "ref"
    plan, _ = average([str(root)], options=OPTS, output=ref)
    assert len(plan.blocks) >= 6 and len(plan.shards) >= 6
    return root, ref, len(plan.blocks)


def ctrl_c(root: Path, out: Path, after: int, options: Options = OPTS) -> list[str]:
    """Interrupt a run after ``after`` blocks; returns the shards its progress.json lists."""
    with pytest.raises(KeyboardInterrupt):
        average([str(root)], options=options, output=out, progress=Interrupt(after))
    assert not out.exists()
    progress = partial_of(out) / "progress.json"
    return sorted(json.loads(progress.read_text())["shards"]) if progress.exists() else []


def test_ctrl_c_late_keeps_shards_for_resume(tiny, tmp_path):
    root, ref, n_blocks = tiny
    out = tmp_path / "out" / "merged"
    finished = ctrl_c(root, out, after=n_blocks - 2)
    assert finished  # the writer lags at most three blocks behind the kernel
    _, res = average([str(root)], options=Options(**{**OPTS.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == finished and res.warnings == []
    assert same_model(out, ref) and leftovers(out) == []


def test_resume_a_dcp_output(tiny, tmp_path):
    """``--to dcp``: the finished .distcp files (records framed as they were written) are verified
    and kept, the rest written, and the folder is the uninterrupted run's, .metadata included."""
    root, _, n_blocks = tiny
    opts = Options(**{**OPTS.__dict__, "to": "dcp"})
    ref = tmp_path / "ref-dcp"
    average([str(root)], options=opts, output=ref)
    assert len(list(ref.glob("*.distcp"))) >= 6 and (ref / ".metadata").is_file()
    out = tmp_path / "out" / "merged"
    finished = ctrl_c(root, out, after=n_blocks - 2, options=opts)
    assert finished and all(f.endswith(".distcp") for f in finished)
    _, res = average([str(root)], options=Options(**{**opts.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == finished
    assert files_equal(out, ref, "*.distcp") and files_equal(out, ref, ".metadata") and leftovers(out) == []


def test_ctrl_c_before_any_shard_leaves_nothing(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):  # one shard: it can't be finished after the first block
        average([str(root)], options=Options(max_memory=600_000), output=out, progress=Interrupt(0))
    assert not out.exists() and leftovers(out) == []


def test_damaged_finished_shard_is_written_again(tiny, tmp_path):
    root, ref, n_blocks = tiny
    out = tmp_path / "merged"
    finished = ctrl_c(root, out, after=n_blocks - 2)
    assert len(finished) >= 2
    victim = partial_of(out) / finished[1]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    _, res = average([str(root)], options=Options(**{**OPTS.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == finished[:1]  # shards after a damaged one are written again too
    assert res.warnings == [f"--resume: {finished[1]} of the interrupted run failed verification; writing it again"]
    assert same_model(out, ref)


def test_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path):
    """Copied tensors and duplicate revisions, found in blocks a resume skips, are restored."""
    root, _ = make_run(tmp_path / "run", steps=(1000, 2000, 3000))
    shutil.rmtree(root / "step2000")
    shutil.copytree(root / "step1000", root / "step2000")  # a duplicate, as Pythia's step0 == step1
    _, ref = average([str(root)], options=OPTS, output=tmp_path / "ref")
    assert ref.duplicates == [("step1000", "step2000")] and ref.copied_tensors
    n_blocks = len(average([str(root)], options=OPTS, output=tmp_path / "again")[0].blocks)
    out = tmp_path / "merged"
    assert ctrl_c(root, out, after=n_blocks - 2)
    _, res = average([str(root)], options=Options(**{**OPTS.__dict__, "resume": True}), output=out)
    assert res.resumed_shards and res.duplicates == ref.duplicates and res.copied_tensors == ref.copied_tensors
    assert same_model(out, tmp_path / "ref")


def test_changed_input_starts_clean(tiny, tmp_path):
    root, ref, n_blocks = tiny
    out = tmp_path / "merged"
    assert ctrl_c(root, out, after=n_blocks - 2)
    f = root / "step2000" / "model.safetensors"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # e.g. re-downloaded: same bytes, new mtime
    _, res = average([str(root)], options=Options(**{**OPTS.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == [] and "changed since the interrupted run" in res.warnings[0]
    assert same_model(out, ref)


def test_resume_with_nothing_to_resume(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "merged"
    _, res = average([str(root)], options=Options(**{**OPTS.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == [] and res.warnings == [f"--resume: no unfinished run in {partial_of(out)}; "
                                                         "started from the beginning"]
    assert same_model(out, ref)


def test_second_run_on_the_same_output_is_refused(tiny, tmp_path):
    root, ref, _ = tiny
    out = tmp_path / "merged"
    partial = partial_of(out)
    partial.mkdir()
    (partial / ".merger-partial").touch()  # the marker a running merge writes first (output/owned.py)
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"being written")
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running merge holds
        with pytest.raises(OutputError, match="another merger run is writing"):
            average([str(root)], options=OPTS, output=out)
        assert (partial / "model-00001-of-00009.safetensors").read_bytes() == b"being written"
    finally:
        os.close(fd)
    _, res = average([str(root)], options=OPTS, output=out)  # once that run is gone
    assert "removed the unfinished output" in res.warnings[0] and same_model(out, ref)
