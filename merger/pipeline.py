"""The pipelines of one *blocks* run: block b is folded while block b-1 is written.

:class:`NativePipeline` (the CPU default, no torch):

    fold (threads)    : the native kernel reads and folds the slices of block b, in parallel
    writer (thread)   : pwrite block b-1's output bytes into the shards

:class:`TorchPipeline` (CUDA, ``--hash``, ``MERGER_KERNEL=torch``, CPUs without AVX2):

    reader (threads)  : pread every input's bytes of block b+1 into a free buffer set (+ sha256)
    kernel (this one) : fold block b (CPU chunks, or copy to the GPU and fold there)
    writer (thread)   : pwrite block b-1's output bytes into the shards

Two output buffers circulate (and, for torch, two input buffer sets), so the working set is at
most what the plan counted against ``--max-memory``. An error in any thread stops all of them and
is raised in the calling thread. Both give the same bits (tests/test_native.py).
``execute.run`` owns the output folder, resuming and the manifest.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from merger.errors import MergerError
from merger.io import FileHasher, pread_into
from merger.shards import DIRECT_ALIGN, ShardWriter, shard_header
from merger.plan import CHUNK, Plan, Slice, TensorPlan

ALIGN = 8  # bytes: each slice starts aligned in the block buffers, so any dtype can view its bytes
_STOP = object()


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset, ``taskset``), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _block_layout(plan: Plan, block: tuple[Slice, ...]) -> list[tuple[Slice, int, int]]:
    """(slice, input byte offset, output byte offset) within the block buffers.

    Offsets are rounded up to ``ALIGN``: after an odd-sized uint8/bool slice, a float16 slice at
    an odd offset couldn't be viewed as float16.
    """
    out, a, b = [], 0, 0
    for s in block:
        t = plan.tensors[s.tensor]
        out.append((s, a, b))
        a += -(-(s.stop - s.start) * t.itemsize // ALIGN) * ALIGN
        b += -(-(s.stop - s.start) * t.out_itemsize // ALIGN) * ALIGN
    return out


def _layout_bytes(plan: Plan, layout) -> tuple[int, int]:
    """Bytes of the (input, output) block buffers that ``layout`` uses."""
    if not layout:
        return 0, 0
    s, a, b = layout[-1]
    t = plan.tensors[s.tensor]
    return a + (s.stop - s.start) * t.itemsize, b + (s.stop - s.start) * t.out_itemsize


def _runs(plan: Plan, layout, i: int) -> list[tuple[str, int, int, int]]:
    """Input ``i``'s reads for a block, coalesced: (path, file offset, buffer offset, nbytes)."""
    runs: list[list] = []
    for s, boff, _ in layout:
        t = plan.tensors[s.tensor]
        path, off = t.locs[i]
        start, n = off + s.start * t.itemsize, (s.stop - s.start) * t.itemsize
        if runs and runs[-1][0] == path and runs[-1][1] + runs[-1][3] == start and runs[-1][2] + runs[-1][3] == boff:
            runs[-1][3] += n
        else:
            runs.append([path, start, boff, n])
    return [tuple(r) for r in runs]


class _Pipeline:
    """Fold -> writer over the plan's blocks; subclasses say how a block is read and folded.

    Args:
        done: the first ``done`` shards are finished (by an interrupted run, verified): nothing is
            written into them, and the blocks that write only into them are skipped.
        state: with ``done``, the kernel state recorded with shard ``done - 1``.
        on_shard: called from the writer thread with (shard index, checksum, kernel state) once a
            shard is complete and closed; the state is what a resume after it must restore.
    """

    name = "blocks"

    def __init__(self, plan: Plan, tmp: Path, progress: Callable[[int], None] | None, threads: int | None, *,
                 label: str = "", done: int = 0, state: dict | None = None,
                 on_shard: Callable[[int, str, dict], None] | None = None):
        self.plan, self.tmp, self.progress = plan, tmp, progress or (lambda n: None)
        self.label = label or str(tmp)
        self.n = len(plan.sources)
        self.layouts = [_block_layout(plan, b) for b in plan.blocks]
        # input bytes each block folds (every input's slices), for progress and Result.read_bytes
        self.block_read = [sum((s.stop - s.start) * plan.tensors[s.tensor].itemsize for s in blk) * self.n
                           for blk in plan.blocks]
        self.done = done
        self.on_shard = on_shard or (lambda i, checksum, state: None)
        self.remaining = {i: sp.data_bytes for i, sp in enumerate(plan.shards) if i >= done}
        self.read_bytes = 0
        self.to_write: queue.Queue = queue.Queue(maxsize=2)
        self.free_out: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.abort = threading.Event()
        paths = sorted({p for t in plan.tensors for p, _ in t.locs})
        self.fds = {p: os.open(p, os.O_RDONLY) for p in paths}
        self.hashers: dict[str, FileHasher] = {}
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

    def out_max(self) -> int:
        """Bytes of the largest block's output."""
        return max((_layout_bytes(self.plan, lay)[1] for lay in self.layouts), default=0)

    # -- what subclasses define ---------------------------------------------------------------
    @staticmethod
    def default_threads(plan: Plan) -> int:
        return max(1, min(usable_cpus(), 16))

    def _make_kernel(self):
        raise NotImplementedError

    def _blocks(self) -> Iterator[tuple[int, object]]:
        """(block index, its input) in order; the input is what :meth:`fold_block` needs."""
        return ((b, None) for b in self.todo)

    def fold_block(self, b: int, inputs, out) -> None:
        raise NotImplementedError

    def _view(self, out) -> memoryview:
        """The bytes of an output buffer."""
        return memoryview(out)

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

    # -- the writer -----------------------------------------------------------------------------
    def writer(self) -> None:
        try:
            while (item := self._get(self.to_write)) is not None and item is not _STOP:
                b, out = item
                t0 = time.perf_counter()
                mv = self._view(out)
                for s, _, ooff in self.layouts[b]:
                    t = self.plan.tensors[s.tensor]
                    if t.shard < self.done:
                        continue
                    n = (s.stop - s.start) * t.out_itemsize
                    self._writer(t.shard).write(mv[ooff: ooff + n], t.out_offset + s.start * t.out_itemsize)
                    self.remaining[t.shard] -= n
                    if self.remaining[t.shard] == 0:  # its last byte: make it durable, record it
                        self.remaining[t.shard] = -1
                        checksum = self.writers[t.shard].finish()
                        self.on_shard(t.shard, checksum, self.snapshots[self.settled[t.shard]])
                self.busy["write"] += time.perf_counter() - t0
                self.free_out.put(out)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _writer(self, shard: int) -> ShardWriter:
        if shard not in self.writers:
            sp = self.plan.shards[shard]
            self.writers[shard] = ShardWriter(self.tmp / sp.filename, self.headers[shard], sp.data_bytes,
                                              label=f"{sp.filename} of {self.label}", hash=True)
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
                self._put(self.to_write, _STOP)
            else:
                self.abort.set()
            writer.join()
            self.abort.set()
            self._stop()
        if self.error is not None:
            raise self.error
        for i, left in self.remaining.items():  # every shard is finished by its last write; a guard
            if left != -1:
                raise MergerError(f"internal error: {self.plan.shards[i].filename} is incomplete "
                                  f"({left} bytes missing)", hint="report this with the --dry-run --json plan")

    def close(self) -> None:
        for w in self.writers.values():
            w.abandon()
        for fd in self.fds.values():
            os.close(fd)


UNIT = 4 * CHUNK  # elements per native call: small enough to balance two threads within a block


class NativePipeline(_Pipeline):
    """The native kernel (``_fold.c``): every thread reads and folds its own slices.

    No input buffers at all: each call preads a few MB of every input at a time into per-thread
    buffers that stay in the CPU caches. Memory is three output buffers, each laid out like the output
    files (one segment per shard a block writes into, at the file position's offset within a
    page), so that the writer sends their whole pages to the disk with O_DIRECT straight from
    them, without a copy (``ShardWriter.write_owned``); a buffer is reused once its writes are done.
    """

    name = "native"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plan = self.plan
        # per block: segments (shard, data offset, buffer offset, bytes), and each slice's buffer offset
        self.segments: list[list[list[int]]] = []
        self.slice_at: list[list[int]] = []
        size = 0
        for block in plan.blocks:
            segs: list[list[int]] = []
            at: list[int] = []
            for s in block:
                t = plan.tensors[s.tensor]
                off = t.out_offset + s.start * t.out_itemsize
                n = (s.stop - s.start) * t.out_itemsize
                if not (segs and segs[-1][0] == t.shard and segs[-1][1] + segs[-1][3] == off):
                    end = segs[-1][2] + segs[-1][3] if segs else 0
                    pos = len(self.headers[t.shard]) + off  # in the file
                    segs.append([t.shard, off, end + (pos - end) % DIRECT_ALIGN, 0])
                at.append(segs[-1][2] + segs[-1][3])
                segs[-1][3] += n
            self.segments.append(segs)
            self.slice_at.append(at)
            size = max(size, segs[-1][2] + segs[-1][3] if segs else 0)
        self.buffers = [mmap.mmap(-1, max(size, 1)) for _ in range(3)]  # one folding, two being written
        self.address = {id(m): ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.buffers}
        for m in self.buffers:
            self.free_out.put(m)
        self.units = [self._units(b) for b in range(len(plan.blocks))]
        self.pool: ThreadPoolExecutor | None = None

    def out_max(self) -> int:
        return len(self.buffers[0])

    def _make_kernel(self):
        from merger.native import NativeKernel

        o = self.plan.options
        return NativeKernel(list(self.plan.weights), [s.name for s in self.plan.sources], accumulate=o.accumulate,
                            allow_nonfinite=o.allow_nonfinite)

    def _units(self, b: int) -> list[tuple[TensorPlan, int, int, list[int], int]]:
        """Block b cut into native calls: (tensor, start, stop, input fds, output buffer offset)."""
        out = []
        for s, at in zip(self.plan.blocks[b], self.slice_at[b]):
            t = self.plan.tensors[s.tensor]
            fds = [self.fds[p] for p, _ in t.locs]
            for a in range(s.start, max(s.stop, s.start + 1), UNIT):  # an empty tensor: one empty call
                out.append((t, a, min(s.stop, a + UNIT), fds, at + (a - s.start) * t.out_itemsize))
        return out

    def _start(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="merger-fold")

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def fold_block(self, b: int, inputs, out: mmap.mmap) -> None:
        base = self.address[id(out)]
        k = self.kernel
        jobs = list(self.pool.map(lambda u: k.fold(u[0], u[1], u[2], u[3], base + u[4]), self.units[b]))
        for u, job in zip(self.units[b], jobs):
            k.merge(u[0], job)

    def writer(self) -> None:
        inflight: collections.deque = collections.deque()  # (buffer, [(shard writer, write)]) in order

        def release_oldest() -> None:
            buf, writes = inflight.popleft()
            for w, fut in writes:
                w.wait(fut)
            self.free_out.put(buf)

        try:
            while (item := self._get(self.to_write)) is not None and item is not _STOP:
                b, out = item
                t0 = time.perf_counter()
                writes = []
                view = memoryview(out)
                for shard, off, boff, n in self.segments[b]:
                    if shard < self.done:
                        continue
                    w = self._writer(shard)
                    writes.append((w, w.write_owned(view[boff: boff + n], off, self.address[id(out)] + boff)))
                    self.remaining[shard] -= n
                    if self.remaining[shard] == 0:  # its last byte: wait for its writes, record it
                        self.remaining[shard] = -1
                        for w2, fut in writes:
                            w2.wait(fut)
                        checksum = w.finish()
                        self.on_shard(shard, checksum, self.snapshots[self.settled[shard]])
                view.release()
                inflight.append((out, writes))
                while len(inflight) > 1 or all(f is None or f.done() for _, f in inflight[0][1]):
                    release_oldest()
                    if not inflight:
                        break
                self.busy["write"] += time.perf_counter() - t0
            while inflight:
                release_oldest()
        except BaseException as e:  # noqa: BLE001
            self._fail(e)


class TorchPipeline(_Pipeline):
    """The torch kernel: reader threads fill whole-block input buffers, the kernel folds them
    (on the CPU in cache-sized chunks, or on the GPU), with sha256 of the inputs on the way."""

    name = "torch"

    def __init__(self, *args, **kwargs):
        import torch

        super().__init__(*args, **kwargs)
        plan = self.plan
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        in_max = max((_layout_bytes(plan, lay)[0] for lay in self.layouts), default=0)
        out_max = self.out_max()
        pin = self.cuda
        self.free_in: queue.Queue = queue.Queue()
        for _ in range(2):
            self.free_in.put([torch.empty(in_max, dtype=torch.uint8, pin_memory=pin) for _ in range(self.n)])
        for _ in range(2):
            self.free_out.put(torch.empty(out_max, dtype=torch.uint8, pin_memory=pin))
        if self.cuda:
            self.dev_in = [torch.empty(in_max, dtype=torch.uint8, device=self.device) for _ in range(self.n)]
            self.dev_out = torch.empty(out_max, dtype=torch.uint8, device=self.device)
        self.ready: queue.Queue = queue.Queue(maxsize=2)
        known = {str(Path(s.path) / f) for s in plan.sources if s.path for f, _, sha in s.files if sha}
        self.hashers = {p: FileHasher(fd, os.fstat(fd).st_size, p) for p, fd in self.fds.items()
                        if p not in known} if plan.options.hash_inputs else {}
        self.busy["read"] = 0.0
        self._reader = threading.Thread(target=self.reader, name="merger-reader", daemon=True)

    @staticmethod
    def default_threads(plan: Plan) -> int:
        """Reader threads: one per input, up to the CPUs (one left for the GPU's feeder)."""
        cpus = usable_cpus()
        return max(1, min(len(plan.sources), cpus - 1 if plan.device.startswith("cuda") else cpus, 16))

    def _make_kernel(self):
        from merger.kernel import Kernel

        o = self.plan.options
        return Kernel(list(self.plan.weights), [s.name for s in self.plan.sources], device=self.plan.device,
                      accumulate=o.accumulate, allow_nonfinite=o.allow_nonfinite)

    def _view(self, out) -> memoryview:
        return memoryview(out.numpy())

    def _start(self) -> None:
        self._reader.start()

    def _stop(self) -> None:
        self._reader.join()

    def _release(self, bufs) -> None:
        self.free_in.put(bufs)

    def _blocks(self):
        while (item := self._get(self.ready)) is not None and item is not _STOP:
            yield item

    def _read_input(self, i: int, layout, bufs) -> None:
        mv = memoryview(bufs[i].numpy())
        for path, off, boff, n in _runs(self.plan, layout, i):
            dst = mv[boff: boff + n]
            pread_into(self.fds[path], dst, off, path=path)
            if self.hashers:
                self.hashers[path].feed(off, dst)

    def reader(self) -> None:
        try:
            with ThreadPoolExecutor(self.threads) as pool:
                for b in self.todo:
                    layout = self.layouts[b]
                    bufs = self._get(self.free_in)
                    if bufs is None:
                        return
                    t0 = time.perf_counter()
                    # one task per input keeps each file's reads (and hash) in order
                    list(pool.map(lambda i, lay=layout, bs=bufs: self._read_input(i, lay, bs), range(self.n)))
                    self.busy["read"] += time.perf_counter() - t0
                    self._put(self.ready, (b, bufs))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._fail(e)
        finally:
            self._put(self.ready, _STOP, force=True)

    def fold_block(self, b: int, bufs, out) -> None:
        import torch

        layout = self.layouts[b]
        if self.cuda:
            nbytes = _layout_bytes(self.plan, layout)[0]
            for i in range(self.n):
                self.dev_in[i][:nbytes].copy_(bufs[i][:nbytes], non_blocking=True)
            src, dst = self.dev_in, self.dev_out
        else:
            src, dst = bufs, out
        for s, boff, ooff in layout:
            t = self.plan.tensors[s.tensor]
            n_in, n_out = (s.stop - s.start) * t.itemsize, (s.stop - s.start) * t.out_itemsize
            self.kernel.fold(t, [x[boff: boff + n_in] for x in src], dst[ooff: ooff + n_out])
        if self.cuda:
            n_out = _layout_bytes(self.plan, layout)[1]
            out[:n_out].copy_(dst[:n_out], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def run(self) -> None:
        import torch

        # The pipeline is the parallelism: torch's own OpenMP workers would spin against the reader
        # and writer threads (measured: 15x slower on 2 cores), so fold with one intra-op thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().run()
        finally:
            torch.set_num_threads(threads)


def _choice(plan: Plan) -> tuple[type[_Pipeline], str | None]:
    """(pipeline class, why not the native one or None)."""
    from merger.native import unavailable

    why = unavailable()
    if plan.device != "cpu":
        why = why or f"--device {plan.device}"
    elif plan.options.hash_inputs:
        why = why or "--hash"
    return (NativePipeline, None) if why is None else (TorchPipeline, why)


def choose(plan: Plan) -> type[_Pipeline]:
    """The native pipeline where it applies (CPU, no input hashing, the library built and usable),
    else the torch one. ``MERGER_KERNEL=native`` makes a fallback an error (benchmarks, tests)."""
    cls, why = _choice(plan)
    if why is not None and os.environ.get("MERGER_KERNEL", "").lower() == "native":
        raise MergerError(f"MERGER_KERNEL=native, but the native kernel can't run: {why}",
                          hint="unset MERGER_KERNEL to use the torch kernel")
    return cls


def describe(plan: Plan) -> dict:
    """What ``--dry-run`` shows of the pipeline: the kernel, why not the native one, the working set.

    The native kernel holds three output blocks and, per fold thread, 4 MB of input pieces plus
    their accumulator; the torch one, every input's block double-buffered (the plan's estimate).
    """
    cls, why = _choice(plan)
    threads = cls.default_threads(plan)
    if cls is NativePipeline:
        from merger.native import CACHE_BYTES

        out_max = max((_layout_bytes(plan, _block_layout(plan, b))[1] for b in plan.blocks), default=0)
        memory = 3 * out_max + threads * 3 * CACHE_BYTES
    else:
        memory = plan.block_bytes
    return {"kernel": cls.name, "kernel_note": why, "threads": threads, "estimated_memory": memory}
