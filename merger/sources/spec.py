"""Revision specs and step names.

Revision specs (docs/design.md, "Revision specs"): ``A..B`` (either end may be omitted) with optional ``--every N``
(A, A+N, ... up to B, and B itself), or ``r1,r2,r3``. Names are matched exactly, else by the step
number read from them, so ``step1000`` also finds ``checkpoint-1000``. Order is by step.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from merger.errors import RevisionNotFoundError, SourceError, UsageError

# Step names of the frameworks people train with: HF Trainer (checkpoint-N), DeepSpeed (global_stepN),
# Megatron (iter_0001000), Pythia (stepN), torchtitan (step-N), OLMo (stepN, stage1-stepN), nanoGPT/LAWA
# (ckpt_N), nanochat (model_000100), Lightning (epoch=E-step=S); a plain number. Add yours here.
_STEP_PATTERNS = (
    re.compile(r"^(?:global_step|step|step-|step_|checkpoint-|checkpoint_|ckpt-|ckpt_|iter_|iter-|model_)(\d+)$"),
    re.compile(r"^stage\d+-step(\d+)(?:-tokens\d+\w*)?$"),
    re.compile(r"^epoch=\d+-step=(\d+)$"),
    re.compile(r"^(\d+)$"),
)


def parse_step(name: str) -> int | None:
    """``step1000``/``checkpoint-1000``/``global_step1000``/``iter_0001000``/``step-1000``/
    ``stage1-step1000``/``1000`` -> 1000; None when the name carries no step."""
    for pat in _STEP_PATTERNS:
        m = pat.match(name.strip())
        if m:
            return int(m.group(1))
    return None


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


def _nearest(available: dict[str, int | None], step: int | None, k: int = 2) -> list[str]:
    """Existing revisions nearest to ``step`` (by step number), at most ``k`` on each side."""
    stepped = sorted((s, n) for n, s in available.items() if s is not None)
    if step is None or not stepped:
        return [n for _, n in stepped[-k:]] or sorted(available)[:k]
    steps = [s for s, _ in stepped]
    i = bisect.bisect_left(steps, step)
    return [n for _, n in stepped[max(0, i - k): i]] + [n for _, n in stepped[i: i + k]]


def _token_step(token: str, option: str) -> int:
    step = parse_step(token)
    if step is None:
        raise UsageError(f"--revisions: can't read a step number from {token!r} in {option}",
                         hint="range ends are step names such as step1000 or checkpoint-1000, or numbers")
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


def select(available: dict[str, int | None], spec: RevisionSpec, every: int | None, *,
           where: str) -> list[str]:
    """Pick revision names from ``available`` (name -> step) by ``spec``; ordered by step.

    Raises:
        UsageError: ``--every`` without a range, ``--every`` < 1, start after stop.
        RevisionNotFoundError: a named or ``--every`` revision that doesn't exist; names the nearest.
        SourceError: an empty range.
    """
    if every is not None and every < 1:
        raise UsageError(f"--every {every}: must be a positive number of steps", hint="e.g. --every 5000")
    by_step: dict[int, str] = {}
    for name, step in sorted(available.items(), key=lambda kv: (len(kv[0]), kv[0])):
        if step is not None:
            by_step.setdefault(step, name)

    def find(token: str) -> str:
        if token in available:
            return token
        step = parse_step(token)
        if step is not None and step in by_step:
            return by_step[step]
        near = _nearest(available, step)
        raise RevisionNotFoundError(
            f"revision {token!r} not found in {where}", revision=token, nearest=near,
            hint=("nearest existing revisions: " + ", ".join(near)) if near else "no revisions there")

    if not spec.is_range:
        if every is not None:
            raise UsageError("--every applies to a range A..B, not a list of revisions",
                             hint="e.g. --revisions step100000..step143000 --every 5000")
        picked = list(dict.fromkeys(find(t) for t in spec.names))
    else:
        steps = sorted(by_step)
        lo = _token_step(spec.start, "the range start") if spec.start else (steps[0] if steps else 0)
        hi = _token_step(spec.stop, "the range end") if spec.stop else (steps[-1] if steps else -1)
        if lo > hi:
            raise UsageError(f"--revisions: the range starts at step {lo}, after its end {hi}",
                             hint="write the older revision first, e.g. step100000..step143000")
        if every is None:
            picked = [by_step[s] for s in steps if lo <= s <= hi]
            if not picked:
                near = _nearest(available, lo)
                raise SourceError(f"--revisions {spec.start or ''}..{spec.stop or ''} selects no revision in {where}",
                                  hint=("existing revisions near it: " + ", ".join(near)) if near else None)
        else:
            # never a list of every wanted step (step0..step10000000000 --every 1 would be
            # billions): count them, and walk them only alongside the steps that exist
            n_wanted = (hi - lo) // every + 1 + (1 if (hi - lo) % every else 0)
            present = [s for s in steps if lo <= s <= hi and ((s - lo) % every == 0 or s == hi)]
            if len(present) < n_wanted:
                missing = _first_missing(lo, hi, every, present, 6)
                s = missing[0]
                near = _nearest(available, s)
                more = ""
                if n_wanted - len(present) > 1:
                    more = f" (and {n_wanted - len(present) - 1} more: {', '.join(map(str, missing[1:6]))}...)"
                raise RevisionNotFoundError(
                    f"revision for step {s} not found in {where}{more}", revision=str(s), nearest=near,
                    hint=("nearest existing revisions: " + ", ".join(near) + "; or change --every") if near else None)
            picked = [by_step[s] for s in present]
    if all(available[n] is not None for n in picked):
        picked.sort(key=lambda n: available[n])
    return picked


