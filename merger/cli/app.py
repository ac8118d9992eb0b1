"""The ``merger`` command line: one Typer app; each command only declares options and calls one
library function.

    merger average --revisions step100000..step143000 --every 5000      # Pythia-70m from the Hub
    merger average runs/my-run --revisions ..step9000 --method ema --decay 0.9 -o merged/ema
    merger eval merged/pythia-70m-uniform-step100000-step143000 EleutherAI/pythia-70m@step143000

Errors print ``Error: ...`` and a hint on stderr and exit 1; ``--debug`` shows the traceback
(``handler.py``).
"""

from __future__ import annotations

import sys

from typing import Annotated

import typer

from merger import __version__
from merger.cli.average import average_command
from merger.cli.eval import eval_command
from merger.cli.grow import grow_command
from merger.cli.handler import guarded
from merger.cli.sweep import sweep_command

app = typer.Typer(
    name="merger", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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


app.command("average")(average_command)
app.command("eval")(guarded(eval_command))
app.command("sweep")(guarded(sweep_command))
app.command("grow")(guarded(grow_command))


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a path that isn't UTF-8 (byte 0xff) prints escaped, never fails
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    app()


if __name__ == "__main__":
    main()
