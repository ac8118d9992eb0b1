"""The native pipeline: fold threads run the C kernel (``native.py``) over a block's slices while
the writer sends the previous block's pages to the shards.

No input buffers at all: each call preads a few MB of every input at a time into per-thread
buffers that stay in the CPU caches. Memory is three output buffers, laid out like the output
files (:func:`file_layout`), so that whole pages go to the disk with O_DIRECT straight from them.
"""

from __future__ import annotations

import collections
import ctypes
import mmap
import time
from concurrent.futures import ThreadPoolExecutor

from merger.engine.pipeline import STOP, Pipeline
from merger.fold.native import NativeKernel
from merger.output.shards import DIRECT_ALIGN, shard_header
from merger.plan import Plan, TensorPlan
from merger.units import SIZES


def file_layout(plan: Plan, headers: list[bytes]) -> tuple[list[list[list[int]]], list[list[int]], int]:
    """Where each block's output lies in a buffer laid out like the files.

    Per block: segments ``[shard, data offset, buffer offset, bytes]`` (one per run of slices
    that are contiguous in one shard), each at its file position's offset within a page, so whole
    pages can be written with O_DIRECT straight from the buffer; and each slice's buffer offset.
    Also the buffer size the largest block needs.
    """
    segments: list[list[list[int]]] = []
    slice_at: list[list[int]] = []
    size = 0
    for block in plan.blocks:
        segs: list[list[int]] = []
        at: list[int] = []
        for s in block:
            t = plan.tensors[s.tensor]
            off = t.out_offset + s.start * t.out_itemsize
            if not (segs and segs[-1][0] == t.shard and segs[-1][1] + segs[-1][3] == off):
                end = segs[-1][2] + segs[-1][3] if segs else 0
                pos = len(headers[t.shard]) + off  # in the file
                segs.append([t.shard, off, end + (pos - end) % DIRECT_ALIGN, 0])
            at.append(segs[-1][2] + segs[-1][3])
            segs[-1][3] += (s.stop - s.start) * t.out_itemsize
        segments.append(segs)
        slice_at.append(at)
        size = max(size, segs[-1][2] + segs[-1][3] if segs else 0)
    return segments, slice_at, size


class NativePipeline(Pipeline):
    """The native kernel (``_fold.c``): every thread reads and folds its own slices; the writer
    sends whole pages from the output buffers without a copy (``ShardWriter.write_owned``), and a
    buffer is reused once its writes are done."""

    name = "native"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        plan = self.plan
        self.segments, self.slice_at, size = file_layout(plan, self.headers)
        self.buffers = [mmap.mmap(-1, max(size, 1)) for _ in range(3)]  # one folding, two being written
        self.address = {id(m): ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in self.buffers}
        for m in self.buffers:
            self.free_out.put(m)
        self.units = [self._units(b) for b in range(len(plan.blocks))]
        self.pool: ThreadPoolExecutor | None = None

    @classmethod
    def working_set(cls, plan: Plan) -> int:
        """Three output buffers, and per fold thread about three times its input pieces (the
        pieces and their accumulator)."""
        headers = [shard_header(plan, k) for k in range(len(plan.shards))]
        return 3 * max(file_layout(plan, headers)[2], 1) + cls.default_threads(plan) * 3 * SIZES.cache_bytes

    def _make_kernel(self):
        o = self.plan.options
        return NativeKernel(list(self.plan.weights), [s.name for s in self.plan.sources], accumulate=o.accumulate,
                            allow_nonfinite=o.allow_nonfinite)

    def _units(self, b: int) -> list[tuple[TensorPlan, int, int, int]]:
        """Block b cut into native calls: (tensor, start, stop, output buffer offset)."""
        out = []
        for s, at in zip(self.plan.blocks[b], self.slice_at[b]):
            t = self.plan.tensors[s.tensor]
            unit = SIZES.unit  # elements per native call: small enough to balance two threads in a block
            for a in range(s.start, max(s.stop, s.start + 1), unit):  # an empty tensor: one empty call
                out.append((t, a, min(s.stop, a + unit), at + (a - s.start) * t.out_itemsize))
        return out

    def _start(self) -> None:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="merger-fold")

    def _stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def fold_block(self, b: int, inputs, out: mmap.mmap) -> None:
        base = self.address[id(out)]
        k = self.kernel
        fds = self.fds
        jobs = list(self.pool.map(lambda u: k.fold(u[0], u[1], u[2], fds, base + u[3]), self.units[b]))
        for u, job in zip(self.units[b], jobs):
            k.merge(u[0], job)

    def writer(self) -> None:
        inflight: collections.deque = collections.deque()  # (buffer, [(shard writer, write)]) in order

        def wait_all(writes) -> None:
            for w, fut in writes:
                w.wait(fut)

        def release_oldest() -> None:
            buf, writes = inflight.popleft()
            wait_all(writes)
            self.free_out.put(buf)

        try:
            while (item := self._get(self.to_write)) is not None and item is not STOP:
                b, out = item
                t0 = time.perf_counter()
                writes = []
                view = memoryview(out)
                for shard, off, boff, n in self.segments[b]:
                    if shard < self.done:
                        continue
                    w = self._writer(shard)
                    writes.append((w, w.write_owned(view[boff: boff + n], off, self.address[id(out)] + boff)))
                    # after its last byte, its writes must be done (and have succeeded) before it is recorded
                    self._shard_written(shard, n, before_finish=lambda ws=writes: wait_all(ws))
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
