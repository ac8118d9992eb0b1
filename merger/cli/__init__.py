"""The command line: ``app.py`` (the Typer app and its commands), ``handler.py`` (the one error
handler and shared option aliases), one module per command (``average.py``, ``eval.py``,
``sweep.py``), ``ui.py`` (everything that talks to the terminal: rich tables, progress, errors).

**Add a command**: a module here with a plain function whose parameters are ``Annotated`` Typer
options, whose body calls one library function and shows its result with ``ui``; register it in
``app.py`` with ``app.command("name")(guarded(fn))``. Tests in ``tests/cli/`` through ``CliRunner``.
"""

from merger.cli.app import app, main

__all__ = ["app", "main"]
