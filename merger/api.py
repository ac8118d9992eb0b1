"""The library entry points; the CLI calls these and nothing else.

    from merger import average, Options
    plan, result = average(["runs/my-run"], revisions="step1000..step9000", every=1000,
                           options=Options(), output="merged/my-run-lawa")

Schedules: *blocks* when every input is on local disk (local folders, or Hub revisions already in
the HF cache); *stream* when Hub revisions must be downloaded and the accumulator fits
``max_memory``; otherwise every revision is downloaded first, then *blocks*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from merger.engine.choose import describe
from merger.engine.ranks import World, has_rank_records
from merger.engine.ranks import detect as detect_world
from merger.engine.run import Result, run
from merger.errors import TensorError, UsageError
from merger.output import manifest
from merger.output.folder import OutputDir
from merger.plan import Options, Plan, build, default_max_memory, weights_for
from merger.sources import Source, resolve
from merger.units import format_size


@dataclass(frozen=True)
class Prepared:
    """Resolved sources and, when every input is on disk, the full plan."""

    sources: tuple[Source, ...]
    options: Options
    plan: Plan | None  # None until the Hub revisions are downloaded
    schedule: str  # blocks | stream | download
    download_bytes: int = 0
    duplicates: tuple[tuple[str, str], ...] = field(default=())

    def to_dict(self) -> dict:
        if self.plan is not None:
            d = self.plan.to_dict()
            d.update(describe(self.plan))
        else:
            w = weights_for(self.options.method, len(self.sources), steps=[s.step for s in self.sources])
            d = {"method": self.options.method.describe(), "weights": w,
                 "inputs": [dict(s.to_dict(), weight=x) for s, x in zip(self.sources, w)]}
        first = [sz for f, sz, _ in self.sources[0].files if f.endswith((".bin", ".safetensors"))]
        d.update(schedule=self.schedule, download_bytes=self.download_bytes,
                 duplicate_revisions=[list(p) for p in self.duplicates])
        if self.plan is None:
            d["peak_disk"] = (2 if not self.options.keep else len(self.sources)) * sum(first)
        return d


def prepare(models: list[str] | None, *, revisions: str | None = None, every: int | None = None,
            options: Options = Options()) -> Prepared:
    """Resolve sources, pick the schedule, and build the plan when the inputs are on disk.

    Raises:
        MergerError: bad sources or options; identical revisions with ``strict``.
    """
    sources = resolve(models, revisions, every)
    weights_for(options.method, len(sources), steps=[s.step for s in sources])  # bad weights fail before any download
    dups: list[tuple[str, str]] = []
    if sources[0].repo_id:
        from merger.sources.hub import identical_revisions

        dups = identical_revisions(sources)
        if dups and options.strict:
            raise TensorError("revisions with identical weight files: " + ", ".join(f"{a} == {b}" for a, b in dups),
                              tensor="*", revisions=[b for _, b in dups],
                              hint="drop the duplicates from --revisions, or run without --strict")
    missing = [s for s in sources if s.path is None]
    if not missing:
        return Prepared(tuple(sources), options, build(sources, options), "blocks", duplicates=tuple(dups))
    download = sum(sz for s in missing for _, sz, _ in s.files)
    weights_bytes = sum(sz for f, sz, _ in sources[0].files if f.endswith((".bin", ".safetensors")))
    need = 3 * weights_bytes  # accumulator (2x a 16-bit model, or 2x with float64 for 32-bit) + first revision
    budget = options.max_memory or default_max_memory()
    if need <= budget:
        schedule = "stream"
    elif not options.keep:
        raise UsageError(f"--no-keep streams revisions through an accumulator of about {format_size(need)}, "
                         f"more than --max-memory {format_size(budget)}",
                         hint=f"raise --max-memory to {format_size(need)}, or drop --no-keep")
    else:
        schedule = "download"
    return Prepared(tuple(sources), options, None, schedule, download, tuple(dups))


def default_output(sources: list[Source], options: Options) -> Path:
    """``merged/<model>-<method>-<first>-<last>``."""
    first, last = sources[0], sources[-1]
    model = (last.repo_id or "").split("/")[-1] or Path(last.path).resolve().parent.name
    if len(sources) > 1 and first.repo_id is None and Path(first.path).parent != Path(last.path).parent:
        model = "merge"
    span = f"{first.name}-{last.name}" if len(sources) > 1 else last.name
    return Path("merged") / f"{model}-{options.method.name}-{span}"


def output_path(prep: Prepared, output: str | Path | None, *, force: bool = False) -> Path:
    """The output folder, checked (exists without force, overlaps an input) before any work."""
    out = Path(output) if output else default_output(list(prep.sources), prep.options)
    OutputDir(out, inputs=[s.path for s in prep.sources if s.path], force=force)
    return out


def average(models: list[str] | None, *, revisions: str | None = None, every: int | None = None,
            options: Options = Options(), output: str | Path | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None, command: list[str] | None = None,
            prepared: Prepared | None = None) -> tuple[Plan, Result]:
    """Average checkpoints into a merged checkpoint (a Hugging Face folder, or the input's own training
    format: ``--to``) with ``merger.json`` and a model card.

    Args:
        models: local folders or one Hub repo id (default ``EleutherAI/pythia-70m``).
        revisions: ``A..B`` or ``r1,r2``; with ``every`` for spaced ranges.
        options: method, dtypes, memory budget, shard size, device, keep.
        output: output folder (default ``merged/<model>-<method>-<first>-<last>``).
        force: replace an existing output folder.
        progress: called with input bytes folded.
        command: the command line, recorded in ``merger.json``.
        prepared: the result of :func:`prepare` for these arguments, to avoid resolving twice.

    Returns:
        (plan, result).

    Raises:
        MergerError: any problem, with a message and a hint; no output is left behind.
    """
    prep = prepared or prepare(models, revisions=revisions, every=every, options=options)
    out = output_path(prep, output, force=force)

    inside = [m for m in models or [] if Path(m).expanduser().is_dir() and
              Path(m).expanduser().resolve() in out.expanduser().absolute().resolve().parents]

    def finalize(tmp: Path, plan: Plan, result: Result) -> None:
        result.duplicates = sorted(set(result.duplicates) | set(prep.duplicates))
        result.warnings += [f"the output {out} lies inside the run folder {m} merged here: later runs of it skip "
                            "it (it holds merger.json), but it mixes a merge with the run's checkpoints"
                            for m in inside]
        manifest.write(tmp, plan, result, command=command)

    world = detect_world()  # torchrun / srun: each rank folds a share (engine/ranked.py)
    if world is not None or (prep.schedule == "blocks" and options.resume and has_rank_records(out)):
        from merger.engine.ranked import average_ranked

        return average_ranked(list(prep.sources), options, prep.plan, out, world or World(), force=force,
                              progress=progress, finalize=finalize)
    if prep.schedule == "stream":
        from merger.engine.stream import run_stream

        return run_stream(list(prep.sources), options, out, force=force, keep=options.keep, progress=progress,
                          finalize=finalize)
    plan = prep.plan
    if plan is None:  # download everything, then blocks
        from merger.sources.hub import fetch

        plan = build([fetch(s) for s in prep.sources], options)
    result = run(plan, out, force=force, progress=progress, finalize=lambda tmp, res: finalize(tmp, plan, res))
    return plan, result
