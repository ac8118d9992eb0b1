"""The one error handler of every command, and the option aliases they share.

``MergerError`` -> ``Error: <message>`` and ``hint: <hint>`` on stderr, exit 1; anything else
likewise, without a traceback; ``--debug`` shows the traceback. Ctrl-C: exit 130.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from typing import Annotated, Callable, Iterator

import typer

from merger.cli import ui
from merger.errors import MergerError

Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.")]
Json = Annotated[bool, typer.Option("--json", help="Print a JSON result on stdout (for scripts).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]


@contextmanager
def errors_handled(debug: bool) -> Iterator[None]:
    """MergerError -> ``Error: ...`` + hint, exit 1; anything else likewise, without a traceback."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        ui.err.print("[red]Interrupted[/]: no output was published; run the same command with --resume "
                     "to keep the shards already finished.")
        raise typer.Exit(130) from None
    except MergerError as e:
        if debug:
            raise
        ui.show_error(e)
        raise typer.Exit(1) from None
    except Exception as e:  # noqa: BLE001 - a bug or an unforeseen environment problem
        if debug:
            raise
        ui.show_error(MergerError(f"unexpected {type(e).__name__}: {e}",
                                  hint="run again with --debug for the traceback, and report it"))
        raise typer.Exit(1) from None


def guarded(fn: Callable) -> Callable:
    """Give a command from another module ``--debug`` and the same error handling."""
    sig = inspect.signature(fn, eval_str=True)
    params = [*sig.parameters.values(),
              inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Debug)]

    @functools.wraps(fn)
    def wrapper(*args, debug: bool = False, **kwargs):
        with errors_handled(debug):
            return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}  # evaluated, for get_type_hints
    del wrapper.__wrapped__  # typer must see the new signature
    return wrapper
