"""The ``merger`` command line: declares options and calls one library function per command.

    merger average --revisions step100000..step143000 --every 5000      # Pythia-70m from the Hub
    merger average runs/my-run --revisions ..step9000 --method ema --decay 0.9 -o merged/ema
    merger eval merged/pythia-70m-uniform-step100000-step143000 EleutherAI/pythia-70m@step143000

Errors print ``Error: ...`` and a hint on stderr and exit 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import functools
import inspect
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from merger import __version__, ui
from merger.errors import MergerError

app = typer.Typer(
    name="merger", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    help="Average the checkpoints of one LLM training run (LAWA, EMA, PMA) and evaluate them.")

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


def _version(value: bool) -> None:
    if value:
        print(f"merger {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """merger: checkpoint averaging for LLM pre-training runs."""


@app.command()
def average(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="A Hub repo id (default EleutherAI/pythia-70m), a folder of revision subfolders "
             "(step1000/ ...), or explicit checkpoint folders.", show_default=False)] = None,
    revisions: Annotated[Optional[str], typer.Option(
        "--revisions", "-r", help="A..B (either end optional) or r1,r2,r3.")] = None,
    every: Annotated[Optional[int], typer.Option(help="With A..B: A, A+N, ... and B itself.")] = None,
    method: Annotated[str, typer.Option("--method", "-m", help="uniform | ema | linear | weights.")] = "uniform",
    decay: Annotated[Optional[float], typer.Option(help="EMA decay b in (0, 1), with --method ema.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights, oldest first.")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Use --weights as given.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder.",
                      show_default="merged/<model>-<method>-<first>-<last>")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype of floating tensors.",
                                                 show_default="the inputs' dtype")] = None,
    accumulate: Annotated[str, typer.Option(
        help="auto (float32 for 16-bit tensors, float64 for 32-bit), float32 or float64.")] = "auto",
    max_memory: Annotated[Optional[str], typer.Option(
        help="Working-set budget, e.g. 4GB.", show_default="1/4 of RAM, at most 8GB")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard.")] = "5GB",
    device: Device = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    json_out: Json = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Identical revisions are an error.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Average NaN/Inf instead of failing.")] = False,
    hash_inputs: Annotated[bool, typer.Option("--hash", help="Record the sha256 of local input files in merger.json "
                                              "(Hub files carry theirs; ~0.5 s/GB of CPU, on the slower torch "
                                              "kernel).")] = False,
    no_keep: Annotated[bool, typer.Option("--no-keep", help="Delete each downloaded Hub revision once folded "
                                          "(disk: at most two revisions).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command: keep "
                                         "the output shards it finished (checked by CRC-32), merge the rest.")] = False,
    run_eval: Annotated[bool, typer.Option("--eval", help="Then evaluate the merged model against the latest "
                                           "input revision (lm-eval, offline task pack by default).")] = False,
    tasks: Annotated[Optional[str], typer.Option(help="With --eval: lm-eval tasks, comma-separated.")] = None,
    limit: Annotated[Optional[float], typer.Option(help="With --eval: documents per task.")] = None,
    debug: Debug = False,
) -> None:
    """Average checkpoints of one run into a Hugging Face model folder.

    [bold]Examples[/]

      merger average --revisions step100000..step143000 --every 5000

      merger average runs/tiny --revisions step1000..step9000 --method ema --decay 0.8 -o merged/ema

      merger average ckpt/a ckpt/b ckpt/c --method weights --weights 1,1,2 --dry-run
    """
    with errors_handled(debug):
        from merger.api import average as do_average, output_path, prepare
        from merger.methods import Method, parse_weights
        from merger.plan import Options
        from merger.units import parse_dtype, parse_size

        opts = Options(
            method=Method(name=method, decay=decay, weights=parse_weights(weights) if weights else None,
                          normalize=not no_normalize),
            dtype=parse_dtype(dtype) if dtype else None,
            accumulate=accumulate if accumulate == "auto" else parse_dtype(
                accumulate, option="--accumulate", allowed=("float32", "float64")),
            max_memory=parse_size(max_memory, option="--max-memory") if max_memory else None,
            max_shard_size=parse_size(max_shard_size, option="--max-shard-size"),
            device=device, allow_nonfinite=allow_nonfinite, strict=strict, hash_inputs=hash_inputs,
            keep=not no_keep, resume=resume)
        if weights and method != "weights":
            raise MergerError(f"--weights is only used with --method weights (not {method})",
                              hint="add --method weights")
        prep = prepare(models, revisions=revisions, every=every, options=opts)
        if dry_run:
            if json_out:
                ui.print_json(prep.to_dict())
            else:
                ui.out.print(ui.plan_view(prep))
            return
        output = output_path(prep, output, force=force)
        if not json_out:
            ui.err.print(ui.plan_view(prep))
        total = prep.plan.read_bytes if prep.plan else sum(sz for s in prep.sources for _, sz, _ in s.files)
        with ui.byte_progress("averaging", total) as advance:
            plan_, result = do_average(models, revisions=revisions, every=every, options=opts, output=output,
                                       force=force, progress=advance, command=sys.argv, prepared=prep)
        report = None
        if run_eval:
            from merger.eval import evaluate
            from merger.eval_cli import eval_table

            latest = plan_.sources[-1]
            baseline = f"{latest.repo_id}@{latest.revision}" if latest.repo_id else str(latest.path)
            report = evaluate([baseline, result.output], tasks=tasks.split(",") if tasks else None, limit=limit,
                              device=device, output_dir=Path(result.output) / "eval", progress=ui.info)
        if json_out:
            ui.print_json({"plan": plan_.to_dict(), "result": result.to_dict(),
                           **({"eval": report.to_dict()} if report else {})})
        else:
            ui.out.print(ui.result_view(plan_, result))
            if report is not None:
                ui.out.print(eval_table(report))


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


from merger.eval_cli import eval_command  # noqa: E402

app.command("eval")(guarded(eval_command))

from merger.sweep_cli import sweep_command  # noqa: E402

app.command("sweep")(guarded(sweep_command))

from merger.grow_cli import grow_command  # noqa: E402

app.command("grow")(guarded(grow_command))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
