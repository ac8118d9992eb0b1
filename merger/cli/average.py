"""``merger average``: declares the options and calls :func:`merger.api.average` (registered in
``app.py``, with :data:`EXAMPLES` as its epilog)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from merger.cli import ui
from merger.cli.eval import eval_table
from merger.cli.options import (EVALUATION, METHOD, OUTPUT, RESOURCES, SAFETY, SELECTION, AccumulateChoice, Debug,
                                Json, MethodChoice, OutputChoice, ShapeChoice, examples, merge_device, one_of, value)
from merger.errors import MergerError

EXAMPLES = examples(
    "merger average --revisions step100000..step143000 --every 5000",
    "merger average runs/tiny -r step1000..step9000 -m ema --decay 0.8 -o ema",
    "merger average ckpt/a ckpt/b ckpt/c -m weights --weights 1,1,2 --dry-run",
    "merger average runs/wsd -r step8000..step10000 --every 500 -m decay",
    "# a torchtitan run (DCP in, DCP out)",
    "merger average torchtitan/checkpoint -r step-1000..step-5000 -o dcp",
    "# every rank folds a share of the shards (docs/distributed.md)",
    "torchrun --nproc-per-node 8 -m merger average runs/big --max-shard-size 1GB",
)


def average_command(
    models: Annotated[Optional[list[str]], typer.Argument(
        metavar="MODEL", help="A Hub repo id (default EleutherAI/pythia-70m), a folder of revision subfolders "
             "(step1000/ ...) or of training files (ckpt_3000.pt ...), or explicit checkpoint folders "
             "or files.", show_default=False)] = None,
    revisions: Annotated[Optional[str], typer.Option(
        "--revisions", "-r", metavar="SPEC", help="A..B (either end optional) or r1,r2,r3.",
        rich_help_panel=SELECTION)] = None,
    every: Annotated[Optional[int], typer.Option(metavar="N", help="With A..B: A, A+N, ... and B itself.",
                                                 rich_help_panel=SELECTION)] = None,
    key: Annotated[Optional[str], typer.Option(
        "--key", metavar="KEY",
        help="Where the model lies in a training checkpoint: a dict key (model, or a.b), or in a DCP folder the "
             "prefix of its entries (Megatron: embedding,decoder,output_layer).",
        show_default="found by the format", rich_help_panel=SELECTION)] = None,
    method: Annotated[MethodChoice, typer.Option(
        "--method", "-m", case_sensitive=False, metavar="NAME", help=one_of(MethodChoice),
        rich_help_panel=METHOD)] = "uniform",
    decay: Annotated[Optional[float], typer.Option(metavar="B", help="EMA decay b in (0, 1), with --method ema.",
                                                   rich_help_panel=METHOD)] = None,
    shape: Annotated[Optional[ShapeChoice], typer.Option(
        case_sensitive=False, metavar="SHAPE", show_default="linear", rich_help_panel=METHOD,
        help=f"With --method decay, the LR decay to emulate: {one_of(ShapeChoice)}.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        metavar="W1,W2", help="With --method weights: comma-separated, oldest first.",
        rich_help_panel=METHOD)] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Use --weights as given.",
                                               rich_help_panel=METHOD)] = False,
    accumulate: Annotated[AccumulateChoice, typer.Option(
        case_sensitive=False, metavar="DTYPE", rich_help_panel=METHOD,
        help=f"The sum's dtype: {one_of(AccumulateChoice)} (auto: float32 for 16-bit tensors, float64 for 32-bit).",
    )] = "auto",
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Output folder (default: merged/<model>-<method>-<first>-<last>).",
        show_default=False, rich_help_panel=OUTPUT)] = None,
    to: Annotated[Optional[OutputChoice], typer.Option(
        "--to", case_sensitive=False, metavar="FORMAT", show_default="the input's own", rich_help_panel=OUTPUT,
        help=f"{one_of(OutputChoice)} (hf of a nanoGPT model: GPT2LMHeadModel).")] = None,
    dtype: Annotated[Optional[str], typer.Option(metavar="DTYPE", help="Output dtype of floating tensors.",
                                                 show_default="the inputs'", rich_help_panel=OUTPUT)] = None,
    max_shard_size: Annotated[str, typer.Option(metavar="SIZE", help="Largest output shard.",
                                                rich_help_panel=OUTPUT)] = "5GB",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an output folder that merger wrote (one with merger.json).",
        rich_help_panel=OUTPUT)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.",
                                          rich_help_panel=OUTPUT)] = False,
    json_out: Json = False,
    max_memory: Annotated[Optional[str], typer.Option(
        metavar="SIZE", help="Working-set budget, e.g. 4GB (per rank under torchrun/srun).",
        show_default="1/4 of RAM, at most 8GB", rich_help_panel=RESOURCES)] = None,
    device: Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto | cpu | cuda | cuda:N.",
                                        callback=merge_device,
                                        rich_help_panel=RESOURCES)] = "auto",
    no_keep: Annotated[bool, typer.Option("--no-keep", help="Delete what this run downloaded from the HF cache "
                                          "once each revision is folded (disk: two revisions).",
                                          rich_help_panel=RESOURCES)] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command: keep "
                                         "its finished shards (CRC-32 checked), merge the rest.",
                                         rich_help_panel=SAFETY)] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Identical revisions, and inputs whose order can't be "
                                         "established (no step), are errors.", rich_help_panel=SAFETY)] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Average NaN/Inf instead of failing.", rich_help_panel=SAFETY)] = False,
    hash_inputs: Annotated[bool, typer.Option("--hash", help="Record the sha256 of local input files in merger.json "
                                              "(~0.5 s/GB of CPU, on the slower torch kernel).",
                                              rich_help_panel=SAFETY)] = False,
    run_eval: Annotated[bool, typer.Option("--eval", help="Then evaluate the merged model against the latest "
                                           "input revision (offline task pack by default).",
                                           rich_help_panel=EVALUATION)] = False,
    tasks: Annotated[Optional[str], typer.Option(metavar="T1,T2", help="lm-eval tasks, comma-separated.",
                                                 rich_help_panel=EVALUATION)] = None,
    limit: Annotated[Optional[float], typer.Option(metavar="N", help="Documents per task.",
                                                   rich_help_panel=EVALUATION)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", metavar="NAME_OR_PATH", help="For models that carry none (nanoGPT .pt runs).",
        rich_help_panel=EVALUATION)] = None,
    debug: Debug = False,
) -> None:
    """Average checkpoints of one run into a merged checkpoint (HF folder, or the input's own format).

    Every method is a weight vector over the checkpoints, oldest first: uniform (LAWA, SWA), ema,
    linear (PMA's WMA), weights (given) and decay (the end of an LR decay, from constant-LR
    checkpoints). --dry-run prints the weights and the plan; merger.json in the output records
    them with every source.
    """
    from merger.api import average as do_average, output_path, prepare
    from merger.engine.ranks import connect, detect, rank_device
    from merger.plan import Method, Options, parse_weights
    from merger.units import parse_dtype, parse_limit, parse_size

    eval_limit = parse_limit(limit)  # a bad --limit fails before the merge, not after it

    opts = Options(
        method=Method(name=value(method), decay=decay, weights=parse_weights(weights) if weights else None,
                      normalize=not no_normalize, shape=value(shape)),
        dtype=parse_dtype(dtype) if dtype else None,
        accumulate=value(accumulate),
        max_memory=parse_size(max_memory, option="--max-memory") if max_memory else None,
        max_shard_size=parse_size(max_shard_size, option="--max-shard-size"),
        device=rank_device(device, world := detect()), allow_nonfinite=allow_nonfinite, strict=strict,
        hash_inputs=hash_inputs,
        keep=not no_keep, resume=resume, key=key, to=value(to))
    if weights and value(method) != "weights":
        raise MergerError(f"--weights is only used with --method weights (not {value(method)})",
                          hint="add --method weights")
    comm = connect(world) if world is not None and not dry_run else None  # torchrun/srun: engine/ranks.py
    try:
        prep = prepare(models, revisions=revisions, every=every, options=opts)
    except MergerError as e:
        if comm is not None:
            comm.fail(e)  # every rank stops with this one's message
        raise
    quiet = world is not None and world.rank > 0  # under torchrun/srun rank 0 speaks for all
    if dry_run:
        if world is not None:  # which rank folds which shards
            from merger.cli.ranks_view import print_partition

            print_partition(prep, world, json_out=json_out)
            return
        if json_out:
            ui.print_json(prep.to_dict())
        else:
            ui.out.print(ui.plan_view(prep))
        return
    output = output_path(prep, output, force=force)
    if run_eval:  # before the merge: an evaluation that can't run must not cost a merge first
        from merger.eval.precheck import check_eval_ready

        check_eval_ready(prep.sources, prep.plan.copy_files if prep.plan else None, plan=prep.plan,
                         tokenizer=tokenizer)
    if not json_out and not quiet:
        ui.err.print(ui.plan_view(prep))
    total = prep.plan.read_bytes if prep.plan else sum(sz for s in prep.sources for _, sz, _ in s.files)
    if world is not None and prep.plan is not None:
        from merger.engine.ranked import describe_partition

        total = describe_partition(prep.plan, world.size, per_node=world.local_size)[world.rank]["read_bytes"]
    with (nullcontext(lambda n: None) if quiet else ui.byte_progress("averaging", total)) as advance:
        plan_, result = do_average(models, revisions=revisions, every=every, options=opts, output=output,
                                   force=force, progress=advance, command=sys.argv, prepared=prep)
    report = None
    if run_eval and not quiet:  # rank 0 evaluates
        from merger.eval.harness import evaluate

        latest = plan_.sources[-1]
        baseline = f"{latest.repo_id}@{latest.revision}" if latest.repo_id else str(latest.path)
        report = evaluate([baseline, result.output], tasks=tasks.split(",") if tasks else None, limit=eval_limit,
                          device=device, output_dir=Path(result.output) / "eval", progress=ui.info,
                          tokenizer=tokenizer)
    if quiet:
        return
    if json_out:
        ui.print_json({"plan": plan_.to_dict(), "result": result.to_dict(),
                       **({"eval": report.to_dict()} if report else {})})
    else:
        ui.out.print(ui.result_view(plan_, result))
        if report is not None:
            ui.out.print(eval_table(report))
