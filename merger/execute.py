"""Execute a plan: reader threads -> kernel -> writer thread, one block at a time, each input byte
read once.

    reader (threads)  : pread every input's bytes of block b+1 into a free buffer set (+ sha256)
    kernel (this one) : fold block b (CPU chunks, or copy to the GPU and fold there)
    writer (thread)   : pwrite block b-1's output bytes into the shards

Two input buffer sets and two output buffers circulate, so the working set is what the plan
counted against ``--max-memory``. Any error stops all three, and the temporary output folder is
removed: nothing half-written is ever published.
"""

from __future__ import annotations

import json
import os
import queue
import resource
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from merger.errors import MergerError, TensorError
from merger.io import FileHasher, OutputDir, ShardWriter, pread_into, safetensors_header
from merger.kernel import Kernel
from merger.plan import Plan, Slice

_STOP = object()


@dataclass
class Result:
    """What a merge did; ``to_dict`` is the ``--json`` output and part of ``merger.json``."""

    output: str
    seconds: float
    read_bytes: int
    written_bytes: int
    peak_rss: int
    copied_tensors: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    file_hashes: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "output": self.output, "seconds": round(self.seconds, 3), "read_bytes": self.read_bytes,
            "written_bytes": self.written_bytes, "read_rate": self.read_bytes / max(self.seconds, 1e-9),
            "peak_rss": self.peak_rss, "copied_tensors": self.copied_tensors,
            "duplicate_revisions": [list(p) for p in self.duplicates], "timings": self.timings,
        }


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _block_layout(plan: Plan, block: tuple[Slice, ...]) -> list[tuple[Slice, int, int]]:
    """(slice, input byte offset, output byte offset) within the block buffers."""
    out, a, b = [], 0, 0
    for s in block:
        t = plan.tensors[s.tensor]
        out.append((s, a, b))
        a += (s.stop - s.start) * t.itemsize
        b += (s.stop - s.start) * t.out_itemsize
    return out


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
    def __init__(self, plan: Plan, tmp: Path, progress: Callable[[int], None] | None, threads: int | None):
        self.plan, self.tmp, self.progress = plan, tmp, progress or (lambda n: None)
        self.n = len(plan.sources)
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.layouts = [_block_layout(plan, b) for b in plan.blocks]
        in_max = max((sum((s.stop - s.start) * plan.tensors[s.tensor].itemsize for s, _, _ in lay)
                      for lay in self.layouts), default=0)
        out_max = max((sum((s.stop - s.start) * plan.tensors[s.tensor].out_itemsize for s, _, _ in lay)
                       for lay in self.layouts), default=0)
        pin = self.cuda
        self.free_in: queue.Queue = queue.Queue()
        for _ in range(2):
            self.free_in.put([torch.empty(in_max, dtype=torch.uint8, pin_memory=pin) for _ in range(self.n)])
        self.free_out: queue.Queue = queue.Queue()
        for _ in range(2):
            self.free_out.put(torch.empty(out_max, dtype=torch.uint8, pin_memory=pin))
        if self.cuda:
            self.dev_in = [torch.empty(in_max, dtype=torch.uint8, device=self.device) for _ in range(self.n)]
            self.dev_out = torch.empty(out_max, dtype=torch.uint8, device=self.device)
        self.ready: queue.Queue = queue.Queue(maxsize=2)
        self.to_write: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.abort = threading.Event()
        paths = sorted({p for t in plan.tensors for p, _ in t.locs})
        self.fds = {p: os.open(p, os.O_RDONLY) for p in paths}
        known = {str(Path(s.path) / f) for s in plan.sources if s.path for f, _, sha in s.files if sha}
        self.hashers = {p: FileHasher(fd, os.fstat(fd).st_size, p) for p, fd in self.fds.items()
                        if p not in known} if plan.options.hash_inputs else {}
        cpus = os.cpu_count() or 1
        self.threads = threads or max(1, min(self.n, cpus if not self.cuda else cpus - 1, 16))
        self.kernel = Kernel(list(plan.weights), [s.name for s in plan.sources], device=str(self.device),
                             accumulate=plan.options.accumulate, allow_nonfinite=plan.options.allow_nonfinite)
        self.writers: dict[int, ShardWriter] = {}
        self.busy = {"read": 0.0, "fold": 0.0, "write": 0.0}

    # -- threads ------------------------------------------------------------------------------
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
                for b, layout in enumerate(self.layouts):
                    bufs = self._get(self.free_in)
                    if bufs is None:
                        return
                    t0 = time.perf_counter()
                    # one task per input keeps each file's reads (and hash) in order
                    list(pool.map(lambda i: self._read_input(i, layout, bufs), range(self.n)))
                    self.busy["read"] += time.perf_counter() - t0
                    self._put(self.ready, (b, bufs))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self._fail(e)
        finally:
            self._put(self.ready, _STOP, force=True)

    def writer(self) -> None:
        try:
            while (item := self._get(self.to_write)) is not None and item is not _STOP:
                b, out = item
                t0 = time.perf_counter()
                mv = memoryview(out.numpy())
                for s, _, ooff in self.layouts[b]:
                    t = self.plan.tensors[s.tensor]
                    n = (s.stop - s.start) * t.out_itemsize
                    self._writer(t.shard).write(mv[ooff: ooff + n], t.out_offset + s.start * t.out_itemsize)
                self.busy["write"] += time.perf_counter() - t0
                self.free_out.put(out)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)

    def _writer(self, shard: int) -> ShardWriter:
        if shard not in self.writers:
            sp = self.plan.shards[shard]
            ts = [self.plan.tensors[i] for i in sp.tensors]
            header = safetensors_header([(t.name, t.out_dtype, t.shape, t.numel * t.out_itemsize) for t in ts])
            self.writers[shard] = ShardWriter(self.tmp / sp.filename, header, sp.data_bytes)
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

    def fold_block(self, b: int, bufs: list[torch.Tensor], out: torch.Tensor) -> None:
        layout = self.layouts[b]
        if self.cuda:
            nbytes = sum((s.stop - s.start) * self.plan.tensors[s.tensor].itemsize for s, _, _ in layout)
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
            n_out = sum((s.stop - s.start) * self.plan.tensors[s.tensor].out_itemsize for s, _, _ in layout)
            out[:n_out].copy_(dst[:n_out], non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()

    def run(self) -> None:
        # The pipeline is the parallelism: torch's own OpenMP workers would spin against the reader
        # and writer threads (measured: 15x slower on 2 cores), so fold with one intra-op thread.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._run()
        finally:
            torch.set_num_threads(threads)

    def _run(self) -> None:
        reader = threading.Thread(target=self.reader, name="merger-reader", daemon=True)
        writer = threading.Thread(target=self.writer, name="merger-writer", daemon=True)
        reader.start()
        writer.start()
        try:
            while (item := self._get(self.ready)) is not None and item is not _STOP:
                b, bufs = item
                out = self._get(self.free_out)
                if out is None:
                    break
                t0 = time.perf_counter()
                self.fold_block(b, bufs, out)
                self.busy["fold"] += time.perf_counter() - t0
                self.free_in.put(bufs)
                self._put(self.to_write, (b, out))
                self.progress(sum((s.stop - s.start) * self.plan.tensors[s.tensor].itemsize
                                  for s, _, _ in self.layouts[b]) * self.n)
        except BaseException as e:  # noqa: BLE001
            self._fail(e)
        finally:
            if self.error is None:
                self._put(self.to_write, _STOP)
            else:
                self.abort.set()
            writer.join()
            self.abort.set()
            reader.join()
        if self.error is not None:
            raise self.error
        for w in self.writers.values():
            w.close()

    def close(self) -> None:
        for w in self.writers.values():
            if w.fd >= 0:
                os.close(w.fd)
                w.fd = -1
        for fd in self.fds.values():
            os.close(fd)


def write_index(plan: Plan, folder: Path) -> None:
    """``model.safetensors.index.json``: total size and tensor -> shard file."""
    wmap = {t.name: plan.shards[t.shard].filename for t in plan.tensors}
    index = {"metadata": {"total_size": plan.out_bytes}, "weight_map": dict(sorted(wmap.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def run(plan: Plan, output: str | Path, *, force: bool = False, progress: Callable[[int], None] | None = None,
        threads: int | None = None, finalize: Callable[[Path, Result], None] | None = None) -> Result:
    """Merge per ``plan`` into ``output``: write into a temporary sibling, then rename.

    Args:
        plan: from :func:`merger.plan.build`.
        output: the output folder; refused if it exists (unless ``force``) or overlaps an input.
        progress: called with the number of input bytes folded, per block.
        threads: reader threads (default: one per input, up to the CPU count).
        finalize: called with (temporary folder, result) before publishing, to add files
            (manifest, model card); an exception there discards the output.

    Raises:
        OutputError, TensorError, MergerError: the output folder is then not created.
    """
    out = OutputDir(output, inputs=[s.path for s in plan.sources], force=force)
    t0 = time.perf_counter()
    tmp = out.create()
    pipe = None
    try:
        pipe = _Pipeline(plan, tmp, progress, threads)
        pipe.run()
        if len(plan.shards) > 1:
            write_index(plan, tmp)
        hashes = {p: h.hexdigest() for p, h in pipe.hashers.items()}
        dups = pipe.kernel.duplicates()
        if dups and plan.options.strict:
            pairs = ", ".join(f"{a} == {b}" for a, b in dups)
            raise TensorError(f"revisions with identical weights: {pairs}", tensor="*",
                              revisions=[b for _, b in dups],
                              hint="drop the duplicates from --revisions, or run without --strict")
        for f in plan.copy_files:
            shutil.copyfile(Path(plan.sources[-1].path) / f, tmp / f)
        result = Result(
            output=str(out.final), seconds=time.perf_counter() - t0, read_bytes=plan.read_bytes,
            written_bytes=sum(w.size for w in pipe.writers.values()), peak_rss=peak_rss(),
            copied_tensors=[n for n, c in pipe.kernel.copied.items() if c], duplicates=dups,
            file_hashes=hashes, timings={k: round(v, 3) for k, v in pipe.busy.items()})
        if finalize is not None:
            finalize(tmp, result)
        pipe.close()
        pipe = None
        out.publish()
        return result
    except BaseException as e:
        if pipe is not None:
            pipe.close()
        out.discard()
        if isinstance(e, (MergerError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):
            raise MergerError(f"I/O error: {e}", hint="check the input files and free disk space") from e
        raise
