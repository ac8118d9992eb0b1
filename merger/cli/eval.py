"""``merger eval``: the command function and its comparison table (registered in ``app.py``, with
:data:`EXAMPLES` as its epilog).

The command only declares options, calls :func:`merger.eval.harness.evaluate` and shows the report: one
rich table on stdout (models as rows, ``task/metric`` columns with ``± stderr`` and the delta
against the first model), or ``report.to_dict()`` as JSON with ``--json``. Errors are
:class:`merger.errors.MergerError` subclasses; :class:`merger.cli.handler.MergerGroup` turns them
into ``Error: ...``, exit 1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from merger.cli import ui
from merger.cli.options import EVALUATION, OUTPUT, RESOURCES, Debug, eval_device, examples
from merger.eval.tasks import DEFAULT_TASKS, cache_root
from merger.units import parse_limit

if TYPE_CHECKING:  # merger.eval (lm-eval glue) is imported when `merger eval` runs, not at every start
    from merger.eval.harness import EvalReport

ModelsArg = Annotated[list[str], typer.Argument(
    metavar="MODEL", show_default=False,
    help="Model folders, REPO_ID@REVISION (Hub, pinned to its commit) or nanoGPT .pt checkpoints (as "
         "GPT-2, with --tokenizer); the first one is the baseline of the deltas.")]
TasksOpt = Annotated[str | None, typer.Option(
    "--tasks", "-t", metavar="T1,T2", show_default=",".join(DEFAULT_TASKS),
    help="lm-eval task names or YAML files, comma-separated.", rich_help_panel=EVALUATION)]
LimitOpt = Annotated[float | None, typer.Option(
    "--limit", help="Documents per task (N), or a fraction of them (below 1).", rich_help_panel=EVALUATION)]
FewshotOpt = Annotated[int | None, typer.Option(
    "--num-fewshot", help="Few-shot examples (default: each task's own).", rich_help_panel=EVALUATION)]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="lm-eval batch size.", rich_help_panel=RESOURCES)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.", callback=eval_device,
                                        rich_help_panel=RESOURCES)]
DtypeOpt = Annotated[str | None, typer.Option(
    "--dtype", show_default="the checkpoint's on GPU, float32 on CPU",
    help="Evaluation dtype: float32, bfloat16 or float16.", rich_help_panel=RESOURCES)]
OutputOpt = Annotated[Path | None, typer.Option(
    "--output-dir", "-o", show_default="a new folder under ~/.cache/merger/eval",
    help="Where to write <model>.json (lm-eval's full results) and summary.json.", rich_help_panel=OUTPUT)]
IncludeOpt = Annotated[list[Path] | None, typer.Option(
    "--include-path", help="Folder or file of extra lm-eval task YAML; repeatable.", rich_help_panel=EVALUATION)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.", rich_help_panel=OUTPUT)]
TokenizerOpt = Annotated[str | None, typer.Option(
    "--tokenizer", metavar="NAME_OR_PATH", show_default="each model's own",
    help="Tokenizer folder or Hub name, for models without tokenizer files (nanoGPT .pt checkpoints, "
         "or their `merger average --to hf` folders).", rich_help_panel=EVALUATION)]

EXAMPLES = examples(
    "merger eval EleutherAI/pythia-70m@step143000 merged/ --limit 200",
    "merger eval merged/ --tasks merger_pydocs_ppl,lambada_openai --json > s.json",
    "# a nanoGPT run's checkpoint and its merge (ckpt.pt), as GPT-2",
    "merger eval out/ckpt_20000.pt merged/ --tokenizer gpt2",
)


def eval_command(models: ModelsArg, tasks: TasksOpt = None, limit: LimitOpt = None,
                 num_fewshot: FewshotOpt = None, batch_size: BatchOpt = 8,
                 device: DeviceOpt = "auto", dtype: DtypeOpt = None, output_dir: OutputOpt = None,
                 include_path: IncludeOpt = None, tokenizer: TokenizerOpt = None, json_out: JsonOpt = False,
                 debug: Debug = False) -> None:
    """Evaluate models with lm-eval-harness and compare them with the first one.

    The default tasks need no network: perplexity and a 4-way continuation test on held-out
    Python documentation. Any lm-eval task works when its dataset is reachable.
    """
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    n = parse_limit(limit)
    out = output_dir or cache_root() / "eval" / time.strftime("%Y%m%d-%H%M%S")
    from merger.eval.harness import evaluate

    report = evaluate(models, tasks=task_list, limit=n, num_fewshot=num_fewshot,
                      batch_size=batch_size, device=device, dtype=dtype, output_dir=out,
                      include_path=include_path, tokenizer=tokenizer, progress=ui.info)
    ui.info(f"full lm-eval results: {report.output_dir}")
    if json_out:
        ui.print_json(report.to_dict())
    else:
        ui.out.print(eval_table(report))


def eval_table(report: EvalReport) -> Table:
    """Models as rows, one ``task/metric`` column each; cells read ``value ± stderr`` and, below,
    the delta against the baseline (first row), green where it is an improvement."""
    n = report.n_samples
    hib = {(task, metric): report.higher_is_better.get(task, {}).get(metric.split(",")[0])
           for task, metric in report.columns}
    columns = [("model", "left")] + [(f"{task}{f' n={n[task]}' if task in n else ''}\n{metric}"
                                      f"{ui.arrow(hib[task, metric])}", "right") for task, metric in report.columns]
    rows = []
    for i, row in enumerate(report.rows):
        label = Text(row.model)
        if row.source.commit:
            label.append(f"\n{row.source.commit[:10]}", style="dim")
        if i == 0:
            label.append("\nbaseline", style="dim")
        cells: list[Text | str] = [label]
        for task, metric in report.columns:
            s = row.score(task, metric)
            if s is None:
                cells.append("-")
                continue
            cell = Text(ui.number(s.value) + (f" ± {s.stderr:.2g}" if s.stderr is not None else ""))
            d = report.delta(row, task, metric)
            if i > 0 and d is not None:
                cell.append("\n").append_text(ui.change(d, hib[task, metric]))
            cells.append(cell)
        rows.append(cells)
    limit = report.config.get("limit")
    return ui.table("lm-eval" + (f" (limit {limit})" if limit is not None else ""), columns, rows, lines=True)
