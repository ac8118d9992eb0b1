"""A rank never joins another launch's merge (engine/ranks.py, "One launch, one merge").

Real processes with the environment srun gives (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/
``MASTER_PORT``), two launches sharing one port: launch A's rank 0 starts and waits; a rank 1 of
launch B (another output, so another command line) arrives on the same port and is refused with a
clear error, writing nothing into A's store; then A's own rank 1 joins and A publishes the bytes of
a single process. A second process claiming a taken rank is refused (checked on a real TCPStore in
one process), and a rank 0 whose peer never comes gives up within ``MERGER_START_TIMEOUT``, saying
what it waited for.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import files_equal, make_run
from merger.engine.launch import launch_identity
from merger.testing import synth

REPO = Path(__file__).resolve().parents[2]
SHAPE = synth.Shape(hidden=64, layers=2, heads=4, vocab=512, max_pos=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank(r: int, size: int, port: int, args, **extra) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_JOB_ID",
                                                            "TORCHELASTIC_RUN_ID", "MERGER_SIZES")}
    env.update(PYTHONPATH=str(REPO), RANK=str(r), WORLD_SIZE=str(size), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), MERGER_RANK_TIMEOUT="5", OMP_NUM_THREADS="1", **extra)
    return subprocess.Popen([sys.executable, "-m", "merger", "average", *map(str, args)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_launch(port: int, timeout: float = 120) -> None:
    """Until rank 0 has published its launch record: the stranger then meets a merge that is
    running, and the test sees it leave that merge alone."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.PrefixStore("merger/0/", dist.TCPStore("127.0.0.1", port, 2, is_master=False,
                                                        timeout=timedelta(seconds=timeout)))
    end = time.monotonic() + timeout
    while not store.check(["launch"]):
        assert time.monotonic() < end, "rank 0 never published its launch record"
        time.sleep(0.05)


def test_identity_differs_between_launches(monkeypatch):
    a = launch_identity({"MASTER_PORT": "1"}, ["average", "run", "-o", "a"])
    assert a == launch_identity({"MASTER_PORT": "1"}, ["average", "run", "-o", "a"])
    assert a != launch_identity({"MASTER_PORT": "1"}, ["average", "run", "-o", "b"])
    assert a != launch_identity({"MASTER_PORT": "1", "SLURM_JOB_ID": "7"}, ["average", "run", "-o", "a"])


@pytest.mark.slow  # merger processes with torch.distributed (~5-8 s)
def test_a_stranger_sharing_the_port_is_refused_and_the_merge_goes_on(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE)
    one = subprocess.run([sys.executable, "-m", "merger", "average", str(root), "-o", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert one.returncode == 0, one.stderr
    port = free_port()
    a0 = rank(0, 2, port, [root, "-o", tmp_path / "a"])
    procs = [a0]
    try:
        wait_for_launch(port)
        b1 = rank(1, 2, port, [root, "-o", tmp_path / "b"])  # launch B's rank 1: same port, another command
        procs.append(b1)
        _, err = b1.communicate(timeout=120)
        assert b1.returncode == 1, err
        assert "belongs to another launch" in err and "MASTER_PORT" in err and "Traceback" not in err
        assert a0.poll() is None, "launch A stopped because of a stranger"
        a1 = rank(1, 2, port, [root, "-o", tmp_path / "a"])
        procs.append(a1)
        outs = [p.communicate(timeout=180) for p in (a0, a1)]
        assert [a0.returncode, a1.returncode] == [0, 0], outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert files_equal(tmp_path / "one", tmp_path / "a") and not (tmp_path / "b").exists()


def test_a_rank_taken_twice_and_a_stranger_are_refused_at_the_store(monkeypatch):
    """launch.join on a real TCPStore: rank 0 publishes the launch, rank 1 claims its number, a second
    process claiming rank 1 is refused, and so is a rank of another command line. (In processes,
    which duplicate wins is a race, and the loser may only arrive once the merge is over and the
    store gone: then it waits MERGER_START_TIMEOUT for it, so this is checked here, in one process.)"""
    from datetime import timedelta

    import torch.distributed as dist

    from merger.engine.launch import join
    from merger.engine.ranks import World
    from merger.errors import RankError

    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, 2, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False)
    store = dist.PrefixStore("merger/0/", master)
    world = lambda r: World(rank=r, size=2, addr="127.0.0.1", port=port)  # noqa: E731
    monkeypatch.setattr(sys, "argv", ["merger", "average", "run", "-o", "a"])
    join(store, world(0), 5)
    join(store, world(1), 5)
    with pytest.raises(RankError, match="rank 1 of this launch is already taken"):
        join(store, world(1), 5)
    monkeypatch.setattr(sys, "argv", ["merger", "average", "run", "-o", "b"])
    with pytest.raises(RankError, match="belongs to another launch"):
        join(store, world(1), 5)
    with pytest.raises(RankError, match="belongs to another launch"):  # a rank 0 of another launch, too
        join(store, world(0), 5)


@pytest.mark.slow  # merger processes with torch.distributed (~5-8 s)
def test_a_rank_alone_gives_up_saying_what_it_waited_for(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE)
    t0 = time.monotonic()
    p = rank(0, 2, free_port(), [root, "-o", tmp_path / "out"], MERGER_START_TIMEOUT="3")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and time.monotonic() - t0 < 60
    assert "waited 3 s for every rank to start; only 1 of 2 arrived" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
