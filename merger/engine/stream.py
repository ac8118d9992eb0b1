"""The *stream* schedule (checkpoint-major), for revisions that must be downloaded first.

The whole accumulator (one float per parameter, plus the first revision's raw bytes to detect
tensors identical in every input) stays in memory on the compute device; revisions flow through
it one at a time, oldest first, while a downloader thread fetches the next one. With
``keep=False`` (``--no-keep``) each revision this run downloaded is deleted from the HF cache once
folded, so the disk holds at most two revisions. The arithmetic is ``Kernel.add_input`` per chunk
(``SIZES.chunk``),
the same as the *blocks* schedule, so both give the same bits.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from merger.engine.run import Result, peak_rss
from merger.fold.rules import differing_error, nonfinite_error, overflow_error
from merger.fold.torch_kernel import BITS, Kernel, cast_overflows
from merger.formats import of, read_checkpoint
from merger.formats.inputs import check_identity, identity, open_input
from merger.formats.reading import FileHasher, read_extents
from merger.output.convert import convert
from merger.output.folder import OutputDir
from merger.output.shards import open_shard, write_index
from merger.plan import Options, Plan, build, check_layouts
from merger.sources import Source
from merger.engine.resume import STATE, load_stream_state, save_stream_state, sources_fingerprint, stream_resume_point
from merger.sources.hflocal import cache_dir, present_files
from merger.sources.hub import delete_revision, fetch
from merger.units import SIZES, dtype_from_name

class _Downloader(threading.Thread):
    """Fetches sources in order, at most ``ahead`` revisions beyond the one being folded."""

    def __init__(self, sources: list[Source], ahead: int | None = None):
        super().__init__(name="merger-download", daemon=True)
        self.sources, self.out = sources, queue.Queue()
        self.slots = threading.Semaphore((SIZES.ahead if ahead is None else ahead) + 1)
        self.stop = threading.Event()
        # held while a revision downloads and while one is deleted: huggingface_hub links a new
        # snapshot file to a blob it finds on disk, so a deletion that scanned the cache before
        # that link appeared would delete the blob under it (a dangling link in the next revision)
        self.cache_lock = threading.Lock()

    def run(self) -> None:
        for s in self.sources:
            self.slots.acquire()
            if self.stop.is_set():
                return
            try:  # (names this run downloads: not in the cache before, None if none, the source)
                with self.cache_lock:
                    before = None if s.path else present_files(s.repo_id, s.commit, [f for f, _, _ in s.files])
                    item = (None if before is None else [f for f, _, _ in s.files if f not in before],
                            fetch(s) if s.path is None else s)
                self.out.put(item)
            except BaseException as e:  # noqa: BLE001 - handed to the folding thread
                self.out.put(e)
                return

    def next(self) -> tuple[list[str] | None, Source]:
        item = self.out.get()
        if isinstance(item, BaseException):
            raise item
        return item


def run_stream(sources: list[Source], options: Options, output: Path, *, force: bool = False, keep: bool = True,
               progress: Callable[[int], None] | None = None,
               finalize: Callable[[Path, Plan, Result], None] | None = None) -> tuple[Plan, Result]:
    """Download and fold revisions one at a time; write the merged model atomically.

    Raises:
        PlanError: a later revision's tensors don't match the first one's.
        TensorError, OutputError, MergerError: nothing is published.
    """
    progress = progress or (lambda n: None)
    out = OutputDir(output, inputs=[str(cache_dir())], force=force)
    t0 = time.perf_counter()
    tmp = out.create(keep=options.resume)
    fp = sources_fingerprint(sources, options)  # the state saved after each revision: resume.py
    start, rec, notes = stream_resume_point(out, fp) if options.resume else (0, None, [])
    down = _Downloader(sources[start:])
    down.start()
    done: list[Source] = list(sources[:start])
    downloaded: dict[str, list[str]] = dict((rec or {}).get("downloaded", {}))  # commit -> names we fetched

    def later_commits(i: int) -> set[str]:  # a commit selected twice is needed again
        return {s.commit for s in sources[i:]}

    restart = False
    try:
        fetched_by_us, first = down.next()
        layout0 = read_checkpoint(first.path, key=options.key)
        plan = build(list(sources[:start]) + [first] + list(sources[start + 1:]), options,
                     layouts=[layout0] * len(sources))
        plan = dataclasses.replace(plan, schedule="stream")
        dev = torch.device(plan.device)
        kernel = Kernel(list(plan.weights), [s.name for s in sources], device=str(dev),
                        accumulate=options.accumulate, allow_nonfinite=options.allow_nonfinite)
        acc: dict[int, torch.Tensor] = {}
        raw0: dict[int, torch.Tensor] = {}
        same: dict[int, list[bool]] = {}
        bad: dict[int, dict[int, int]] = {}
        hashes: dict[str, str] = {}
        if start:
            state = load_stream_state(out, rec, plan, dev)
            if state is None:  # this run's output layout differs from the interrupted one's
                raise _Restart
            acc, raw0, same, bad, hashes = state
            if not keep:  # what the interrupted run downloaded and folded but hadn't deleted yet
                with down.cache_lock:
                    for s in sources[:start]:
                        if s.commit in rec.get("downloaded", {}) and s.commit not in later_commits(start):
                            delete_revision(s, rec["downloaded"][s.commit])
        for i in range(start, len(sources)):
            if i > start:
                fetched_by_us, src = down.next()
                layout = read_checkpoint(src.path, key=options.key)
                check_layouts([first, src], [layout0, layout], mixed=False,  # read in the first one's dtypes
                              hint="download the revisions and merge the local folders: that averages floating "
                                   "tensors whose dtype differs between revisions")
            else:
                src, layout = first, layout0
            planned = {p: identity(p) for info in layout.values() for p in info.files}
            known = {f: sha for f, _, sha in src.files if sha}
            fds, hashers = {}, {}
            try:
                for ti, t in enumerate(plan.tensors):
                    info = layout[t.name]
                    for path in info.files:
                        if path not in fds:
                            fds[path] = open_input(path, what="weights file", needed=len(planned))
                            check_identity({path: fds[path]}, planned, when="between planning and reading")
                            if options.hash_inputs and Path(path).name not in known:
                                hashers[path] = FileHasher(fds[path], os.path.getsize(path), path)
                    if i == 0:
                        raw0[ti] = torch.empty(t.numel * t.itemsize, dtype=torch.uint8, device=dev)
                        if t.averaged:
                            acc[ti] = torch.empty(t.numel, dtype=kernel.acc_dtype(t), device=dev)
                            same[ti] = [kernel.rule.copy_identical] * -(-t.numel // SIZES.chunk)
                            bad[ti] = {}
                    piece = SIZES.piece  # elements per pread: whole chunks
                    for a in range(0, t.numel, piece):  # (not `start`: that is where this run began)
                        b = min(t.numel, a + piece)
                        buf = torch.empty((b - a) * t.itemsize, dtype=torch.uint8)
                        read_extents(fds, info.extents, a * t.itemsize, memoryview(buf.numpy()),
                                     feed=lambda p, off, data, h=hashers: p in h and h[p].feed(off, data))
                        x = buf.to(dev)
                        _fold_piece(kernel, plan, ti, i, a, b, x, acc, raw0, same, bad)
                    progress(t.numel * t.itemsize)
                check_identity(fds, planned, when="while it was being read")
            finally:
                for fd in fds.values():
                    os.close(fd)
            hashes.update({p: h.hexdigest() for p, h in hashers.items()})
            done.append(src)
            if i < len(sources) - 1:  # before deleting it: a crash from now on resumes at i + 1
                downloaded.update({src.commit: fetched_by_us} if fetched_by_us else {})
                save_stream_state(out, fp, plan, i + 1, acc, raw0, same, bad, hashes, downloaded)
            if not keep and fetched_by_us and i < len(sources) - 1 and src.commit not in later_commits(i + 1):
                with down.cache_lock:
                    delete_revision(src, fetched_by_us)
            down.slots.release()
        last = done[-1]
        plan = dataclasses.replace(plan, sources=tuple(done),
                                   copy_files=of(last.path).side_files(last.path))
        written = _write(plan, kernel, tmp, acc, raw0, same, bad)
        if len(plan.shards) > 1:
            write_index(plan, tmp)
        for f in plan.copy_files:
            shutil.copyfile(Path(last.path) / f, tmp / f)
        result = Result(output=str(out.final), seconds=time.perf_counter() - t0, read_bytes=plan.read_bytes,
                        written_bytes=written, peak_rss=peak_rss(),
                        copied_tensors=[plan.tensors[ti].name for ti in raw0
                                        if not plan.tensors[ti].averaged or all(same[ti])],
                        file_hashes=hashes, kernel="stream", warnings=out.notes + notes)
        (tmp / STATE).unlink(missing_ok=True)  # not part of the output
        written = convert(tmp, plan)
        if written:
            result.written_bytes = sum((tmp / f).stat().st_size for f in written)
        result.peak_rss = peak_rss()  # with the conversion (run.peak_rss)
        if finalize is not None:
            finalize(tmp, plan, result)
        out.publish()
        result.peak_rss = peak_rss()
        if not keep and fetched_by_us:
            with down.cache_lock:
                delete_revision(last, fetched_by_us)
        return plan, result
    except _Restart:
        out.discard()
        restart = True
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) and (out.read_progress() or {}).get("stream"):
            out.release()  # keep the saved state for --resume
        else:
            out.discard()
        raise
    finally:
        down.stop.set()
        for _ in range(2):
            down.slots.release()
    assert restart
    return run_stream(sources, dataclasses.replace(options, resume=False), output, force=force, keep=keep,
                      progress=progress, finalize=finalize)


class _Restart(Exception):
    """The saved state doesn't fit this run's plan: start again from the first revision."""


def _fold_piece(kernel: Kernel, plan: Plan, ti: int, i: int, start: int, stop: int, x: torch.Tensor,
                acc, raw0, same, bad) -> None:
    """Fold elements ``start:stop`` of revision ``i`` of tensor ``ti`` (raw bytes ``x``)."""
    t = plan.tensors[ti]
    size = t.itemsize
    r0 = raw0[ti][start * size: stop * size]
    if i == 0:
        r0.copy_(x)
    if not t.averaged:
        if i > 0 and not torch.equal(x, r0):
            raise differing_error(t.name, t.dtype, kernel.names[0], [kernel.names[i]])
        return
    vals = x.view(dtype_from_name(t.dtype))
    bits, bits0 = x.view(BITS[size]), r0.view(BITS[size])
    a = acc[ti]
    chunk = SIZES.chunk
    tmp = torch.empty(min(chunk, stop - start), dtype=a.dtype, device=a.device)
    for c in range(start, stop, chunk):
        e = min(stop, c + chunk)
        k = c // chunk
        if i > 0 and same[ti][k]:
            same[ti][k] = torch.equal(bits[c - start: e - start], bits0[c - start: e - start])
        kernel.add_input(a[c:e], tmp[: e - c], vals[c - start: e - start], i)
        if not kernel.allow_nonfinite and k not in bad[ti] and not bool(torch.isfinite(a[c:e]).all()):
            bad[ti][k] = i


def _write(plan: Plan, kernel: Kernel, tmp: Path, acc, raw0, same, bad) -> int:
    """Cast the accumulators (identical chunks: the raw bytes) and write the shards."""
    written = 0
    for k, sp in enumerate(plan.shards):
        w = open_shard(plan, k, tmp)
        try:
            for ti in sp.tensors:
                t = plan.tensors[ti]
                odt = dtype_from_name(t.out_dtype)
                if not t.averaged:
                    w.write(raw0[ti].cpu().numpy(), t.out_offset)
                    continue
                x0 = raw0[ti].view(dtype_from_name(t.dtype))
                kernel.finish(acc[ti])
                o = acc[ti].to(odt)
                for j, s in enumerate(same[ti]):  # j: a chunk (k is the shard)
                    c, e = j * SIZES.chunk, min(t.numel, (j + 1) * SIZES.chunk)
                    if s:
                        o[c:e].copy_(x0[c:e])
                        if not kernel.allow_nonfinite and cast_overflows(o[c:e], x0[c:e]):
                            raise overflow_error(t.name, t.out_dtype)
                    elif not kernel.allow_nonfinite and not bool(torch.isfinite(o[c:e]).all()):
                        raise (nonfinite_error(t.name, kernel.names[bad[ti][j]]) if j in bad[ti]
                               else overflow_error(t.name, t.out_dtype))
                w.write(o.cpu().contiguous().view(torch.uint8).numpy() if o.dim() else
                        o.cpu().reshape(1).view(torch.uint8).numpy(), t.out_offset)
            w.close()
            written += w.size
        finally:
            w.abandon()
    return written
