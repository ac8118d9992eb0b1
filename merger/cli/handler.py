"""The one error path of every command, and the command class that lays out their help.

A command raises; :meth:`MergerGroup.invoke`, which runs every command (under ``merger``,
``python -m merger`` and ``CliRunner`` alike), turns what it raised into what the user sees:

- ``MergerError`` -> ``Error: <message>`` and ``hint: <hint>`` on stderr, exit 1;
- any other exception likewise, as ``unexpected <type>: ...``, without a traceback;
- Ctrl-C -> one line saying nothing was published, exit 130;
- with ``--debug`` (every command has it, :data:`merger.cli.options.Debug`) the exception
  propagates and Python prints the traceback.

Parse errors (an unknown option, a value outside a choice) stay click's: usage, the error, exit 2.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from merger.cli import ui
from merger.errors import MergerError


def report(exc: BaseException) -> int:
    """Show ``exc`` on stderr as merger's errors read; the exit status to end with."""
    if isinstance(exc, KeyboardInterrupt):
        ui.err.print("[red]Interrupted[/]: no output was published; run the same command with --resume "
                     "to keep the shards already finished.")
        return 130
    if not isinstance(exc, MergerError):  # a bug or an unforeseen environment problem
        exc = MergerError(f"unexpected {type(exc).__name__}: {exc}",
                          hint="run again with --debug for the traceback, and report it")
    ui.show_error(exc)
    return 1


def _is_click(e: BaseException) -> bool:
    """typer.Exit, typer.Abort or a click usage error (typer vendors click: matched by name)."""
    return isinstance(e, (typer.Exit, typer.Abort)) or any(c.__name__ == "ClickException" for c in type(e).__mro__)


class MergerGroup(TyperGroup):
    """The ``merger`` app: runs the command and, where it fails, :func:`report`\\ s why."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as e:  # noqa: BLE001 - every command's errors end here
            if _is_click(e) or ctx.meta.get("merger:debug"):
                raise  # exits and usage errors are click's to print; --debug shows the traceback
            raise typer.Exit(report(e)) from None
        except KeyboardInterrupt as e:
            if ctx.meta.get("merger:debug"):
                raise
            raise typer.Exit(report(e)) from None


def unwrap(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line, so the terminal wraps them at its own width."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


class MergerCommand(TyperCommand):
    """A command whose docstring paragraphs flow to the terminal's width (typer's rich help keeps
    a docstring's line breaks)."""

    def __init__(self, name: str | None, *, help: str | None = None, **kwargs: Any) -> None:
        super().__init__(name, help=unwrap(help), **kwargs)
