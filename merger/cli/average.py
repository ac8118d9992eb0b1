"""``merger average``: declares the options and calls :func:`merger.api.average` (registered in
``app.py``)."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Optional

import typer

from merger.cli import ui
from merger.cli.eval import eval_table
from merger.cli.handler import Debug, Device, Json, errors_handled
from merger.errors import MergerError


def average_command(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="A Hub repo id (default EleutherAI/pythia-70m), a folder of revision subfolders "
             "(step1000/ ...) or of training files (ckpt_3000.pt ...), or explicit checkpoint folders "
             "or files.", show_default=False)] = None,
    revisions: Annotated[Optional[str], typer.Option(
        "--revisions", "-r", help="A..B (either end optional) or r1,r2,r3.")] = None,
    every: Annotated[Optional[int], typer.Option(help="With A..B: A, A+N, ... and B itself.")] = None,
    method: Annotated[str, typer.Option("--method", "-m",
                                        help="uniform | ema | linear | weights | decay.")] = "uniform",
    decay: Annotated[Optional[float], typer.Option(help="EMA decay b in (0, 1), with --method ema.")] = None,
    shape: Annotated[Optional[str], typer.Option(
        help="With --method decay: the LR decay to emulate over the window: linear, cosine or 1-sqrt.",
        show_default="linear")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Comma-separated weights, oldest first.")] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Use --weights as given.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Output folder.",
                      show_default="merged/<model>-<method>-<first>-<last>")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype of floating tensors.",
                                                 show_default="the inputs' dtype")] = None,
    accumulate: Annotated[str, typer.Option(
        help="auto (float32 for 16-bit tensors, float64 for 32-bit), float32 or float64.")] = "auto",
    max_memory: Annotated[Optional[str], typer.Option(
        help="Working-set budget, e.g. 4GB (per rank under torchrun/srun).",
        show_default="1/4 of RAM, at most 8GB")] = None,
    max_shard_size: Annotated[str, typer.Option(help="Largest output shard.")] = "5GB",
    device: Device = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    json_out: Json = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Replace an existing output folder that merger wrote (it holds merger.json).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Identical revisions, and inputs whose order can't be "
                                         "established (no step), are errors.")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Average NaN/Inf instead of failing.")] = False,
    hash_inputs: Annotated[bool, typer.Option("--hash", help="Record the sha256 of local input files in merger.json "
                                              "(Hub files carry theirs; ~0.5 s/GB of CPU, on the slower torch "
                                              "kernel).")] = False,
    no_keep: Annotated[bool, typer.Option("--no-keep", help="Delete the files this run downloaded from the "
                                          "HF cache once each revision is folded (disk: at most two revisions; "
                                          "what was cached before stays).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run of the same command: keep "
                                         "the output shards it finished (checked by CRC-32), merge the rest; "
                                         "Hub downloads (stream): go on after the last folded revision.")] = False,
    key: Annotated[Optional[str], typer.Option(
        "--key", help="Where the model lies in a training checkpoint (a dict key such as model, or a.b; "
                      "in a DCP folder, the prefix of the model's entries, or several: "
                      "embedding,decoder,output_layer for Megatron).",
        show_default="found by the format")] = None,
    to: Annotated[Optional[str], typer.Option(
        "--to", help="Output format: hf, safetensors, nanogpt (a torch.save ckpt.pt, the default for .pt "
                    "inputs) or dcp (the default for DCP inputs); hf from a nanoGPT model is a GPT2LMHeadModel folder.",
        show_default="the input's own format")] = None,
    run_eval: Annotated[bool, typer.Option("--eval", help="Then evaluate the merged model against the latest "
                                           "input revision (lm-eval, offline task pack by default).")] = False,
    tasks: Annotated[Optional[str], typer.Option(help="With --eval: lm-eval tasks, comma-separated.")] = None,
    limit: Annotated[Optional[float], typer.Option(help="With --eval: documents per task.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", metavar="NAME_OR_PATH", help="With --eval: the tokenizer, for models that carry none "
                                                     "(nanoGPT .pt runs).")] = None,
    debug: Debug = False,
) -> None:
    """Average checkpoints of one run into a merged checkpoint (HF folder, or the input's own format).

    [bold]Examples[/]

      merger average --revisions step100000..step143000 --every 5000

      merger average runs/tiny --revisions step1000..step9000 --method ema --decay 0.8 -o merged/ema

      merger average ckpt/a ckpt/b ckpt/c --method weights --weights 1,1,2 --dry-run

      merger average runs/wsd --revisions step8000..step10000 --every 500 --method decay --shape cosine

      merger average torchtitan/checkpoint --revisions step-1000..step-5000 -o merged/dcp   # DCP in, DCP out

      torchrun --nproc-per-node 8 -m merger average runs/big -r step90000..step100000 --max-shard-size 1GB
      (or srun: each rank folds a share of the output shards; see README, "Bigger than one machine")
    """
    with errors_handled(debug):
        from merger.api import average as do_average, output_path, prepare
        from merger.engine.ranks import connect, detect, rank_device
        from merger.plan import Method, Options, parse_weights
        from merger.units import parse_dtype, parse_limit, parse_size

        eval_limit = parse_limit(limit)  # a bad --limit fails before the merge, not after it

        opts = Options(
            method=Method(name=method, decay=decay, weights=parse_weights(weights) if weights else None,
                          normalize=not no_normalize, shape=shape),
            dtype=parse_dtype(dtype) if dtype else None,
            accumulate=accumulate if accumulate == "auto" else parse_dtype(
                accumulate, option="--accumulate", allowed=("float32", "float64")),
            max_memory=parse_size(max_memory, option="--max-memory") if max_memory else None,
            max_shard_size=parse_size(max_shard_size, option="--max-shard-size"),
            device=rank_device(device, world := detect()), allow_nonfinite=allow_nonfinite, strict=strict,
            hash_inputs=hash_inputs,
            keep=not no_keep, resume=resume, key=key, to=to)
        if weights and method != "weights":
            raise MergerError(f"--weights is only used with --method weights (not {method})",
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
