"""``merger sweep``: the command function and its table (registered in ``app.py``, with
:data:`EXAMPLES` as its epilog).

The command only declares options, calls :func:`merger.eval.sweep.sweep` and shows the result: one rich
table on stdout (a row per step: raw, LAWA average and EMA, with the change against raw), or
``result.to_dict()`` as JSON with ``--json``. Errors are :class:`merger.errors.MergerError`
subclasses; :class:`merger.cli.handler.MergerGroup` turns them into ``Error: ...`` and exit 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from merger.cli import ui
from merger.cli.options import (EVALUATION, METHOD, OUTPUT, RESOURCES, SELECTION, Debug, Json, ShapeChoice, eval_device,
                                examples, one_of, sweep_methods, value)
from merger.units import parse_limit

if TYPE_CHECKING:
    from merger.eval.sweep import SweepResult

ModelArg = Annotated[str | None, typer.Argument(
    metavar="MODEL", show_default="EleutherAI/pythia-70m",
    help="A Hub repo id (revisions are its branches) or a folder of revision subfolders "
         "(step1000/ ...).")]
RevisionsOpt = Annotated[str | None, typer.Option(
    "--revisions", "-r", help="A..B (either end optional) or r1,r2,r3: the steps to sweep.",
    rich_help_panel=SELECTION)]
WindowOpt = Annotated[int, typer.Option(
    "--window", "-k", help="K: average the K selected checkpoints ending at each step (LAWA's k).",
    show_default=False, rich_help_panel=SELECTION)]
EveryOpt = Annotated[int | None, typer.Option(
    "--every", help="With A..B: A, A+N, ... and B itself (the spacing of averaged checkpoints).",
    rich_help_panel=SELECTION)]
MethodsOpt = Annotated[str, typer.Option(
    "--methods", "-m", metavar="uniform,ema,decay",
    help="Averages to compare with the raw checkpoints: uniform (LAWA), ema, decay (the window with "
         "decay-by-merging weights).", callback=sweep_methods, rich_help_panel=METHOD)]
DecayOpt = Annotated[float | None, typer.Option(
    "--decay", help="EMA decay b in (0, 1), with ema in --methods.", rich_help_panel=METHOD)]
ShapeOpt = Annotated[ShapeChoice | None, typer.Option(
    "--shape", show_default="linear", case_sensitive=False, metavar="SHAPE",
    help=f"With decay in --methods: the LR decay to emulate over the window: {one_of(ShapeChoice)}.",
    rich_help_panel=METHOD)]
TasksOpt = Annotated[str | None, typer.Option(
    "--tasks", "-t", metavar="T1,T2", show_default="in-process held-out bits per byte",
    help="lm-eval tasks instead of the in-process held-out metric (slower: a model folder per "
         "point).", rich_help_panel=EVALUATION)]
MetricOpt = Annotated[str | None, typer.Option(
    "--metric", show_default="bits_per_byte if measured, else the first",
    help="The metric to tabulate and plot: a name, or task/name with --tasks.", rich_help_panel=EVALUATION)]
LimitOpt = Annotated[float | None, typer.Option(
    "--limit", help="Held-out passages (or documents per task): N, or a fraction below 1.",
    rich_help_panel=EVALUATION)]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output-dir", "-o", show_default="sweeps/<model>-k<K>",
    help="Where sweep.csv, sweep.json and sweep.png are written (replacing earlier ones).", rich_help_panel=OUTPUT)]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="Where models are evaluated: auto, cpu, cuda, cuda:N or mps.", callback=eval_device,
    rich_help_panel=RESOURCES)]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", metavar="NAME_OR_PATH", show_default="the latest revision's own",
    help="Tokenizer folder or Hub name: needed for nanoGPT .pt runs (training checkpoints carry none), "
         "or to replace a run's own.", rich_help_panel=EVALUATION)]

EXAMPLES = examples(
    "merger sweep -r step100000..step143000 --every 5000 -k 5   # Pythia-70m",
    "merger sweep runs/tiny -r ..step9000 -k 3 -m uniform,ema --decay 0.8",
    "merger sweep runs/tiny -r ..step9000 -k 4 --tasks merger_pydocs_mc --json",
    "merger sweep runs/wsd -r step4000..step6000 -k 6 -m decay --shape cosine",
    "# a nanoGPT run's ckpt_<step>.pt files",
    "merger sweep out/ -r 1000..20000 --every 1000 -k 5 --tokenizer gpt2",
)


def sweep_command(model: ModelArg = None, revisions: RevisionsOpt = None,
                  window: WindowOpt = ..., every: EveryOpt = None, methods: MethodsOpt = "uniform",
                  decay: DecayOpt = None, shape: ShapeOpt = None, tasks: TasksOpt = None, metric: MetricOpt = None,
                  limit: LimitOpt = None, output_dir: OutputOpt = None, device: DeviceOpt = "auto",
                  tokenizer: TokenizerOpt = None, json_out: Json = False, debug: Debug = False) -> None:
    """Compare each checkpoint with the average of the K checkpoints ending at it (the LAWA figure).

    Each checkpoint is read at most twice: a float64 sliding sum adds the newest checkpoint and
    subtracts the one leaving the window. Steps with fewer than K checkpoints before them have
    no averaged point.
    """
    from merger.eval.sweep import SweepOptions, sweep  # imports torch: not at `merger --help`

    def items(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    n = parse_limit(limit)
    opts = SweepOptions(window=window, methods=items(methods), decay=decay, shape=value(shape), metric=metric,
                        tasks=items(tasks) if tasks else None, limit=n, device=device, tokenizer=tokenizer)
    name = (model or "EleutherAI/pythia-70m").rstrip("/").split("/")[-1] or "model"
    out = output_dir or Path("sweeps") / f"{name}-k{window}"
    result = sweep(model, revisions=revisions, every=every, options=opts, output_dir=out,
                   progress=ui.info)
    ui.info(f"wrote {', '.join(result.files.values())}")
    if json_out:
        ui.print_json(result.to_dict())
    else:
        ui.out.print(sweep_table(result))


def sweep_table(result: SweepResult) -> Table:
    """A row per step: the metric of the raw checkpoint and of each average, each average
    followed by its change against raw (green where it is an improvement)."""
    every = f", every {result.every}" if result.every else ""
    k = result.options.window
    heads = {"raw": "raw", "uniform": f"LAWA K={k}", "ema": f"EMA b={result.options.decay}",
             "decay": f"decay K={k} {result.options.shape or 'linear'}"}
    columns = [("step", "right"), ("revision", "left")]
    for s in result.series:
        columns.append((heads.get(s, s), "right"))
        if s != "raw":
            columns.append(("Δ", "right"))
    rows = []
    for p in result.points:
        raw = result.value(p, "raw")
        cells: list[str | Text] = [str(p.step), p.revision]
        for s in result.series:
            v = result.value(p, s)
            cells.append(ui.number(v))
            if s != "raw":
                cells.append("" if v is None or raw is None else ui.change(v - raw, result.higher_is_better))
        rows.append(cells)
    title = f"{result.model}: {result.metric}{ui.arrow(result.higher_is_better)}, K={k}{every}"
    return ui.table(title, columns, rows)
