"""The library entry points; the CLI calls these and nothing else.

    from merger.api import average
    from merger.plan import Options
    plan, result = average(["runs/my-run"], revisions="step1000..step9000", every=1000,
                           options=Options(), output="merged/my-run-lawa")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from merger import manifest
from merger.execute import Result, run
from merger.io import OutputDir
from merger.plan import Options, Plan, build
from merger.sources import Source, resolve_local

DEFAULT_MODEL = "EleutherAI/pythia-70m"


def resolve(models: list[str] | None, revisions: str | None, every: int | None) -> list[Source]:
    """Local folders, or a Hub repo id when the path doesn't exist (see ``hub.py``)."""
    models = list(models or [DEFAULT_MODEL])
    if len(models) == 1 and not Path(models[0]).expanduser().exists():
        from merger.hub import looks_like_repo_id, resolve_hub

        if looks_like_repo_id(models[0]):
            return resolve_hub(models[0], revisions, every)
    return resolve_local(models, revisions, every)


def default_output(sources: list[Source], options: Options) -> Path:
    """``merged/<model>-<method>-<first>-<last>``."""
    first, last = sources[0], sources[-1]
    model = (last.repo_id or "").split("/")[-1] or Path(last.path).resolve().parent.name
    if len(sources) > 1 and first.repo_id is None and Path(first.path).parent != Path(last.path).parent:
        model = "merge"
    span = f"{first.name}-{last.name}" if len(sources) > 1 else last.name
    return Path("merged") / f"{model}-{options.method.name}-{span}"


def output_path(p: Plan, output: str | Path | None, *, force: bool = False) -> Path:
    """The output folder for ``p``, checked (exists without force, overlaps an input) before any work."""
    out = Path(output) if output else default_output(list(p.sources), p.options)
    OutputDir(out, inputs=[s.path for s in p.sources], force=force)
    return out


def plan(models: list[str] | None, *, revisions: str | None = None, every: int | None = None,
         options: Options = Options()) -> Plan:
    """Resolve sources and build the plan (reads headers only)."""
    return build(resolve(models, revisions, every), options)


def average(models: list[str] | None, *, revisions: str | None = None, every: int | None = None,
            options: Options = Options(), output: str | Path | None = None, force: bool = False,
            progress: Callable[[int], None] | None = None, command: list[str] | None = None,
            the_plan: Plan | None = None) -> tuple[Plan, Result]:
    """Average checkpoints into a Hugging Face model folder with ``merger.json`` and a model card.

    Args:
        models: local folders or one Hub repo id (default ``EleutherAI/pythia-70m``).
        revisions: ``A..B`` or ``r1,r2``; with ``every`` for spaced ranges.
        options: method, dtypes, memory budget, shard size, device.
        output: output folder (default ``merged/<model>-<method>-<first>-<last>``).
        force: replace an existing output folder.
        progress: called with input bytes folded.
        command: the command line, recorded in ``merger.json``.
        the_plan: a plan already built by :func:`plan` for these arguments.

    Returns:
        (plan, result).

    Raises:
        MergerError: any problem, with a message and a hint; no output is left behind.
    """
    p = the_plan or plan(models, revisions=revisions, every=every, options=options)
    out = output_path(p, output, force=force)
    result = run(p, out, force=force, progress=progress,
                 finalize=lambda tmp, res: manifest.write(tmp, p, res, command=command))
    return p, result
