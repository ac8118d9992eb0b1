"""The command line: ``app.py`` (the Typer app and its commands), ``handler.py`` (the one error
handler, :class:`merger.cli.handler.MergerGroup`, and the command class), ``options.py`` (help
panels, choices checked at parse time, shared option aliases, the examples layout), one module per
command (``average.py``, ``eval.py``, ``sweep.py``, ``grow.py``), ``ui.py`` (everything that talks
to the terminal: rich tables, progress, errors).

**Add a command**: a module here with a plain function whose parameters are ``Annotated`` Typer
options (each with its ``rich_help_panel``, a choice as an ``Enum``, ``debug: Debug = False``
last), whose body calls one library function and shows its result with ``ui``, and an ``EXAMPLES =
examples(...)`` constant; register it in ``app.py`` with ``app.command("name", cls=MergerCommand,
epilog=module.EXAMPLES)(fn)``. Raise :class:`merger.errors.MergerError` subclasses: the group shows
them. Tests in ``tests/cli/`` through ``CliRunner``.
"""

from merger.cli.app import app, main

__all__ = ["app", "main"]
