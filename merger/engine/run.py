"""Execute a *blocks* plan into an output folder: the pipeline (``choose.py``: the native kernel's
fold threads, or torch's readers and kernel, then a writer thread; each input byte read once), the
atomic output (``output/folder.py``), resuming (``resume.py``), the manifest (via ``finalize``).

Any error stops the pipeline, and the partial output folder is removed: nothing half-written is
ever published.
"""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from merger.engine.choose import choose
from merger.engine.resume import fingerprint, resume_point
from merger.errors import MergerError, OutputError, TensorError
from merger.output.convert import convert
from merger.output.folder import OutputDir
from merger.output.shards import write_index
from merger.plan import Plan


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
    resumed_shards: list[str] = field(default_factory=list)  # taken over from an interrupted run
    warnings: list[str] = field(default_factory=list)  # e.g. an interrupted run's output removed
    kernel: str = ""  # which pipeline folded: native (the C kernel), torch, or stream

    def to_dict(self) -> dict:
        return {
            "output": self.output, "seconds": round(self.seconds, 3), "read_bytes": self.read_bytes,
            "written_bytes": self.written_bytes, "read_rate": self.read_bytes / max(self.seconds, 1e-9),
            "peak_rss": self.peak_rss, "copied_tensors": self.copied_tensors,
            "duplicate_revisions": [list(p) for p in self.duplicates], "timings": self.timings,
            "resumed_shards": self.resumed_shards, "warnings": self.warnings, "kernel": self.kernel,
        }


def io_error(e: OSError, where: str = "") -> MergerError:
    """An OS error that stopped a merge (the output is then discarded), as a :class:`MergerError`."""
    return MergerError(f"I/O error{where}: {e}", hint="check the input files and free disk space")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (Linux reports KiB); a child process
    that peaked higher (none today) counts with its own peak. Taken again after the output is
    converted and the manifest written, so that a conversion's memory (``--to nanogpt`` imports
    torch and holds the model) is in it: the merge's peak is the process's, to the end."""
    self_ = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_, children) * 1024


def run(plan: Plan, output: str | Path, *, force: bool = False, progress: Callable[[int], None] | None = None,
        threads: int | None = None, finalize: Callable[[Path, Result], None] | None = None) -> Result:
    """Merge per ``plan`` into ``output``: write into the partial sibling folder, then rename.

    With ``plan.options.resume``, shards that an interrupted run for the same output and the same
    plan finished are verified and kept (see the module docstring); otherwise such a run's
    leftovers are removed. Either way :attr:`Result.warnings` says what happened.

    Args:
        plan: from :func:`merger.plan.build`.
        output: the output folder; refused if it exists (unless ``force``) or overlaps an input.
        progress: called with the number of input bytes folded, per block.
        threads: fold threads (native) or reader threads (torch); default: per the CPU count.
        finalize: called with (partial folder, result) before publishing, to add files
            (manifest, model card); an exception there discards the output.

    Raises:
        OutputError, TensorError, MergerError: the output folder is then not created, and the
            partial folder is removed (it is kept only after a KeyboardInterrupt that came once
            a shard was finished, for a later resume).
    """
    out = OutputDir(output, inputs=[s.path for s in plan.sources], force=force)
    t0 = time.perf_counter()
    resume = plan.options.resume
    tmp = out.create(keep=resume)
    pipe = None
    try:
        fp = fingerprint(plan)
        kept, kstate, notes = resume_point(out, plan, fp) if resume else ([], None, [])
        old = (out.read_progress() or {}).get("shards", {})
        finished = {name: old[name] for name in kept}
        out.write_progress({"fingerprint": fp, "shards": finished})

        def on_shard(i: int, sha: str, state: dict) -> None:
            name = plan.shards[i].filename
            finished[name] = {"checksum": sha, "bytes": (tmp / name).stat().st_size, "state": state}
            out.write_progress({"fingerprint": fp, "shards": finished})

        pipe = choose(plan)(plan, tmp, progress, threads, label=str(out.final), done=len(kept), state=kstate,
                         on_shard=on_shard)
        pipe.run()
        hashes = {p: h.hexdigest() for p, h in pipe.hashers.items()}
        dups = pipe.kernel.duplicates()
        if dups and plan.options.strict:
            pairs = ", ".join(f"{a} == {b}" for a, b in dups)
            raise TensorError(f"revisions with identical weights: {pairs}", tensor="*",
                              revisions=[b for _, b in dups],
                              hint="drop the duplicates from --revisions, or run without --strict")
        try:
            if len(plan.shards) > 1:
                write_index(plan, tmp)
            for f in plan.copy_files:
                shutil.copyfile(Path(plan.sources[-1].path) / f, tmp / f)
            result = Result(
                output=str(out.final), seconds=time.perf_counter() - t0, read_bytes=pipe.read_bytes,
                written_bytes=sum((tmp / sp.filename).stat().st_size for sp in plan.shards), peak_rss=peak_rss(),
                copied_tensors=[n for n, c in pipe.kernel.copied.items() if c], duplicates=dups,
                file_hashes=hashes, timings={k: round(v, 3) for k, v in pipe.busy.items()},
                resumed_shards=kept, warnings=out.notes + notes, kernel=pipe.name)
            written = convert(tmp, plan)  # another output format than the engine's shards
            if written:
                result.written_bytes = sum((tmp / f).stat().st_size for f in written)
            result.peak_rss = peak_rss()  # with the conversion: what merger.json records
            if finalize is not None:
                finalize(tmp, result)
        except OSError as e:
            where = Path(e.filename).name if getattr(e, "filename", None) else "the output folder"
            raise OutputError(f"writing {where} into {out.final} failed: {e.strerror or e}",
                              hint="free disk space and check that the output location is writable") from e
        pipe.close()
        pipe = None
        out.publish()
        result.peak_rss = peak_rss()  # to the end (the manifest and card): what --json and the summary say
        return result
    except BaseException as e:
        if pipe is not None:
            pipe.close()
        if isinstance(e, KeyboardInterrupt) and (out.read_progress() or {}).get("shards"):
            out.release()  # keep the finished shards for --resume
        else:
            out.discard()
        if isinstance(e, (MergerError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):
            raise io_error(e) from e
        raise
