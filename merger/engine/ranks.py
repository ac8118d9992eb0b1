"""One merge on many processes: the world a launcher describes, and how its ranks coordinate.

**The world.** :func:`detect` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (or, under
``srun``, ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` together with ``MASTER_ADDR`` and
``MASTER_PORT``). No such environment, or a world of one, is the single-process path: nothing here
imports torch then.

**Coordination** (:class:`Comm`) runs on torch.distributed: a ``TCPStore`` at
``MASTER_ADDR:MASTER_PORT`` (torchrun's agent store where there is one) and a gloo process group,
so CPU-only clusters work. The merge itself needs few collectives (agree on the plan, take the
partial folder, wait until every rank has folded its share, gather the statistics), but a rank
that dies must never leave the others waiting: so every wait polls the store and a watchdog
thread keeps a heartbeat per rank.

- every rank adds to its heartbeat counter every ``TICK`` seconds; rank 0 watches every rank's,
  the others watch rank 0's. A counter that stands still for ``MERGER_RANK_TIMEOUT`` seconds
  (default 15) means that rank was killed or its node failed;
- the first rank that fails, or that sees a dead one, posts one ``abort`` record (which rank, the
  message, the hint); every rank polls it, stops its pipeline, and raises :class:`RankError`
  with that message, naming the rank;
- a lost connection to the store (rank 0, or the torchrun agent, is gone) stops a rank likewise.

**One launch, one merge.** Two launches that share a ``MASTER_PORT`` (two srun jobs on one node)
would otherwise meet in one store: the second job's rank 1 would pass the first job's barriers and
post its failure there. So before it touches anything in the store, every rank checks the
*launch record* that rank 0 publishes: :func:`merger.engine.launch.launch_identity` (the command line, the working
folder, and the launcher's job ids where there are some: ``SLURM_JOB_ID``/``SLURM_STEP_ID``,
``TORCHELASTIC_RUN_ID``) and a nonce. A rank whose identity differs is a stranger: it stops with
a clear error and writes nothing into that store. Then each rank claims its rank number (a
second process claiming the same rank is refused), and only then counts itself in. A rank that
finds nobody waits at most ``MERGER_START_TIMEOUT`` seconds (default 120), then says what it
waited for.

Collectives on the gloo group (:meth:`Comm.gather`) run only once every rank is known to be
there, under a timeout of the same ``MERGER_RANK_TIMEOUT``.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

from merger.engine.launch import join
from merger.errors import MergerError, RankError, UsageError

TIMEOUT_ENV = "MERGER_RANK_TIMEOUT"
DEFAULT_TIMEOUT = 15.0  # seconds without a heartbeat before a rank counts as dead
START_TIMEOUT = 120.0  # seconds every rank has to reach the coordinator at start-up (MERGER_START_TIMEOUT)
START_ENV = "MERGER_START_TIMEOUT"
TICK = 0.5  # heartbeat period
POLL = 0.05  # how often a wait looks at the store
RANK_PROGRESS = "progress.rank-{}.json"  # each rank's record of the shards it finished (resume.py's format)


@dataclass(frozen=True)
class World:
    """Where this process stands among the merge's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1  # ranks per node (torchrun's LOCAL_WORLD_SIZE); 1 if unknown
    addr: str = "127.0.0.1"
    port: int = 0
    launcher: str = "local"  # torchrun | slurm | local


def detect(env: Mapping[str, str] | None = None) -> World | None:
    """The world from torchrun's or Slurm's environment; None for a single process.

    Raises:
        UsageError: the environment names a world of several ranks but is incomplete or bad.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        keys, launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env:
        keys, launcher = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"), "slurm"
    else:
        return None
    try:
        rank, size = int(env.get(keys[0], "0")), int(env.get(keys[1], "1"))
        local = int(env.get(keys[2], rank))
    except ValueError:
        raise UsageError(f"{keys[0]}={env.get(keys[0])!r}, {keys[1]}={env.get(keys[1])!r}: not whole numbers",
                         hint="launch with torchrun or srun, which set them") from None
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise UsageError(f"{keys[0]}={rank} is outside a world of {size} ranks", hint="launch with torchrun or srun")
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not (port or "").isdigit():
        raise UsageError(f"{keys[1]}={size}, but MASTER_ADDR/MASTER_PORT are not set",
                         hint="export MASTER_ADDR=<first node's host name> and MASTER_PORT=<a free port>")
    per_node = env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or \
        (env.get("SLURM_TASKS_PER_NODE") or "1").split("(")[0].split(",")[0]
    local_size = int(per_node) if per_node.isdigit() and 0 < int(per_node) <= size else 1
    return World(rank=rank, size=size, local_rank=local, local_size=local_size, addr=addr, port=int(port),
                 launcher=launcher)


def rank_device(device: str, world: World | None) -> str:
    """``--device`` for this rank: ``cuda`` (or ``auto`` on a GPU machine) means ``cuda:LOCAL_RANK``."""
    if world is None or device not in ("cuda", "auto"):
        return device
    if device == "auto":
        from merger.device import resolve_device

        if not resolve_device("auto").startswith("cuda"):
            return device
    return f"cuda:{world.local_rank}"


def partial_of(output: str | Path) -> Path:
    """The partial folder of ``output`` (``OutputDir``'s naming)."""
    final = Path(output).expanduser().absolute()
    return final.parent / f".{final.name}.merger-partial"


def has_rank_records(output: str | Path) -> bool:
    """Whether an interrupted multi-rank run of ``output`` left per-rank progress records."""
    return any(partial_of(output).glob(RANK_PROGRESS.format("*")))


def timeout_s() -> float:
    try:
        return max(1.0, float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT)))
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds") from None


def start_timeout_s() -> float:
    try:
        return max(1.0, float(os.environ.get(START_ENV, START_TIMEOUT)))
    except ValueError:
        raise UsageError(f"{START_ENV}={os.environ[START_ENV]!r} is not a number of seconds") from None


_session: Comm | None = None


def connect(world: World) -> Comm:
    """This process's :class:`Comm` for ``world``, connected on first use and kept for the process.

    The CLI connects before it reads any header, so that a rank that fails early (an input its
    node can't read) stops the others at once: with its message where the CLI passes the error to
    :meth:`Comm.fail`, and with a generic one from an exit hook otherwise.
    """
    global _session
    if _session is None or _session.closed:
        _session = Comm(world)
        atexit.register(_session.exit_hook)
        try:  # torchrun ends the other workers with SIGTERM when one dies: stop like Ctrl-C (say so, keep shards)
            signal.signal(signal.SIGTERM, _interrupted)
        except ValueError:  # not the main thread: leave the default
            pass
    return _session


def _interrupted(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Comm:
    """The ranks of one merge, connected (a world of one needs nothing and imports nothing).

    Args:
        world: from :func:`detect`.

    Raises:
        RankError: the coordinator can't be reached, or not every rank arrived in time.
    """

    def __init__(self, world: World):
        self.world, self.rank, self.size = world, world.rank, world.size
        self.timeout = timeout_s()
        self.failure: RankError | None = None
        self.dead: set[int] = set()
        self._listeners: list[Callable[[RankError], None]] = []
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.store = self._wstore = None
        self.closed = self.failed = False
        if self.size > 1:
            self._connect()

    # -- set-up and tear-down ------------------------------------------------------------------
    def _connect(self) -> None:
        import torch.distributed as dist
        from datetime import timedelta

        w = self.world
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"  # torchrun hosts it
        start = timedelta(seconds=start_timeout_s())
        try:
            base = dist.TCPStore(w.addr, w.port, w.size, is_master=self.rank == 0 and not agent, timeout=start,
                                 wait_for_workers=False)
            watch = dist.TCPStore(w.addr, w.port, w.size, is_master=False, timeout=start, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise RankError(f"rank {self.rank} can't reach the coordinator at {w.addr}:{w.port}: {e}", rank=self.rank,
                            hint="check MASTER_ADDR/MASTER_PORT (a free port on rank 0's node)") from None
        prefix = f"merger/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store = dist.PrefixStore(prefix, base)
        try:
            join(store, self.world, start.total_seconds())
        except MergerError:
            raise
        except Exception as e:  # noqa: BLE001 - the store went away while we checked
            raise RankError(f"rank {self.rank} lost the coordinator at {w.addr}:{w.port} at start-up ({e})",
                            rank=self.rank, hint="check that every rank was launched with the same "
                                                 "MASTER_ADDR/MASTER_PORT") from None
        self.store, self._wstore = store, dist.PrefixStore(prefix, watch)
        self._count("start", limit=start.total_seconds(), what="every rank to start")
        dist.init_process_group("gloo", store=dist.PrefixStore(prefix + "pg/", base), rank=self.rank,
                                world_size=self.size, timeout=timedelta(seconds=self.timeout))
        self._watchdog = threading.Thread(target=self._watch, name="merger-watchdog", daemon=True)
        self._watchdog.start()

    def exit_hook(self) -> None:
        """At exit: a rank leaving before the merge finished tells the others (unless it already did)."""
        if not self.closed and self.store is not None:
            self.fail(MergerError(f"rank {self.rank} stopped before the merge finished",
                                  hint=f"see rank {self.rank}'s own error in its log"))
            self.close()

    def close(self) -> None:
        """Stop the watchdog; rank 0 (which may host the store) waits for the others to leave first."""
        self.closed = True
        if self.size == 1 or self.store is None:
            return
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
        try:
            self.store.add("bye", 1)
            if self.rank == 0:  # after a failure, long enough for the others to see the abort record
                end = time.monotonic() + (3 * TICK if self.failed else min(self.timeout, 10.0))
                while self.store.add("bye", 0) < self.size - len(self.dead) and time.monotonic() < end:
                    time.sleep(POLL)
        except Exception:  # noqa: BLE001 - the store is gone: nothing left to tidy
            pass
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = self._wstore = None

    # -- failures ------------------------------------------------------------------------------
    def on_abort(self, fn: Callable[[RankError], None]) -> None:
        """Call ``fn(error)`` (from the watchdog thread) when another rank fails."""
        self._listeners.append(fn)
        if self.failure is not None:
            fn(self.failure)

    def check(self) -> None:
        """Raise the failure of another rank, if one was seen."""
        if self.failure is not None:
            raise self.failure

    def fail(self, e: BaseException) -> None:
        """Tell every rank that this one failed with ``e`` (unless a failure was posted already)."""
        self.failed = True
        if self.size == 1 or self.store is None or isinstance(e, RankError):
            return
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM from the launcher: like a lost rank
            self._post(self.store, {"rank": self.rank, "dead": True, "message": (
                f"rank {self.rank} of {self.size} was interrupted (Ctrl-C or SIGTERM); nothing was published"),
                "hint": "run the same command with --resume (any number of ranks) to keep the shards already finished"})
            return
        message = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        self._post(self.store, {"rank": self.rank, "message": message, "hint": getattr(e, "hint", None)})

    def _post(self, store, rec: dict) -> dict:
        """Post the abort record; returns the one that stands (the first posted)."""
        try:
            return json.loads(store.compare_set("abort", "", json.dumps(rec)))
        except Exception:  # noqa: BLE001
            return rec

    def _abort(self, rec: dict) -> None:
        r = int(rec.get("rank", -1))
        if r == self.rank and not rec.get("dead"):
            return  # our own error: raised where it happened
        if rec.get("dead"):
            self.dead.add(r)
            err = RankError(rec["message"], rank=r, dead=True, hint=rec.get("hint"))
        else:
            err = RankError(f"rank {r} of {self.size} failed: {rec['message']}", rank=r, hint=rec.get("hint"))
        self.failed = True
        if self.failure is None:
            self.failure = err
            for fn in self._listeners:
                fn(err)

    def _watch(self) -> None:
        """The watchdog thread: heartbeat, watch the others', look for an abort record."""
        store, me, seen = self._wstore, f"hb/{self.rank}", {}
        watched = [r for r in range(self.size) if r != self.rank] if self.rank == 0 else [0]
        while not self._stop.wait(TICK):
            try:
                store.add(me, 1)
                if store.check(["abort"]):
                    self._abort(json.loads(store.get("abort")))
                    return
                now = time.monotonic()
                for r in watched:
                    c = store.add(f"hb/{r}", 0)
                    if r not in seen or seen[r][0] != c:
                        seen[r] = (c, now)
                    elif now - seen[r][1] > self.timeout:
                        rec = {"rank": r, "dead": True, "message": (
                            f"rank {r} of {self.size} stopped responding (no heartbeat for {self.timeout:.0f} s): "
                            "it was killed, or its node failed; nothing was published"),
                            "hint": "see that rank's log; then run the same command with --resume (any number "
                                    "of ranks) to keep the shards already finished"}
                        self._abort(self._post(store, rec))
                        return
            except Exception as e:  # noqa: BLE001 - the store went away
                if self._stop.is_set():
                    return
                self._abort({"rank": 0, "dead": True, "message": (
                    f"rank {self.rank} lost the coordinator at {self.world.addr}:{self.world.port} ({e}): "
                    "rank 0 or the launcher stopped; nothing was published"),
                    "hint": "see rank 0's log; then run the same command with --resume"})
                return

    # -- waiting and exchanging ----------------------------------------------------------------
    @contextmanager
    def _store_ops(self) -> Iterator[None]:
        """Store operations of the main thread: a lost store is a RankError, like a dead rank."""
        try:
            yield
        except MergerError:
            raise
        except Exception as e:  # noqa: BLE001 - DistNetworkError, DistStoreError, ...
            self.check()
            raise RankError(f"rank {self.rank} lost the coordinator at {self.world.addr}:{self.world.port} ({e}): "
                            "rank 0 or the launcher stopped; nothing was published", rank=0, dead=True,
                            hint="see rank 0's log; then run the same command with --resume") from None

    def _count(self, key: str, *, limit: float | None = None, what: str = "every rank") -> None:
        """Add one to counter ``key`` and wait until every rank has (a failure ends the wait)."""
        with self._store_ops():
            self._count_unguarded(key, limit, what)

    def _count_unguarded(self, key: str, limit: float | None, what: str) -> None:
        self.store.add(key, 1)
        end = None if limit is None else time.monotonic() + limit
        while self.store.add(key, 0) < self.size:
            self.check()
            if end is not None and time.monotonic() > end:
                raise RankError(f"rank {self.rank} waited {limit:.0f} s for {what}; only "
                                f"{self.store.add(key, 0)} of {self.size} arrived", rank=self.rank,
                                hint="check that every rank was launched, with the same MASTER_ADDR/MASTER_PORT")
            time.sleep(POLL)

    def barrier(self, tag: str) -> None:
        """Wait until every rank got here (or raise the failure of one that won't)."""
        if self.size > 1:
            self._count(f"barrier/{tag}")

    def share(self, tag: str, obj=None):
        """Rank 0's ``obj`` (JSON), on every rank."""
        if self.size == 1:
            return obj
        key = f"share/{tag}"
        with self._store_ops():
            if self.rank == 0:
                self.store.set(key, json.dumps(obj))
                return obj
            while not self.store.check([key]):
                self.check()
                time.sleep(POLL)
            return json.loads(self.store.get(key))

    def exchange(self, tag: str, obj) -> list:
        """Every rank's ``obj`` (JSON), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        with self._store_ops():
            self.store.set(f"ex/{tag}/{self.rank}", json.dumps(obj))
            self.barrier(f"ex/{tag}")
            return [json.loads(self.store.get(f"ex/{tag}/{r}")) for r in range(self.size)]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank: a gloo collective, once every rank
        is known to be here (call after :meth:`barrier`)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            self.check()
            raise RankError(f"gathering the ranks' statistics failed, a rank is gone: {e}", rank=-1, dead=True,
                            hint="see the other ranks' logs; then run the same command with --resume") from None
        return out

    def stopped(self) -> None:
        """Say that this rank has stopped writing (after a failure)."""
        if self.size > 1 and self.store is not None:
            try:
                self.store.add("stopped", 1)
            except Exception:  # noqa: BLE001
                pass

    def wait_stopped(self) -> None:
        """Rank 0, after a failure: wait (bounded) until every live rank stopped writing."""
        if self.size == 1 or self.store is None:
            return
        end = time.monotonic() + self.timeout
        try:
            while self.store.add("stopped", 0) < self.size - len(self.dead) and time.monotonic() < end:
                time.sleep(POLL)
        except Exception:  # noqa: BLE001
            pass
