"""Never read something other than what was planned, never hang, never leak (issue 12, parts 3-4).

- an input rewritten in place with the same size (and its mtime put back, as ``cp -p`` or
  ``touch -r`` leave it) between planning and reading, or while it is read, is detected on every
  path (native kernel, torch kernel, stream schedule) and nothing is published;
- ``--resume`` doesn't keep shards made from such an input;
- ``--dtype float16`` overflowing a tensor identical in every input is an error on every path;
- a FIFO (or a folder) where a weights, index or side file should be is refused, never blocks;
- more input files than the open-file limit: a clear error, no partial folder, no leaked fd;
- ``--revisions step100..step10000000000 --every 1`` answers at once, in little memory.

The real CLI (``CliRunner``, or ``python -m merger`` where a hang or a resource limit must be
contained); the library API (what the CLI calls) where a file must change at an exact moment.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import make_run
from merger.api import average, prepare
from merger.cli import app
from merger.engine.stream import run_stream
from merger.errors import CheckpointFormatError, TensorError
from merger.plan import Options
from merger.testing import synth
from helpers.trajectory import Trajectory
from helpers.checks import check_refused, leftovers, tree_digest

runner = CliRunner()
PATHS = ["native", "torch"]


def rewrite_in_place(victim: Path, donor: Path) -> None:
    """Overwrite ``victim`` with ``donor``'s bytes (same size) in place, then put its atime and
    mtime back (``touch -r``): only the inode's ctime tells."""
    st = os.stat(victim)
    data = donor.read_bytes()
    assert len(data) == st.st_size and data != victim.read_bytes()
    with open(victim, "r+b") as f:
        f.write(data)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(victim).st_mtime_ns == st.st_mtime_ns and os.stat(victim).st_size == st.st_size


def no_output(out: Path) -> None:
    assert not out.exists() and leftovers(out) == []


@pytest.fixture
def kernel(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("MERGER_KERNEL", "torch")
    return request.param


@pytest.mark.parametrize("kernel", PATHS, indirect=True)
def test_input_changed_between_planning_and_reading(tmp_path, kernel):
    root, _ = make_run(tmp_path / "run")
    out = tmp_path / "merged"
    prep = prepare([str(root)])
    rewrite_in_place(root / "step1000" / "model.safetensors", root / "step3000" / "model.safetensors")
    with pytest.raises(CheckpointFormatError, match="step1000/model.safetensors changed between planning and "
                                                    "reading") as e:
        average([str(root)], output=out, prepared=prep)
    assert "nothing was published" in str(e.value) and e.value.hint
    no_output(out)


@pytest.mark.parametrize("kernel", PATHS + ["stream"])
def test_input_changed_while_it_is_read(tmp_path, kernel, monkeypatch):
    """The first progress report comes once the first block (stream: tensor) is folded: the
    file is rewritten then, the output is never published."""
    if kernel == "torch":
        monkeypatch.setenv("MERGER_KERNEL", "torch")
    root, _ = make_run(tmp_path / "run")
    out = tmp_path / "merged"
    victim = root / "step1000" / "model.safetensors"
    done = []

    def change(nbytes):
        if not done:
            done.append(nbytes)
            rewrite_in_place(victim, root / "step3000" / "model.safetensors")

    with pytest.raises(CheckpointFormatError, match="step1000/model.safetensors changed while it was being read"):
        if kernel == "stream":
            run_stream(list(prepare([str(root)]).sources), Options(), out, progress=change)
        else:
            average([str(root)], output=out, progress=change)
    assert done
    no_output(out)


def test_resume_does_not_keep_shards_of_an_input_changed_with_size_and_mtime_kept(tmp_path):
    root, _ = make_run(tmp_path / "run")
    out = tmp_path / "merged"
    opts = Options(max_shard_size=40_000, max_memory=600_000)  # 6 blocks, 9 shards
    partial = tmp_path / ".merged.merger-partial"
    calls = []

    def interrupt(nbytes):  # Ctrl-C after block 2, once the writer has recorded a finished shard
        calls.append(nbytes)
        if len(calls) < 2:
            return
        for _ in range(200):
            if json.loads((partial / "progress.json").read_text())["shards"]:
                raise KeyboardInterrupt
            time.sleep(0.05)

    with pytest.raises(KeyboardInterrupt):
        average([str(root)], options=opts, output=out, progress=interrupt)
    kept = json.loads((partial / "progress.json").read_text())["shards"]
    assert kept and len(kept) < 10
    rewrite_in_place(root / "step1000" / "model.safetensors", root / "step3000" / "model.safetensors")
    _, res = average([str(root)], options=Options(**{**opts.__dict__, "resume": True}), output=out)
    assert res.resumed_shards == [] and any("changed since the interrupted run" in w for w in res.warnings)
    fresh = tmp_path / "fresh"
    average([str(root)], options=opts, output=fresh)
    names = sorted(p.name for p in fresh.glob("*.safetensors"))
    assert names == sorted(p.name for p in out.glob("*.safetensors")) and len(names) > 1
    assert all((out / n).read_bytes() == (fresh / n).read_bytes() for n in names)


# -- --dtype overflow in a tensor identical in every input --------------------------------------

def overflow_run(root: Path) -> dict:
    sds = []
    for i, step in enumerate((1000, 2000, 3000)):
        sd = {"w": torch.linspace(-1, 1, 300) + i, "big": torch.tensor([1.0, 1e5, -2.5e5, 7.0]),
              "fits": torch.tensor([1.0, 60000.0, -3.0])}
        synth.save_checkpoint(root / f"step{step}", sd, config={"model_type": "gpt_neox"})
        sds.append(sd)
    return sds


@pytest.mark.parametrize("kernel", PATHS + ["stream"])
def test_dtype_overflow_of_a_copied_tensor(tmp_path, kernel):
    root = tmp_path / "run"
    sds = overflow_run(root)
    out = tmp_path / "merged"
    if kernel == "stream":
        with pytest.raises(TensorError, match="tensor 'big': the weighted sum overflows float16"):
            run_stream(list(prepare([str(root)]).sources), Options(dtype="float16"), out)
        no_output(out)
        return
    env = {"MERGER_KERNEL": "torch"} if kernel == "torch" else {}
    before = tree_digest(root)
    r = runner.invoke(app, ["average", str(root), "--dtype", "float16", "-o", str(out)], env=env)
    check_refused(r.exit_code, r.stderr, r.output, ["tensor 'big': the weighted sum overflows float16",
                                                    "wider --dtype"], out=out, inputs=root, before=before)
    # --allow-nonfinite keeps the Inf (as for averaged tensors); 'fits' is copied exactly
    r = runner.invoke(app, ["average", str(root), "--dtype", "float16", "--allow-nonfinite", "-o", str(out)],
                      env=env)
    assert r.exit_code == 0, r.output
    got = load_file(str(out / "model.safetensors"))
    assert torch.equal(got["big"], sds[0]["big"].half()) and torch.isinf(got["big"][1:3]).all()
    assert torch.equal(got["fits"], torch.tensor([1.0, 60000.0, -3.0], dtype=torch.float16))


# -- non-regular files ------------------------------------------------------------------------------

def run_cli(args: list[str], *, timeout: float = 60, preexec=None) -> subprocess.CompletedProcess:
    """``python -m merger ARGS`` in a subprocess: a hang fails the test instead of blocking it."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        return subprocess.run([sys.executable, "-m", "merger", *args], capture_output=True, text=True,
                              timeout=timeout, env=env, preexec_fn=preexec)
    except subprocess.TimeoutExpired:
        pytest.fail(f"merger {' '.join(args)} blocked for {timeout} s")


@pytest.mark.parametrize("what", ["weights-fifo", "index-fifo", "config-fifo", "weights-folder"])
def test_non_regular_input_files_are_refused_without_blocking(tmp_path, what):
    traj = Trajectory(tmp_path, max_shard_size=100_000 if what == "index-fifo" else None)
    rev = traj.root / "step2000"
    name = {"weights-fifo": "model.safetensors", "index-fifo": "model.safetensors.index.json",
            "config-fifo": "config.json", "weights-folder": "model.safetensors"}[what]
    if what == "config-fifo":
        rev = traj.root / "step3000"  # side files come from the latest revision
    (rev / name).unlink()
    if what == "weights-folder":
        (rev / name).mkdir()
        (rev / name / "x").write_text("x")
    else:
        os.mkfifo(rev / name)
    kind = "a folder" if what == "weights-folder" else "a FIFO (named pipe)"
    before = tree_digest(traj.inputs)
    r = run_cli(["average", str(traj.root), "-o", str(traj.out)])
    check_refused(r.returncode, r.stderr, r.stdout + r.stderr, [f"{rev / name}: this ", f"is {kind}, not a "
                  "regular file", "merger reads only regular files"], out=traj.out, inputs=traj.inputs, before=before)


FD_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys
    from typer.testing import CliRunner
    from merger.cli import app
    import merger.engine.native_pipeline, merger.formats.hf_folder  # imported before counting
    root, out = sys.argv[1], sys.argv[2]
    CliRunner().invoke(app, ["average", root, "--dry-run"])  # warm every lazy import
    fds = lambda: sorted(os.listdir("/proc/self/fd"))
    before = fds()
    soft = len(before) + 12  # room for the plan's one-at-a-time header reads, not for 36 files at once
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    r = CliRunner().invoke(app, ["average", root, "-o", out])
    print(json.dumps({"code": r.exit_code, "stderr": r.stderr, "output": r.output, "soft": soft,
                      "before": before, "after": fds()}))
""")


def test_more_input_files_than_the_open_file_limit(tmp_path):
    traj = Trajectory(tmp_path, max_shard_size=30_000)
    n_files = len(list(traj.root.glob("*/*.safetensors")))
    assert n_files >= 30
    before = tree_digest(traj.inputs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", FD_SCRIPT, str(traj.root), str(traj.out)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.splitlines()[-1])
    err = check_refused(d["code"], d["stderr"], d["output"], [
        f"this merge reads {n_files} input files at once, more than the open-file limit allows "
        f"(ulimit -n: {d['soft']})", f"ulimit -n {n_files + 64}"], out=traj.out, inputs=traj.inputs, before=before)
    assert "disk space" not in err
    assert d["after"] == d["before"], "file descriptors leaked"


def test_every_1_over_a_huge_range_answers_at_once(tmp_path):
    """10 billion wanted steps: refused by counting them, not by listing them (within 1 GiB of address space)."""
    traj = Trajectory(tmp_path)

    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, resource.RLIM_INFINITY))

    before = tree_digest(traj.inputs)
    r = run_cli(["average", str(traj.root), "-r", "step100..step10000000000", "--every", "1", "-o",
                 str(traj.out)], timeout=60, preexec=small_memory)
    check_refused(r.returncode, r.stderr, r.stdout + r.stderr,
                  ["revision for step 100 not found", "(and 9999999897 more: 101, 102, 103, 104, 105...)",
                   "nearest existing revisions: step1000"], out=traj.out, inputs=traj.inputs, before=before)
    r = run_cli(["average", str(traj.root), "-r", "step1000..step3000", "--every", "1000", "--dry-run", "--json"])
    assert [i["name"] for i in json.loads(r.stdout)["inputs"]] == ["step1000", "step2000", "step3000"]


DCP_WRITER = textwrap.dedent("""
    import sys, torch, torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    for s in range(1, 4):  # torch's writer, 4 threads: 4 .distcp files a revision
        g = torch.Generator().manual_seed(s)
        sd = {"model": {f"w{i}": torch.randn(8, 4, generator=g) for i in range(4)}, "optim": {"lr": torch.tensor(0.1)}}
        dcp.save(sd, storage_writer=FileSystemWriter(f"{sys.argv[1]}/step-{s}", thread_count=4), no_dist=True)
""")


@pytest.mark.slow  # DCP runs written by torch under torchrun (~3 s each)
@pytest.mark.parametrize("room", [3, 8])
def test_open_file_limit_counts_every_dcp_rank_file(tmp_path, room):
    """3 DCP revisions of 4 .distcp files each: the merge opens the 12 at once. With room for 3
    files, reading one revision (4 at once) runs out; with room for 8, the merge does. Either way
    the message counts the 12 (it said 1 while a revision was read)."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-c", DCP_WRITER, str(run)], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr
    files = sorted(run.glob("*/*.distcp"))
    assert len(files) == 12
    script = FD_SCRIPT.replace("len(before) + 12", f"len(before) + {room}")
    before = tree_digest(run)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", script, str(run), str(out)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.splitlines()[-1])
    check_refused(d["code"], d["stderr"], d["output"], [
        "this merge reads 12 input files at once, more than the open-file limit allows "
        f"(ulimit -n: {d['soft']})", "ulimit -n 76"], out=out, inputs=run, before=before)
    assert d["after"] == d["before"], "file descriptors leaked"
