"""Whether the inputs' order is established, and what hangs on it.

Sources come oldest first, ordered by step (``sources/spec.py``). Where a source has no step (none in
its name, its folder's name or its file's counters) or two share one, their order is only the order
listed; every method but ``uniform`` weights by position, and the last input is the one whose side
files (``config.json`` ...) and training state are carried into the output. Then :func:`order_warning`
says so, and ``--strict`` makes it an error.
"""

from __future__ import annotations

from merger.errors import SourceError
from merger.sources import Source


def order_warning(sources: list[Source], method: str, *, copied: tuple[str, ...] = (),
                  carries_state: bool = False) -> str | None:
    """A warning when the order of ``sources`` can't be established and something depends on it.

    Args:
        sources: oldest first, as they will be merged.
        method: the method's name (``uniform`` weights don't depend on the order).
        copied: the files copied from the last source into the output.
        carries_state: the output carries the last source's training state (a training format's own).

    Returns:
        The warning, or None when the order is known (every step known and distinct) or nothing
        depends on it.
    """
    if len(sources) < 2:
        return None
    unknown = [s.name for s in sources if s.step is None]
    seen: dict[int, list[str]] = {}
    for s in sources:
        if s.step is not None:
            seen.setdefault(s.step, []).append(s.name)
    ties = {step: names for step, names in seen.items() if len(names) > 1}
    if not unknown and not ties:
        return None
    hangs = []
    if method != "uniform":
        hangs.append(f"the weights of --method {method}")
    if copied:
        hangs.append(f"the files copied from the last one ({', '.join(copied[:3])}{' ...' if len(copied) > 3 else ''})")
    if carries_state:
        hangs.append("the training state carried from the last one")
    if not hangs:
        return None
    why = []
    if unknown:
        why.append(f"no step for {', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''} in "
                   "their names, their folders' names or their files")
    why += [f"{' and '.join(names)} share step {step}" for step, names in list(ties.items())[:3]]
    shown = ", ".join(s.name for s in sources[:6]) + (" ..." if len(sources) > 6 else "")
    return (f"the order of the {len(sources)} checkpoints can't be established ({'; '.join(why)}): they are "
            f"merged as listed, oldest first ({shown}), and that sets {' and '.join(hangs)}")


def check_order(sources: list[Source], method: str, *, strict: bool, copied: tuple[str, ...] = (),
                carries_state: bool = False) -> list[str]:
    """:func:`order_warning` as a list of warnings, or, with ``strict``, as an error.

    Raises:
        SourceError: with ``strict``, when the order can't be established and something depends on it.
    """
    w = order_warning(sources, method, copied=copied, carries_state=carries_state)
    if w is not None and strict:
        raise SourceError(w, hint="name each revision by step (step1000/, epoch_3/, ...) or put it in a folder "
                                  "named so; without --strict they are merged in the order listed")
    return [w] if w else []
