"""Typed errors. Each says what went wrong, where, and how to fix it.

The CLI prints ``Error: <message>`` and ``hint: <hint>`` on stderr and exits 1; the traceback is
shown only with ``--debug``. Library callers catch :class:`MergerError` or a subclass.
"""

from __future__ import annotations


class MergerError(Exception):
    """Base class of every error merger raises on purpose.

    Args:
        message: what went wrong and where (file, tensor, revision).
        hint: how to fix it, one sentence; optional.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class UsageError(MergerError):
    """Bad option values: revision specs, weights, sizes, dtypes."""


class SourceError(MergerError):
    """A model, revision or checkpoint folder can't be found or resolved."""


class RevisionNotFoundError(SourceError):
    """A requested revision does not exist; ``nearest`` lists existing neighbours."""

    def __init__(self, message: str, *, revision: str, nearest: list[str], hint: str | None = None):
        super().__init__(message, hint=hint)
        self.revision = revision
        self.nearest = nearest


class CheckpointFormatError(MergerError):
    """A weights file is unreadable, truncated, corrupt or unsafe to load."""

    def __init__(self, message: str, *, path: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.path = path


class PlanError(MergerError):
    """Inputs disagree (names, shapes, dtypes). ``problems`` lists every mismatch found."""

    def __init__(self, message: str, *, problems: list[str], hint: str | None = None):
        super().__init__(message, hint=hint)
        self.problems = problems

    def __str__(self) -> str:
        lines = [self.message, *[f"  - {p}" for p in self.problems]]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class TensorError(MergerError):
    """A tensor's values forbid the merge (NaN/Inf, differing integer buffers)."""

    def __init__(self, message: str, *, tensor: str, revisions: list[str], hint: str | None = None):
        super().__init__(message, hint=hint)
        self.tensor = tensor
        self.revisions = revisions


class OutputError(MergerError):
    """The output folder can't be created, exists already, or would land inside an input."""


class EvalError(MergerError):
    """A model or task given to ``merger eval`` can't be evaluated."""


class RankError(MergerError):
    """Another rank of the same merge failed or died; the message names it.

    Args:
        rank: the rank that failed.
        dead: it stopped responding (killed, node lost), rather than reporting an error.
    """

    def __init__(self, message: str, *, rank: int, dead: bool = False, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.rank = rank
        self.dead = dead
