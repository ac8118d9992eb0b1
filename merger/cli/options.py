"""What the commands share: help panels, choice types checked at parse time, option aliases and
the layout of every command's examples block.

A choice (``--method``, ``--shape``, ``--to``, ``--accumulate``, ``--init``) is an ``Enum`` built
from the library's own table of names, so ``--help`` lists the choices, click refuses any other
value before a command runs (exit 2) and shells can complete them. ``--device`` is open-ended
(``cuda:N``): a callback checks its form at parse time; whether ``cuda:7`` exists is the library's
check, when the command runs.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated

import typer
from rich.markup import escape

from merger.output.convert import OUTPUTS
from merger.plan.decay import SHAPES
from merger.plan.methods import METHODS

# the panels of `merger average --help`, in the order they print (the other commands use the same words)
SELECTION, METHOD, OUTPUT, RESOURCES, SAFETY, EVALUATION = (
    "Selection", "Method", "Output", "Resources", "Resume and safety", "Evaluation")


def _choices(name: str, values) -> type[Enum]:
    return Enum(name, [(v.replace("-", "_"), v) for v in values], type=str)


MethodChoice = _choices("MethodChoice", METHODS)
ShapeChoice = _choices("ShapeChoice", SHAPES)
# gpt2 is what --to hf becomes for a nanoGPT model (merger.output.convert), never asked for by name
OutputChoice = _choices("OutputChoice", [name for name in OUTPUTS if name != "gpt2"])
AccumulateChoice = _choices("AccumulateChoice", ("auto", "float32", "float64"))
InitChoice = _choices("InitChoice", ("mup", "standard"))
SWEEP_METHODS = ("uniform", "ema", "decay")  # merger.eval.sweep.SERIES without raw


def one_of(choice: type[Enum]) -> str:
    """``a | b | c``: a choice's values, for its help (the metavar column stays narrow at 80 columns)."""
    return " | ".join(c.value for c in choice)


def value(choice: Enum | str | None) -> str | None:
    """The string behind a choice (what the library takes)."""
    return choice.value if isinstance(choice, Enum) else choice


def _check_device(spec: str, *, allow_mps: bool) -> str:
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?" + ("|mps" if allow_mps else ""), spec):
        return spec
    raise typer.BadParameter(f"{spec!r} is not a device: use auto, cpu, cuda or cuda:N"
                             + (" (or mps)" if allow_mps else ""))


def merge_device(spec: str) -> str:
    return _check_device(spec, allow_mps=False)


def eval_device(spec: str) -> str:
    return _check_device(spec, allow_mps=True)


def sweep_methods(text: str) -> str:
    """``--methods uniform,ema``: every item one of :data:`SWEEP_METHODS`."""
    bad = [t for t in (t.strip() for t in text.split(",")) if t and t not in SWEEP_METHODS]
    if bad:
        raise typer.BadParameter(f"{', '.join(map(repr, bad))}: use a comma-separated list of "
                                 f"{', '.join(SWEEP_METHODS)}")
    return text


def _remember_debug(ctx: typer.Context, flag: bool) -> bool:
    ctx.meta["merger:debug"] = flag  # read by handler.MergerGroup.invoke when the command fails
    return flag


# beside --help in every command's Options panel
Debug = Annotated[bool, typer.Option("--debug", help="Show the full traceback on errors.", is_eager=True,
                                     callback=_remember_debug)]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).",
                                    rich_help_panel=OUTPUT)]


def examples(*lines: str) -> str:
    """One command's examples block (its ``epilog``): ``$ merger ...`` lines under a bold title.
    A line ``# ...`` is a comment about the example after it. Each fits 76 columns, so the block
    prints unbroken at 80."""
    body = "\n".join(f"[dim]{escape(x)}[/]" if x.startswith("#") else f"$ {escape(x)}" for x in lines)
    return f"[bold]Examples[/]\n{body}"
