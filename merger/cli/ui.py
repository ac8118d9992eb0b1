"""Everything merger shows a person: rich console on stderr, results on stdout, progress, errors.

The library never prints; the command modules (``average.py``, ``eval.py``, ...) call these
helpers. Progress bars are transient and only drawn when stderr is a terminal; ``--json`` output
on stdout stays clean for pipes.

Text from outside (paths, revision names, messages that quote them) is never read as rich markup:
a folder named ``run/[bold red]x[/]`` prints as it is. Messages and table cells are printed as
plain text; where markup styles a line (``[yellow]warning:[/]``), the rest is :func:`escape`d.
"""

from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def print_json(obj: Any) -> None:
    """Machine-readable result on stdout (one JSON document)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def info(msg: str) -> None:
    """A status line for people, on stderr (plain text: never read as markup)."""
    err.print(msg, markup=False)


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
    err.print(f"[bold red]Error:[/] {escape(message)}", markup=True, highlight=False)
    for p in problems:
        err.print(f"  - {p}", markup=False)
    hint = getattr(exc, "hint", None)
    if hint:
        err.print(f"[yellow]hint:[/] {escape(hint)}", markup=True, highlight=False)


def number(x: float | None) -> str:
    """A score in a table: 4 decimals; large or non-finite values (perplexities of random models reach
    1e18) with 4 significant digits; None as ``-``."""
    if x is None:
        return "-"
    return f"{x:.4f}" if math.isfinite(x) and abs(x) < 1e4 else f"{x:.4g}"


def change(d: float, higher_is_better: bool | None) -> Text:
    """A signed difference, green where it is an improvement, red where it is worse, dim otherwise."""
    good = None if higher_is_better is None or d == 0 else (d > 0) == higher_is_better
    return Text(f"{'+' if d >= 0 else ''}{number(d)}", style={True: "green", False: "red"}.get(good, "dim"))


def arrow(higher_is_better: bool | None) -> str:
    """`` ↑`` / `` ↓`` after a metric's name: which way is better."""
    return {True: " ↑", False: " ↓"}.get(higher_is_better, "")


def table(title: str, columns: list[tuple[str, str]], rows: list[list], *, lines: bool = False) -> Table:
    """The one way results are tabulated: ``columns`` as (header, justify), ``rows`` of cells.

    Strings (the title, headers, cells) are plain text, never markup: they hold model paths and
    revision names. Style a cell by passing a :class:`rich.text.Text`."""
    def plain(x):
        return Text(x) if isinstance(x, str) else x

    t = Table(title=plain(title), show_lines=lines)
    for head, justify in columns:
        t.add_column(plain(head), justify=justify, overflow="fold")
    for r in rows:
        t.add_row(*map(plain, r))
    return t


def _size(n: float) -> str:
    from merger.units import format_size

    return format_size(n)


def plan_view(prep) -> Any:
    """A rich renderable of a prepared merge (``api.Prepared``): inputs with weights, schedule, estimates."""
    from rich.console import Group
    from rich.table import Table

    d = prep.to_dict()
    plan = prep.plan
    weights = d["weights"]
    t = Table(title=f"merge plan: {d['method']} over {len(prep.sources)} checkpoints", title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("revision")
    t.add_column("step", justify="right")
    t.add_column("weight", justify="right")
    t.add_column("source")
    for i, (s, w) in enumerate(zip(prep.sources, weights), 1):
        src = f"{s.repo_id}@{s.commit[:10]}" if s.commit else str(s.path)
        if s.repo_id and s.path is None:
            src += " (to download)"
        t.add_row(str(i), Text(s.name), "" if s.step is None else str(s.step), f"{w:.6f}", Text(src))
    dups = [f"[yellow]note:[/] {escape(a)} and {escape(b)} have identical weight files"
            for a, b in d["duplicate_revisions"]]
    if plan is None:
        return Group(t, f"schedule: {d['schedule']}, download {_size(d['download_bytes'])}, "
                        f"peak disk about {_size(d['peak_disk'])}", *dups)
    dtypes = ", ".join(sorted({f"{a}->{b}" if a != b else a for a, b in
                               ((x.dtype, x.out_dtype) for x in plan.tensors if x.averaged)}))
    facts = [
        f"tensors: {d['tensors']} ({d['averaged_tensors']} averaged), parameters: {d['parameters']:,}",
        f"dtype: {dtypes}, accumulate: {d['accumulate']}, device: {d['device']}, kernel: {d['kernel']} "
        f"({d['threads']} thread{'s' if d['threads'] != 1 else ''}"
        f"{', ' + d['kernel_note'] if d['kernel_note'] else ''})",
        f"schedule: {d['schedule']}, {d['blocks']} blocks, working set {_size(d['estimated_memory'])} "
        f"of --max-memory {_size(d['max_memory'])}",
        f"reads {_size(d['read_bytes'])}, writes {_size(d['output_bytes'])} in {len(d['shards'])} shard(s)",
    ]
    facts += [f"[yellow]warning:[/] {escape(w)}" for w in d["warnings"]] + dups
    return Group(t, *facts)


def result_view(plan, result) -> str:
    """One human summary of a finished merge (markup: paths, names and warnings escaped)."""
    r = result.to_dict()
    lines = [f"merged {len(plan.sources)} checkpoints -> {escape(str(r['output']))}",
             f"  {_size(r['read_bytes'])} read in {r['seconds']:.2f} s ({_size(r['read_rate'])}/s), "
             f"{_size(r['written_bytes'])} written, peak RSS {_size(r['peak_rss'])}",
             f"  {len(r['copied_tensors'])} tensors identical in every input copied bit for bit"]
    for a, b in r["duplicate_revisions"]:
        lines.append(f"  note: {escape(a)} and {escape(b)} have identical weights")
    if r.get("resumed_shards"):
        lines.append(f"  resumed: {len(r['resumed_shards'])} shards kept from the interrupted run (sha256 checked)")
    lines += [f"  warning: {escape(w)}" for w in r.get("warnings", [])]
    return "\n".join(lines)
