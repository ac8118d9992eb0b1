"""The torch pipeline: reader threads fill whole-block input buffers, the torch kernel
(``torch_kernel.py``) folds them on the CPU in cache-sized chunks or on the GPU, and the writer copies
the output into the shards. It runs for CUDA, ``--hash`` (the sha256 of the inputs is computed
from the bytes read) and wherever the native kernel can't. torch is imported when it runs.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from merger.device import usable_cpus
from merger.engine.pipeline import STOP, Pipeline
from merger.formats import clip
from merger.formats.reading import FileHasher, pread_into
from merger.plan import Plan, Slice


ALIGN = 8  # bytes: each slice starts aligned in the block buffers, so any dtype can view its bytes


def _block_layout(plan: Plan, block: tuple[Slice, ...]) -> list[tuple[Slice, int, int]]:
    """(slice, input byte offset, output byte offset) within the block buffers.

    Offsets are rounded up to ``ALIGN``: after an odd-sized uint8/bool slice, a float16 slice at
    an odd offset couldn't be viewed as float16. A tensor whose inputs differ in dtype takes the
    widest input's bytes in every input's buffer (``TensorPlan.itemsize``); each fills its own.
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
        isz = t.input_itemsize(i)
        for e in clip(t.locs[i], s.start * isz, s.stop * isz):
            path, start, at, n = e.path, e.offset, boff + e.start, e.nbytes
            r = runs[-1] if runs else None
            if r and r[0] == path and r[1] + r[3] == start and r[2] + r[3] == at:
                r[3] += n
            else:
                runs.append([path, start, at, n])
    return [tuple(r) for r in runs]


class TorchPipeline(Pipeline):
    """The torch kernel: reader threads fill whole-block input buffers, the kernel folds them
    (on the CPU in cache-sized chunks, or on the GPU), with sha256 of the inputs on the way."""

    name = "torch"

    def __init__(self, *args, **kwargs):
        import torch

        super().__init__(*args, **kwargs)
        plan = self.plan
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.layouts = [_block_layout(plan, b) for b in plan.blocks]
        in_max = max((_layout_bytes(plan, lay)[0] for lay in self.layouts), default=0)
        out_max = max((_layout_bytes(plan, lay)[1] for lay in self.layouts), default=0)
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

    @classmethod
    def working_set(cls, plan: Plan) -> int:
        """Every input's block and the output block, double-buffered: the plan's estimate."""
        return plan.block_bytes

    @staticmethod
    def default_threads(plan: Plan) -> int:
        """Reader threads: one per input, up to the CPUs (one left for the GPU's feeder)."""
        cpus = usable_cpus()
        return max(1, min(len(plan.sources), cpus - 1 if plan.device.startswith("cuda") else cpus, 16))

    def _make_kernel(self):
        from merger.fold.torch_kernel import Kernel

        o = self.plan.options
        return Kernel(list(self.plan.weights), [s.name for s in self.plan.sources], device=self.plan.device,
                      accumulate=o.accumulate, allow_nonfinite=o.allow_nonfinite)

    def writer(self) -> None:
        try:
            while (item := self._get(self.to_write)) is not None and item is not STOP:
                b, out = item
                t0 = time.perf_counter()
                mv = memoryview(out.numpy())
                for s, _, ooff in self.layouts[b]:
                    t = self.plan.tensors[s.tensor]
                    if t.shard < self.done:
                        continue
                    n = (s.stop - s.start) * t.out_itemsize
                    self._writer(t.shard).write(mv[ooff: ooff + n], t.out_offset + s.start * t.out_itemsize)
                    self._shard_written(t.shard, n)
                self.busy["write"] += time.perf_counter() - t0
                self.free_out.put(out)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _start(self) -> None:
        self._reader.start()

    def _stop(self) -> None:
        self._reader.join()

    def _release(self, bufs) -> None:
        self.free_in.put(bufs)

    def _blocks(self):
        while (item := self._get(self.ready)) is not None and item is not STOP:
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
            self._put(self.ready, STOP, force=True)

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
            n, n_out = s.stop - s.start, (s.stop - s.start) * t.out_itemsize
            self.kernel.fold(t, [x[boff: boff + n * t.input_itemsize(i)] for i, x in enumerate(src)],
                             dst[ooff: ooff + n_out])
        if self.cuda:
            n_out = _layout_bytes(self.plan, layout)[1]
            out[:n_out].copy_(dst[:n_out], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def run(self) -> None:
        import torch

        # The pipeline is the parallelism: torch's own OpenMP workers would spin against the reader
        # and writer threads (many times slower: bench/README.md), so fold with one intra-op thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            super().run()
        finally:
            torch.set_num_threads(threads)
