"""Sources: turn ``MODEL`` + a revision spec into the ordered list of checkpoints to merge.

MODEL is one of
- a local folder of revision subfolders (``step1000/``, ``checkpoint-1000/``, ``global_step1000/``,
  ``iter_0001000/``), selected with ``--revisions``;
- one or more explicit checkpoint folders (each holding weights);
- a Hub repo id (``EleutherAI/pythia-70m``), whose branches are the revisions (see ``hub.py``).

Revision specs (DESIGN.md): ``A..B`` (either end may be omitted) with optional ``--every N``
(A, A+N, ... up to B, and B itself), or ``r1,r2,r3``. Names are matched exactly, else by the step
number read from them, so ``step1000`` also finds ``checkpoint-1000``. Order is by step.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from merger.errors import RevisionNotFoundError, SourceError, UsageError
from merger.formats import WEIGHT_FILES

_STEP_PATTERNS = (
    re.compile(r"^(?:global_step|step|checkpoint-|checkpoint_|ckpt-|ckpt_|iter_|iter-)(\d+)$"),
    re.compile(r"^(\d+)$"),
)


def parse_step(name: str) -> int | None:
    """``step1000``/``checkpoint-1000``/``global_step1000``/``iter_0001000``/``1000`` -> 1000."""
    for pat in _STEP_PATTERNS:
        m = pat.match(name.strip())
        if m:
            return int(m.group(1))
    return None


@dataclass(frozen=True)
class Source:
    """One checkpoint to merge, pinned: a local folder, or a Hub revision at a commit."""

    name: str
    step: int | None
    path: str | None  # the local folder with the files (None until a Hub revision is fetched)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: tuple[tuple[str, int, str | None], ...] = field(default=(), compare=False)  # (name, size, sha256)

    def to_dict(self) -> dict:
        d = {"name": self.name, "step": self.step, "path": self.path}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        return d


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
            wanted = list(range(lo, hi + 1, every))
            if wanted[-1] != hi:
                wanted.append(hi)
            missing = [s for s in wanted if s not in by_step]
            if missing:
                s = missing[0]
                near = _nearest(available, s)
                more = ""
                if len(missing) > 1:
                    more = f" (and {len(missing) - 1} more: {', '.join(map(str, missing[1:6]))}...)"
                raise RevisionNotFoundError(
                    f"revision for step {s} not found in {where}{more}", revision=str(s), nearest=near,
                    hint=("nearest existing revisions: " + ", ".join(near) + "; or change --every") if near else None)
            picked = [by_step[s] for s in wanted]
    if all(available[n] is not None for n in picked):
        picked.sort(key=lambda n: available[n])
    return picked


def has_weights(folder: Path) -> bool:
    return any((folder / f).exists() for f in WEIGHT_FILES)


def local_revisions(root: Path) -> dict[str, int | None]:
    """Subfolders of ``root`` that hold a checkpoint: name -> step (None if unnamed by step)."""
    return {p.name: parse_step(p.name) for p in sorted(root.iterdir()) if p.is_dir() and has_weights(p)}


def resolve_local(models: list[str], revisions: str | None, every: int | None) -> list[Source]:
    """Sources from local paths: one root of revision folders, or explicit checkpoint folders.

    Raises:
        SourceError: a path that doesn't exist or holds no checkpoints.
        UsageError / RevisionNotFoundError: see :func:`select`.
    """
    paths = [Path(m).expanduser() for m in models]
    for p in paths:
        if not p.is_dir():
            raise SourceError(f"{p}: no such folder", hint="give a checkpoint folder, a folder of revision "
                              "subfolders (step1000/ ...) or a Hub repo id such as EleutherAI/pythia-70m")
    if len(paths) == 1 and not has_weights(paths[0]):
        root = paths[0].resolve()
        available = local_revisions(root)
        if not available:
            raise SourceError(f"{root}: no checkpoint folders inside (no step1000/, checkpoint-1000/ ... "
                              "holding model.safetensors or pytorch_model.bin)",
                              hint="point at the folder that holds the revision subfolders")
        if revisions is None:
            if every is not None:
                raise UsageError("--every needs --revisions A..B", hint="e.g. --revisions ..step9000 --every 1000")
            names = select(available, RevisionSpec(is_range=True), None, where=str(root)) \
                if any(s is not None for s in available.values()) else sorted(available)
        else:
            names = select(available, parse_spec(revisions), every, where=str(root))
        return [Source(n, available[n], str(root / n)) for n in names]
    if revisions is not None or every is not None:
        raise UsageError("--revisions/--every select subfolders of one folder; explicit checkpoint folders "
                         "are merged as given", hint="drop --revisions, or give the parent folder")
    for p in paths:
        if not has_weights(p):
            raise SourceError(f"{p}: no weights inside (expected one of {', '.join(WEIGHT_FILES)})",
                              hint="give checkpoint folders, or one folder of revision subfolders")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("the same checkpoint folder is given twice", hint="list each checkpoint once")
    srcs = [Source(p.name, parse_step(p.name), str(p)) for p in resolved]
    if all(s.step is not None for s in srcs):
        srcs.sort(key=lambda s: s.step)
    return srcs
