"""Sources: turn ``MODEL`` + a revision spec into the ordered list of checkpoints to merge, each
pinned before a byte of weights is read.

MODEL is one of
- a local run: a folder of revision subfolders (``step1000/``, ``checkpoint-1000/``, ``step-1000/``,
  ``global_step1000/``, ``iter_0001000/``, ``epoch_3/``) or files (``ckpt_1000.pt``,
  ``ep0-ba1000-rank0.pt``), selected with ``--revisions`` (``local.py``);
- one or more explicit checkpoints, merged as given (``local.py``);
- a Hub repo id (``EleutherAI/pythia-70m``), whose branches are the revisions, each pinned to its
  commit (``hub.py``).
Revision specs and step names are parsed in ``spec.py``. Revisions are ordered by step number, never
by name; where the order can't be established, ``plan/order.py`` warns (``--strict``: refuses).

**Add a kind of source**: a module here with a ``resolve_<kind>(...) -> list[Source]`` that pins
every revision (path, or repo + commit + file list), called from :func:`resolve`; a new run layout's
step names go in ``spec._STEP_PATTERNS``. Tests in ``tests/sources/``.
"""

from __future__ import annotations

from pathlib import Path

from merger.sources.local import resolve_local
from merger.sources.source import Source
from merger.sources.spec import RevisionSpec, parse_spec, parse_step, select

DEFAULT_MODEL = "EleutherAI/pythia-70m"


def resolve(models: list[str] | None, revisions: str | None, every: int | None) -> list[Source]:
    """Local paths, or a Hub repo id when the path doesn't exist (see ``hub.py``).

    Raises:
        SourceError, UsageError, RevisionNotFoundError: see :func:`resolve_local` and
            :func:`merger.sources.hub.resolve_hub`.
    """
    models = list(models or [DEFAULT_MODEL])
    if len(models) == 1 and not Path(models[0]).expanduser().exists():
        from merger.sources.hub import looks_like_repo_id, resolve_hub

        if looks_like_repo_id(models[0]):
            return resolve_hub(models[0], revisions, every)
    return resolve_local(models, revisions, every)


__all__ = ["DEFAULT_MODEL", "RevisionSpec", "Source", "parse_spec", "parse_step", "resolve", "select"]
