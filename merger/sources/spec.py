"""Revision specs and step names.

Revision specs (docs/design.md, "Revision specs"): ``A..B`` (either end may be omitted) with optional ``--every N``
(A, A+N, ... up to B, and B itself), or ``r1,r2,r3``. Names are matched exactly, else by the step
number read from them, so ``step1000`` also finds ``checkpoint-1000`` and ``20`` finds Composer's
``ep0-ba20-rank0``. Order is by step number, never by name; two revisions of one step picked by
step are refused (which one was meant can't be told).
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from merger.errors import RevisionNotFoundError, SourceError, UsageError

# Step names of the frameworks people train with: HF Trainer (checkpoint-N), DeepSpeed (global_stepN),
# Megatron (iter_0001000), Pythia (stepN), torchtitan (step-N), litgpt (step-00000060), OLMo (stepN,
# stage1-stepN), nanoGPT/LAWA (ckpt_N), nanochat (model_000100), torchtune (epoch_N: the epoch is the
# step), Lightning (epoch=E-step=S), Composer (epE-baB-rank0: the batch count); a plain number. Add yours here.
_STEP_PATTERNS = (
    re.compile(r"^(?:global_step|step|step-|step_|checkpoint-|checkpoint_|ckpt-|ckpt_|iter_|iter-|model_|epoch_|"
               r"epoch-)(\d+)$"),
    re.compile(r"^stage\d+-step(\d+)(?:-tokens\d+\w*)?$"),
    re.compile(r"^epoch=\d+-step=(\d+)$"),
    re.compile(r"^ep\d+-ba(\d+)(?:-rank\d+)?$"),
    re.compile(r"^(\d+)$"),
)


def parse_step(name: str) -> int | None:
    """``step1000``/``checkpoint-1000``/``global_step1000``/``iter_0001000``/``step-1000``/
    ``stage1-step1000``/``ep0-ba1000-rank0``/``1000`` -> 1000, ``epoch_3`` -> 3; None when the
    name carries no step."""
    for pat in _STEP_PATTERNS:
        m = pat.match(name.strip())
        if m:
            return int(m.group(1))
    return None


def name_order(name: str) -> list:
    """A sort key for names that carry no step: their digit runs compared as numbers
    (``run2`` before ``run10``), the rest as text."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class RevisionSpec:
    """A parsed ``--revisions`` value: a range (``start``/``stop`` tokens, None = open) or names."""

    names: tuple[str, ...] = ()
    start: str | None = None
    stop: str | None = None
    is_range: bool = False


def parse_spec(spec: str) -> RevisionSpec:
    """Parse ``A..B``, ``A..``, ``..B`` or ``r1,r2,r3``."""
    spec = (spec or "").strip()
    if not spec:
        raise UsageError("--revisions is empty", hint="e.g. --revisions step100000..step143000 or step1000,step2000")
    if ".." in spec:
        a, _, b = spec.partition("..")
        if ".." in b or "," in spec:
            raise UsageError(f"--revisions {spec!r}: a range is A..B", hint="e.g. step100000..step143000")
        return RevisionSpec(start=a.strip() or None, stop=b.strip() or None, is_range=True)
    names = tuple(t.strip() for t in spec.split(","))
    if not all(names):
        raise UsageError(f"--revisions {spec!r} has an empty name", hint="e.g. step1000,step2000,step3000")
    return RevisionSpec(names=names)


def _stepped(available: dict[str, int | None]) -> list[tuple[int, str]]:
    return sorted((s, n) for n, s in available.items() if s is not None)


def _unstepped(available: dict[str, int | None], k: int = 4) -> str:
    """The revisions none of which carries a step, for a hint."""
    names = sorted(available, key=name_order)
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _nearest(available: dict[str, int | None], step: int | None, k: int = 2) -> list[str]:
    """Existing revisions nearest to ``step`` (by step number), at most ``k`` on each side; the
    latest ``k`` for a name without a step. Never one of ``step`` itself (the caller found none)."""
    stepped = [(s, n) for s, n in _stepped(available) if s != step]
    if step is None:
        return [n for _, n in stepped[-k:]]
    steps = [s for s, _ in stepped]
    i = bisect.bisect_left(steps, step)
    return [n for _, n in stepped[max(0, i - k): i]] + [n for _, n in stepped[i: i + k]]


def _not_found(token: str, step: int | None, available: dict[str, int | None], where: str,
               message: str | None = None) -> RevisionNotFoundError:
    near = _nearest(available, step)
    if near:
        hint = "nearest existing revisions: " + ", ".join(near)
    elif available:
        hint = (f"none of the {len(available)} revisions there has a step in its name or its files "
                f"({_unstepped(available)}): select them by name")
    else:
        hint = "no revisions there"
    return RevisionNotFoundError(message or f"revision {token!r} not found in {where}", revision=token,
                                 nearest=near, hint=hint)


def _token_step(token: str, option: str) -> int:
    step = parse_step(token)
    if step is None:
        raise UsageError(f"--revisions: can't read a step number from {token!r} in {option}",
                         hint="range ends are step names such as step1000, checkpoint-1000 or epoch_3, or numbers")
    return step


def _wanted(lo: int, hi: int, every: int):
    """lo, lo+every, ... up to hi, and hi itself (lazily)."""
    s = lo
    while s <= hi:
        yield s
        s += every
    if (hi - lo) % every:
        yield hi


def _first_missing(lo: int, hi: int, every: int, present: list[int], k: int) -> list[int]:
    """The first ``k`` wanted steps (:func:`_wanted`) not in ``present`` (sorted, a subset of
    them): each step walked is either one of ``present`` or one returned, so this is cheap."""
    out: list[int] = []
    it = iter(present)
    cur = next(it, None)
    for s in _wanted(lo, hi, every):
        if s == cur:
            cur = next(it, None)
            continue
        out.append(s)
        if len(out) == k:
            break
    return out


def _empty_range(spec: RevisionSpec, lo: int, hi: int, available: dict[str, int | None], where: str) -> SourceError:
    """A range that selects nothing: the revisions just below and just above it, by step."""
    stepped = _stepped(available)
    below = [n for s, n in stepped if s < lo][-2:]
    above = [n for s, n in stepped if s > hi][:2]
    message = f"--revisions {spec.start or ''}..{spec.stop or ''} selects no revision in {where}"
    if stepped:
        message += f" (steps {lo} to {hi})" if lo <= hi else f" (from step {lo})" if spec.start else f" (to step {hi})"
    if not stepped:
        hint = (f"none of the {len(available)} revisions there has a step in its name or its files "
                f"({_unstepped(available)}): select them by name") if available else None
    else:
        hint = "existing revisions near it: " + "; ".join(
            part for part in (f"below it {', '.join(below)}" if below else "",
                              f"above it {', '.join(above)}" if above else "") if part)
    return SourceError(message, hint=hint)


def select(available: dict[str, int | None], spec: RevisionSpec, every: int | None, *,
           where: str) -> list[str]:
    """Pick revision names from ``available`` (name -> step) by ``spec``; ordered by step.

    Raises:
        UsageError: ``--every`` without a range, ``--every`` < 1, start after stop.
        RevisionNotFoundError: a named or ``--every`` revision that doesn't exist; names the nearest.
        SourceError: an empty range; a step picked by number that two revisions hold.
    """
    if every is not None and every < 1:
        raise UsageError(f"--every {every}: must be a positive number of steps", hint="e.g. --every 5000")
    holders: dict[int, list[str]] = {}
    for name, step in sorted(available.items(), key=lambda kv: name_order(kv[0])):
        if step is not None:
            holders.setdefault(step, []).append(name)

    def at(step: int) -> str:
        names = holders[step]
        if len(names) > 1:
            raise SourceError(f"step {step} is held by {len(names)} revisions in {where}: {', '.join(names)}",
                              hint=f"select one by its name (e.g. --revisions {names[0]}), or move the others "
                                   "out of the folder")
        return names[0]

    def find(token: str) -> str:
        if token in available:
            return token
        step = parse_step(token)
        if step is not None and step in holders:
            return at(step)
        raise _not_found(token, step, available, where)

    if not spec.is_range:
        if every is not None:
            raise UsageError("--every applies to a range A..B, not a list of revisions",
                             hint="e.g. --revisions step100000..step143000 --every 5000")
        picked = list(dict.fromkeys(find(t) for t in spec.names))
    else:
        steps = sorted(holders)
        lo = _token_step(spec.start, "the range start") if spec.start else (steps[0] if steps else 0)
        hi = _token_step(spec.stop, "the range end") if spec.stop else (steps[-1] if steps else -1)
        if lo > hi and spec.start and spec.stop:
            raise UsageError(f"--revisions: the range starts at step {lo}, after its end {hi}",
                             hint="write the older revision first, e.g. step100000..step143000")
        if every is None:
            picked = [at(s) for s in steps if lo <= s <= hi]
            if not picked:
                raise _empty_range(spec, lo, hi, available, where)
        else:
            # never a list of every wanted step (step0..step10000000000 --every 1 would be
            # billions): count them, and walk them only alongside the steps that exist
            n_wanted = (hi - lo) // every + 1 + (1 if (hi - lo) % every else 0)
            present = [s for s in steps if lo <= s <= hi and ((s - lo) % every == 0 or s == hi)]
            if len(present) < n_wanted:
                missing = _first_missing(lo, hi, every, present, 6)
                s = missing[0]
                more = ""
                if n_wanted - len(present) > 1:
                    more = f" (and {n_wanted - len(present) - 1} more: {', '.join(map(str, missing[1:6]))}...)"
                err = _not_found(str(s), s, available, where, f"revision for step {s} not found in {where}{more}")
                if err.nearest:
                    err.hint += "; or change --every"
                raise err
            picked = [at(s) for s in present]
    if all(available[n] is not None for n in picked):
        picked.sort(key=lambda n: available[n])  # stable: revisions of one step (picked by name) keep their order
    return picked
