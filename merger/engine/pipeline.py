"""The pipeline of one *blocks* run: block b is folded while block b-1 is written.

This module holds what both pipelines share (resume points, the writer thread, coordination);
``choose.py`` picks one of them:

``native_pipeline.NativePipeline`` (the CPU default, no torch):

    fold (threads)    : the native kernel reads and folds the slices of block b, in parallel
    writer (thread)   : block b-1's output pages go to the shards

``torch_pipeline.TorchPipeline`` (CUDA, ``--hash``, ``MERGER_KERNEL=torch``, CPUs without AVX2):

    reader (threads)  : pread every input's bytes of block b+1 into a free buffer set (+ sha256)
    kernel (this one) : fold block b (CPU chunks, or copy to the GPU and fold there)
    writer (thread)   : pwrite block b-1's output bytes into the shards

Output buffers circulate (three for native; two, and two input buffer sets, for torch), so the
working set is at most what the plan counted against ``--max-memory``. An error in any thread
stops all of them and is raised in the calling thread. Both give the same bits
(tests/fold/test_native.py). ``run.run`` owns the output folder, resuming and the manifest.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from merger.device import usable_cpus
from merger.errors import MergerError
from merger.formats.inputs import check_identity, open_inputs
from merger.output.shards import ShardWriter, open_shard, shard_header
from merger.plan import Plan

STOP = object()  # the end of a queue's items


class Pipeline:
    """Fold -> writer over the plan's blocks; subclasses say how a block is read and folded.

    Args:
        done: the first ``done`` shards are finished (by an interrupted run, verified): nothing is
            written into them, and the blocks that write only into them are skipped.
        state: with ``done``, the kernel state recorded with shard ``done - 1``.
        on_shard: called from the writer thread with (shard index, checksum, kernel state) once a
            shard is complete and closed; the state is what a resume after it must restore.
        owned: the shards this run writes (one rank's share, ``engine/ranked.py``; default all);
            ``plan.blocks`` must then hold only their slices.
    """

    name = "blocks"

    def __init__(self, plan: Plan, tmp: Path, progress: Callable[[int], None] | None, threads: int | None, *,
                 label: str = "", done: int = 0, state: dict | None = None,
                 on_shard: Callable[[int, str, dict], None] | None = None, owned: frozenset[int] | None = None):
        self.plan, self.tmp, self.progress = plan, tmp, progress or (lambda n: None)
        self.label = label or str(tmp)
        self.n = len(plan.sources)
        # input bytes each block folds (every input's slices), for progress and Result.read_bytes
        self.block_read = [sum(plan.tensors[s.tensor].read_nbytes(self.n, s.stop - s.start) for s in blk)
                           for blk in plan.blocks]
        self.done = done
        self.on_shard = on_shard or (lambda i, checksum, state: None)
        self.remaining = {i: sp.data_bytes for i, sp in enumerate(plan.shards)
                          if i >= done and (owned is None or i in owned)}
        self.read_bytes = 0
        self.to_write: queue.Queue = queue.Queue(maxsize=2)
        self.free_out: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.abort = threading.Event()
        paths = sorted({p for t in plan.tensors for p in t.files})
        self.fds: dict[str, int] = {}  # opened last, below: nothing else here can leave them open
        self.hashers: dict = {}  # input path -> formats.reading.FileHasher (torch pipeline with --hash)
        self.threads = threads or self.default_threads(plan)
        self.kernel = self._make_kernel()
        self.headers = [shard_header(plan, k) for k in range(len(plan.shards))]
        self.writers: dict[int, ShardWriter] = {}
        self.busy = {"fold": 0.0, "write": 0.0}

        # Resume points. Shard k's last byte is written in block last[k]; the kernel state (which
        # tensors were copied, which inputs duplicate their predecessor) that a run resuming after
        # shard k restores is the one after block settled[k], the last block writing only into
        # shards <= k. Blocks come in output order, so settled[k] >= last[k] - 1.
        last: dict[int, int] = {}
        for b, block in enumerate(plan.blocks):
            for sl in block:
                last[plan.tensors[sl.tensor].shard] = b
        self.settled = {k: b - 1 if any(plan.tensors[sl.tensor].shard > k for sl in plan.blocks[b]) else b
                        for k, b in last.items()}
        skip = self.settled[done - 1] if done else -1
        self.todo = range(skip + 1, len(plan.blocks))
        if skip >= 0:
            self._restore(state, skip)
        self.snapshots = {skip: self._kernel_state()}  # block -> kernel state after it (main thread writes)
        self.snap_at = set(self.settled.values())
        self.planned = dict(plan.identities)  # each input file as the plan saw it: verified now and after reading
        self.fds = open_inputs(paths, what="weights file")
        try:
            check_identity(self.fds, self.planned, when="between planning and reading")
        except BaseException:
            self.close()
            raise

    # -- what subclasses define ---------------------------------------------------------------
    @staticmethod
    def default_threads(plan: Plan) -> int:
        return max(1, min(usable_cpus(), 16))

    @classmethod
    def working_set(cls, plan: Plan) -> int:
        """Bytes of buffers a run of ``plan`` holds (what ``--dry-run`` shows)."""
        raise NotImplementedError

    def _make_kernel(self):
        raise NotImplementedError

    def _blocks(self) -> Iterator[tuple[int, object]]:
        """(block index, its input) in order; the input is what :meth:`fold_block` needs."""
        return ((b, None) for b in self.todo)

    def fold_block(self, b: int, inputs, out) -> None:
        raise NotImplementedError

    def _start(self) -> None:
        """Start helper threads (after the writer)."""

    def _stop(self) -> None:
        """Join helper threads (the abort event is set)."""

    def _release(self, inputs) -> None:
        """A block's input is folded: its buffers can be reused."""

    # -- resume state -------------------------------------------------------------------------
    def _kernel_state(self) -> dict:
        k = self.kernel
        return {"copied": [n for n, c in k.copied.items() if c], "same_as_prev": list(k.same_as_prev)}

    def _restore(self, state: dict, upto: int) -> None:
        """Set the kernel as if it had folded blocks 0..upto (whose outputs are already written)."""
        copied = set(state["copied"])
        for b in range(upto + 1):
            for sl in self.plan.blocks[b]:
                name = self.plan.tensors[sl.tensor].name
                self.kernel.copied.setdefault(name, name in copied)
        self.kernel.same_as_prev = list(state["same_as_prev"])

    # -- writing -----------------------------------------------------------------------------
    def writer(self) -> None:
        """The writer thread: each folded block's output into the shards, then its buffer back."""
        raise NotImplementedError

    def _shard_written(self, shard: int, n: int, before_finish: Callable[[], None] = lambda: None) -> None:
        """``n`` more bytes of ``shard`` are written; after its last one (and ``before_finish``),
        close it and record it for a resume."""
        self.remaining[shard] -= n
        if self.remaining[shard] == 0:
            self.remaining[shard] = -1
            before_finish()
            checksum = self.writers[shard].finish()
            self.on_shard(shard, checksum, self.snapshots[self.settled[shard]])

    def _writer(self, shard: int) -> ShardWriter:
        if shard not in self.writers:
            sp = self.plan.shards[shard]
            self.writers[shard] = open_shard(self.plan, shard, self.tmp, label=f"{sp.filename} of {self.label}",
                                             hash=True)
        return self.writers[shard]

    # -- coordination ---------------------------------------------------------------------------
    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        self.abort.set()

    def _get(self, q: queue.Queue):
        while not self.abort.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _put(self, q: queue.Queue, item, force: bool = False) -> None:
        while True:
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.abort.is_set() and not force:
                    return
                if self.abort.is_set():
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass

    def run(self) -> None:
        writer = threading.Thread(target=self.writer, name="merger-writer", daemon=True)
        for b in range(self.todo.start):  # resumed: count as done
            self.progress(self.block_read[b])
        writer.start()
        self._start()
        try:
            for b, inputs in self._blocks():
                out = self._get(self.free_out)
                if out is None:
                    break
                t0 = time.perf_counter()
                self.fold_block(b, inputs, out)
                if b in self.snap_at:
                    self.snapshots[b] = self._kernel_state()
                self.busy["fold"] += time.perf_counter() - t0
                self._release(inputs)
                self._put(self.to_write, (b, out))
                self.read_bytes += self.block_read[b]
                self.progress(self.block_read[b])
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        finally:
            if self.error is None:
                self._put(self.to_write, STOP)
            else:
                self.abort.set()
            writer.join()
            self.abort.set()
            self._stop()
        if self.error is not None:
            raise self.error
        check_identity(self.fds, self.planned, when="while it was being read")
        for i, left in self.remaining.items():  # every shard is finished by its last write; a guard
            if left != -1:
                raise MergerError(f"internal error: {self.plan.shards[i].filename} is incomplete "
                                  f"({left} bytes missing)", hint="report this with the --dry-run --json plan")

    def close(self) -> None:
        for w in self.writers.values():
            w.abandon()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
