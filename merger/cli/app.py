"""The ``merger`` command line: one Typer app; each command only declares options and calls one
library function. Each command module keeps its examples as a constant (``EXAMPLES``), passed
here at registration as the command's ``epilog``, so every ``--help`` ends the same way.

Errors print ``Error: ...`` and a hint on stderr and exit 1; ``--debug`` shows the traceback
(one handler for every command: :class:`merger.cli.handler.MergerGroup`).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from merger import __version__
from merger.cli import average, eval as eval_cli, grow, sweep
from merger.cli.handler import MergerCommand, MergerGroup

app = typer.Typer(
    name="merger", cls=MergerGroup, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Average the checkpoints of one LLM training run (LAWA, EMA, PMA) and evaluate them.")


def _version(value: bool) -> None:
    if value:
        print(f"merger {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """merger: checkpoint averaging for LLM pre-training runs."""


app.command("average", cls=MergerCommand, epilog=average.EXAMPLES)(average.average_command)
app.command("eval", cls=MergerCommand, epilog=eval_cli.EXAMPLES)(eval_cli.eval_command)
app.command("sweep", cls=MergerCommand, epilog=sweep.EXAMPLES)(sweep.sweep_command)
app.command("grow", cls=MergerCommand, epilog=grow.EXAMPLES)(grow.grow_command)


def main() -> None:
    """The ``merger`` console script."""
    for stream in (sys.stdout, sys.stderr):  # a path that isn't UTF-8 (byte 0xff) prints escaped, never fails
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    app()


if __name__ == "__main__":
    main()
