"""Everything merger shows a person: rich console on stderr, results on stdout, progress, errors.

The library never prints; commands in ``cli.py`` call these helpers. Progress bars are transient
and only drawn when stderr is a terminal; ``--json`` output on stdout stays clean for pipes.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout (one JSON document)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(msg: str) -> None:
    """A status line for people, on stderr."""
    err.print(msg)


@contextmanager
def byte_progress(description: str, total: int) -> Iterator[Any]:
    """A transient bytes progress bar on stderr; yields ``advance(nbytes)``."""
    if not err.is_terminal:
        yield lambda n: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


def show_error(exc: BaseException) -> None:
    """``Error: ...`` (and ``hint: ...``) on stderr, without a traceback."""
    message = getattr(exc, "message", None) or str(exc)
    problems = getattr(exc, "problems", None) or []
    err.print(f"[bold red]Error:[/] {message}", markup=True, highlight=False)
    for p in problems:
        err.print(f"  - {p}", markup=False)
    hint = getattr(exc, "hint", None)
    if hint:
        err.print(f"[yellow]hint:[/] {hint}", markup=True, highlight=False)
