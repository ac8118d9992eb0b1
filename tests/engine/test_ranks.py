"""``merger average`` on several ranks: the same bytes as one process, for any world size.

In-process: the launcher environment, the partition, and every rank's share folded by the real
pipelines into one folder (both kernels, safetensors and .bin): the bytes of a single run.

Real processes (gloo over loopback, free ports): ``python -m merger average`` started once per rank
with the environment srun gives (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``), and one real ``torchrun --standalone`` launch. They check: identical bytes with 2
and 3 ranks and ``merger.json``'s ``world_size``/``ranks``; a rank frozen then SIGKILLed mid-run
(after rank 0 has finished a shard, so rank 1 is still folding or waiting for rank 0) stops
rank 0 within seconds with an error naming rank 1, nothing published, and ``--resume`` on three
ranks keeps the finished shards that verify (one is damaged on purpose) and gives the same bytes
(a single process resuming per-rank records is checked in-process); NaN in one rank's share, or a
rank that can't read the headers: every rank exits 1 with that error; a second launch on a locked
output: the lock error on every rank; Hub revisions downloaded once; no process left behind.
Launches cost a few seconds each (torch.distributed's import), so there are few of them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from helpers import fakehub
import pytest
from safetensors.torch import save_file

from helpers import files_equal, make_run
from merger.api import prepare
from merger.engine.choose import choose
from merger.engine.parts import join_parts, split_single
from merger.engine.ranked import describe_partition, partition, subplan
from merger.engine.ranks import detect
from merger.errors import UsageError
from merger.plan import Options, build
from merger.sources import resolve
from merger.testing import synth

REPO = Path(__file__).resolve().parents[2]
fake_hub = fakehub.fake_hub  # the fixture, used by name
SHAPE = synth.Shape(hidden=128, layers=4, heads=4, vocab=4096, max_pos=64)
FLAGS = ["--max-shard-size", "60KB", "--max-memory", "8MB"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")}
    env.update(PYTHONPATH=str(REPO), MERGER_RANK_TIMEOUT="4", OMP_NUM_THREADS="1", **extra)
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "merger", "average", *map(str, args)]


def launch(size: int, args, *, extra=None, nice: int = 0, rank_env=None) -> list[subprocess.Popen]:
    """One process per rank, as srun starts them (the same command line; ``rank_env``: rank -> its own
    environment variables; ``nice``: a lower CPU priority than the test's, which then
    reacts first)."""
    port = free_port()
    envs = [env_for(RANK=str(r), WORLD_SIZE=str(size), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port), **(extra or {}), **(rank_env or {}).get(r, {})) for r in range(size)]
    return [subprocess.Popen(cli(*args), env=envs[r], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=lambda: os.nice(nice))
            for r in range(size)]


def finish(procs, timeout=120) -> list[tuple[int, str, str]]:
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:  # no process left behind, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def single(args, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), env=env_for(**extra), capture_output=True, text=True, timeout=120, cwd=REPO)


def same_output(a: Path, b: Path) -> None:
    assert files_equal(a, b), "shards differ"
    assert (a / "model.safetensors.index.json").read_bytes() == (b / "model.safetensors.index.json").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


# -- in-process ------------------------------------------------------------------------------------
def test_detect_reads_torchrun_and_slurm():
    assert detect({}) is None
    assert detect({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a world of one: today's path
    w = detect({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "n1",
                "MASTER_PORT": "29500"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.addr, w.port, w.launcher) == \
        (2, 4, 0, 2, "n1", 29500, "torchrun")
    w = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
                "MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.launcher) == (5, 8, 1, 4, "slurm")
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) is None  # an sbatch script, not srun
    with pytest.raises(UsageError, match="MASTER_ADDR"):
        detect({"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(UsageError, match="outside"):
        detect({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "x", "MASTER_PORT": "1"})


def same_tensors_as_dcp(plan, folder: Path, ref: Path) -> None:
    """``folder``'s .distcp files, given their ``.metadata``, hold exactly the tensors of the
    safetensors output ``ref`` of the same merge (read with torch's own DCP reader)."""
    import warnings

    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from merger.output import dcp

    dcp.write(folder, plan)
    want = {k: v for f in sorted(ref.glob("*.safetensors")) for k, v in load_file(f).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _load_state_dict_from_keys(checkpoint_id=str(folder))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("fmt,kernel,to", [("safetensors", "native", None), ("bin", "torch", None),
                                           ("safetensors", "native", "dcp"), ("bin", "torch", "dcp")])
@pytest.mark.parametrize("size", [2, 3])
def test_shares_fold_to_the_single_process_bytes(tmp_path, monkeypatch, fmt, kernel, to, size):
    """Also for DCP output (``--to dcp``): records framed by the shard writer, several .distcp files."""
    root, _ = make_run(tmp_path / "run", shape=SHAPE, fmt=fmt)
    monkeypatch.setenv("MERGER_KERNEL", kernel)
    opts = Options(max_shard_size=60_000, max_memory=5 << 20, to=to)
    plan = build(resolve([str(root)], "step1000..step3000", None), opts)
    assert len(plan.shards) >= 6 and len(plan.blocks) >= 3
    ref = tmp_path / "ref"
    ref.mkdir()
    pipe = choose(plan)(plan, ref, None, None)
    pipe.run()
    pipe.close()
    assert pipe.name == kernel
    parts = partition(plan, size)
    assert sorted(k for p in parts for k in p) == list(range(len(plan.shards)))  # each shard exactly once
    cost = [d["read_bytes"] for d in describe_partition(plan, size)]
    biggest = max(sum(plan.tensors[i].numel * plan.tensors[i].itemsize for i in sp.tensors) for sp in plan.shards)
    assert max(cost) - min(cost) <= biggest * len(plan.sources)  # balanced within one shard
    out = tmp_path / "out"
    out.mkdir()
    done = []
    for r in range(size):  # each rank's share, into the same folder
        owned = frozenset(parts[r])
        p = choose(plan)(subplan(plan, set(owned)), out, None, None, owned=owned,
                         on_shard=lambda i, c, s: done.append(i))
        p.run()
        p.close()
        assert p.read_bytes == cost[r]
    assert sorted(done) == list(range(len(plan.shards)))
    assert files_equal(ref, out)
    if to == "dcp":
        st = build(plan.sources, replace(opts, to=None))
        sref = tmp_path / "st"
        sref.mkdir()
        pipe = choose(st)(st, sref, None, None)
        pipe.run()
        pipe.close()
        same_tensors_as_dcp(plan, out, sref)


@pytest.mark.parametrize("kernel,to", [("native", None), ("torch", None), ("native", "dcp"), ("torch", "dcp")])
def test_single_file_output_cut_into_parts_and_joined(tmp_path, monkeypatch, kernel, to):
    """Also a single .distcp file (``--to dcp``), cut between its records."""
    root, _ = make_run(tmp_path / "run", shape=SHAPE)
    monkeypatch.setenv("MERGER_KERNEL", kernel)
    plan = build(resolve([str(root)], "step1000..step3000", None), Options(max_memory=5 << 20, to=to))
    assert len(plan.shards) == 1
    ref = tmp_path / "ref"
    ref.mkdir()
    pipe = choose(plan)(plan, ref, None, None)
    pipe.run()
    pipe.close()
    work = split_single(plan, part_bytes=100_000)
    assert len(work.shards) >= 5 and split_single(plan) is not plan  # the default: one part for this size
    assert sorted(i for sp in work.shards for i in sp.tensors) == list(range(len(plan.tensors)))
    out = tmp_path / "out"
    out.mkdir()
    for part in partition(work, 3):  # three ranks' shares, into one folder
        p = choose(work)(subplan(work, set(part)), out, None, None, owned=frozenset(part))
        p.run()
        p.close()
    join_parts(plan, work, out)
    name = plan.shards[0].filename
    assert [f.name for f in out.iterdir()] == [name] == [f.name for f in ref.iterdir()]
    assert (out / name).read_bytes() == (ref / name).read_bytes()


def test_partition_spreads_few_shards_over_nodes(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE)
    plan = build(resolve([str(root)], "step1000..step3000", None), Options(max_shard_size=1 << 20))
    assert len(plan.shards) == 4
    parts = partition(plan, 8, per_node=4)  # 2 nodes x 4 ranks, 4 shards
    on_node = [sum(len(parts[r]) for r in range(n * 4, n * 4 + 4)) for n in range(2)]
    assert on_node == [2, 2]  # not all four on node 0's ranks
    assert sorted(len(p) for p in partition(plan, 8)) == [0, 0, 0, 0, 1, 1, 1, 1]
    rest = partition(plan, 2, skip={plan.shards[0].filename})
    assert sorted(k for p in rest for k in p) == [1, 2, 3]


# -- real processes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root, _ = make_run(tmp_path_factory.mktemp("ranks") / "run", shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def reference(run_dir):
    out = run_dir.parent / "single"
    r = single([run_dir, "--revisions", "step1000..step3000", "-o", out, *FLAGS])
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_dry_run_prints_the_partition_from_rank_0(run_dir):
    extra = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    r = single([run_dir, "--revisions", "step1000..step3000", "--dry-run", "--json", *FLAGS], **extra)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["world_size"] == 3 and [p["rank"] for p in d["partition"]] == [0, 1, 2]
    assert sorted(f for p in d["partition"] for f in p["shards"]) == [s["file"] for s in d["shards"]]
    assert sum(p["read_bytes"] for p in d["partition"]) == d["read_bytes"]
    r = single([run_dir, "--revisions", "step1000..step3000", "--dry-run", *FLAGS], **dict(extra, RANK="1"))
    assert r.returncode == 0 and r.stdout == ""  # only rank 0 prints


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_two_ranks_same_bytes_and_merger_json(run_dir, reference):
    out = run_dir.parent / "two"
    res = finish(launch(2, [run_dir, "--revisions", "step1000..step3000", "-o", out, *FLAGS, "--json"]))
    assert [c for c, _, _ in res] == [0, 0], [e for _, _, e in res]
    same_output(reference, out)
    m = json.loads((out / "merger.json").read_text())
    assert m["world_size"] == 2 and [r["rank"] for r in m["ranks"]] == [0, 1]
    assert all(r["shards"] and r["read_bytes"] > 0 and r["peak_rss"] > 0 for r in m["ranks"])
    assert sum(r["read_bytes"] for r in m["ranks"]) == m["read_bytes"] == json.loads(res[0][1])["result"]["read_bytes"]
    assert res[1][1] == ""  # rank 1 prints no result
    assert not any(out.parent.glob(".two.merger-partial*"))


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_torchrun_three_ranks_bin_inputs_torch_kernel_same_bytes(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE, fmt="bin")
    args = [root, "--revisions", "step1000..step3000", *FLAGS]
    ref = single([*args, "-o", tmp_path / "ref"])  # one process, the native kernel
    assert ref.returncode == 0, ref.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "three"
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "3", "-m", "merger", "average",
                        *map(str, args), "-o", str(out)],
                       env=env_for(MERGER_KERNEL="torch"), capture_output=True, text=True, timeout=180, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    same_output(tmp_path / "ref", out)
    m = json.loads((out / "merger.json").read_text())
    assert m["world_size"] == 3 and m["kernel"] == "torch" and len(m["ranks"]) == 3


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_nan_in_one_ranks_share_stops_every_rank(tmp_path):
    root, sds = make_run(tmp_path / "run", shape=SHAPE)
    opts = Options(max_shard_size=60_000, max_memory=8 << 20)
    plan = prepare([str(root)], revisions="step1000..step3000", options=opts).plan
    k = partition(plan, 2)[1][0]  # rank 1's first shard
    name = next(plan.tensors[i].name for i in plan.shards[k].tensors if plan.tensors[i].averaged)
    sd = dict(sds[1])
    sd[name] = sd[name].clone()
    sd[name].view(-1)[3] = float("nan")
    save_file(sd, str(root / "step2000" / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    res = finish(launch(2, [root, "--revisions", "step1000..step3000", "-o", out, *FLAGS]))
    assert [c for c, _, _ in res] == [1, 1]
    assert name in res[1][2] and "step2000" in res[1][2]  # rank 1's own error
    assert "rank 1 of 2 failed" in res[0][2] and name in res[0][2]  # the same, on rank 0
    assert "Traceback" not in res[0][2] + res[1][2]
    assert not out.exists() and not (tmp_path / ".o.merger-partial").exists()


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_a_rank_that_cannot_read_the_headers_stops_the_others_at_once(run_dir, tmp_path):
    """The same command on every rank (a launch: engine/ranks.py), but rank 1's node lacks the run:
    ``~/run`` is the run under rank 0's HOME and nothing under rank 1's."""
    (tmp_path / "home0").mkdir()
    (tmp_path / "home0" / "run").symlink_to(run_dir)
    args = ["~/run", "--revisions", "step1000..step3000", "-o", tmp_path / "o", *FLAGS]
    t0 = time.monotonic()
    res = finish(launch(2, args, rank_env={0: {"HOME": str(tmp_path / "home0")}, 1: {"HOME": str(tmp_path / "home1")}}))
    assert [c for c, _, _ in res] == [1, 1]
    assert "home1" in res[1][2] and "rank 1 of 2 failed" in res[0][2] and "home1" in res[0][2], res[0][2]
    assert time.monotonic() - t0 < 60  # not the 120 s start-up limit
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.merger-partial").exists()


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_second_launch_gets_the_lock_error_on_every_rank(run_dir):
    import fcntl

    out = run_dir.parent / "locked"
    partial = run_dir.parent / ".locked.merger-partial"
    partial.mkdir()
    fd = os.open(partial, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a first launch holds it
    try:
        res = finish(launch(2, [run_dir, "--revisions", "step1000..step3000", "-o", out, *FLAGS]))
    finally:
        os.close(fd)
    assert [c for c, _, _ in res] == [1, 1]
    assert all("another merger run is writing" in e for _, _, e in res), [e for _, _, e in res]
    assert partial.is_dir() and not out.exists()


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_killed_rank_stops_the_others_then_resume_with_another_world_size(tmp_path):
    big = synth.Shape(hidden=256, layers=8, heads=4, vocab=8192, max_pos=64)
    root, _ = make_run(tmp_path / "run", shape=big, steps=(1000, 2000, 3000, 4000))
    flags = ["--max-shard-size", "200KB", "--max-memory", "8MB", "--accumulate", "float64"]  # a slower fold
    args = [root, "--revisions", "step1000..step4000", "-o", tmp_path / "o", *flags]
    ref = single([root, "--revisions", "step1000..step4000", "-o", tmp_path / "ref", *flags])
    assert ref.returncode == 0, ref.stderr
    partial = tmp_path / ".o.merger-partial"
    # the slower kernel, at a lower priority: rank 0's last shards take ~0.5 s after its first, the test reacts in ms
    procs = launch(2, args, extra={"MERGER_KERNEL": "torch"}, nice=10)
    try:
        end = time.monotonic() + 60
        while not (partial / "progress.rank-0.json").exists():  # rank 0 finished a shard: rank 1 is folding
            assert time.monotonic() < end and procs[0].poll() is None, "rank 0 never finished a shard"
            time.sleep(0.005)
        procs[1].send_signal(signal.SIGSTOP)  # frozen at once, then killed: it never reaches the end
        procs[1].kill()
        t0 = time.monotonic()
        code, _, err = finish([procs[0]])[0]
        stopped_in = time.monotonic() - t0
    finally:
        finish(procs)
    assert code == 1 and "rank 1 of 2 stopped responding" in err, err
    assert stopped_in < 20  # MERGER_RANK_TIMEOUT=4 s, plus the rest of its share
    assert not (tmp_path / "o").exists() and partial.is_dir()
    done = sorted(json.loads((partial / "progress.rank-0.json").read_text())["shards"])
    with open(partial / done[0], "r+b") as f:  # damage one finished shard: it must be written again
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    # three ranks resume the two ranks' run: they verify the finished shards (a share each), keep
    # the good ones, and fold the rest
    res = finish(launch(3, [*args, "--resume", "--json"]))
    assert [c for c, _, _ in res] == [0, 0, 0], [e for _, _, e in res]
    result = json.loads(res[0][1])["result"]
    assert set(done[1:]) <= set(result["resumed_shards"]) and done[0] not in result["resumed_shards"]
    assert any(done[0] in w and "failed verification" in w for w in result["warnings"]), result["warnings"]
    assert "progress" not in " ".join(os.listdir(tmp_path / "o"))
    same_output(tmp_path / "ref", tmp_path / "o")


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_a_single_process_resumes_a_multi_rank_run(tmp_path):
    """Per-rank records (here of a world of one, stopped by Ctrl-C from its progress callback once
    a shard is recorded) are found by a plain ``--resume``, which then goes through the multi-rank
    engine with one rank."""
    from merger.api import average
    from merger.engine.ranked import run_ranked
    from merger.engine.ranks import Comm, World

    root, _ = make_run(tmp_path / "run", shape=SHAPE)
    opts = Options(max_shard_size=60_000, max_memory=8 << 20)
    plan = build(resolve([str(root)], "step1000..step3000", None), opts)
    partial = tmp_path / ".o.merger-partial"
    assert len(plan.blocks) >= 3

    def ctrl_c(n: int) -> None:  # Ctrl-C once a shard is recorded
        if (partial / "progress.rank-0.json").exists():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_ranked(plan, tmp_path / "o", Comm(World()), progress=ctrl_c)
    finished = json.loads((partial / "progress.rank-0.json").read_text())["shards"]
    assert finished and not (tmp_path / "o").exists()
    _, result = average([str(root)], revisions="step1000..step3000", options=replace(opts, resume=True),
                        output=tmp_path / "o")
    assert sorted(result.resumed_shards) == sorted(finished)
    _, ref = average([str(root)], revisions="step1000..step3000", options=opts, output=tmp_path / "ref")
    same_output(tmp_path / "ref", tmp_path / "o")


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_hub_revisions_downloaded_once_then_deleted_with_no_keep(fake_hub, tmp_path):
    """Two ranks of one node on Hub revisions (the fake Hub on loopback, real huggingface_hub):
    local rank 0 downloads each file once, rank 1 waits; the single-file output (one part: rank 0
    folds it) is joined; --no-keep deletes the downloads after the last barrier."""
    import hashlib

    from merger.testing.hubcache import repo_folder_name

    shape, sha = synth.SHAPES["tiny"], {}
    for s in (1000, 2000, 3000):
        folder = synth.save_checkpoint(tmp_path / "src" / f"step{s}", synth.pythia_state_dict(shape, seed=5, step=s),
                                       fmt="safetensors", config=shape.config())
        fake_hub.add_revision("org/run", f"step{s}", folder)
        sha[s] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    ref = single([tmp_path / "src", "--revisions", "step1000..step3000", "-o", tmp_path / "ref"])  # one file
    assert ref.returncode == 0, ref.stderr
    hub_env = {"HF_ENDPOINT": fake_hub.url, "HF_HUB_CACHE": str(fake_hub.cache_dir), "HF_HUB_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    out = tmp_path / "out"
    res = finish(launch(2, ["org/run", "--revisions", "step1000..step3000", "-o", out, "--no-keep"], extra=hub_env))
    assert [c for c, _, _ in res] == [0, 0], [e for _, _, e in res]
    assert files_equal(tmp_path / "ref", out) and [f.name for f in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not list(out.glob(".part*"))
    for s in sha.values():
        assert fake_hub.count("GET", f"/cdn-lfs/org/run/{s}/") == 1  # once, by local rank 0
    assert not list((fake_hub.cache_dir / repo_folder_name("org/run")).rglob("*.safetensors"))  # --no-keep


@pytest.mark.slow  # several merger processes (torch.distributed, gloo)
def test_no_process_left_behind():
    me = os.getpid()
    ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
    assert not [line for line in ps if f" {me} " in line and "merger" in line and "average" in line]
