"""Build a :class:`~merger.plan.plan.Plan` from every input's headers: check that the inputs agree,
fix weights, output dtypes, shards and blocks.
"""

from __future__ import annotations

import math
from pathlib import Path
from collections import Counter

from merger.device import resolve_device
from merger.errors import CheckpointFormatError, PlanError, UsageError
from merger.formats import TensorInfo, of, read_checkpoints
from merger.formats.inputs import identity
from merger.output.convert import check_output, check_plan, in_place
from merger.plan.blocks import block_budget, make_blocks
from merger.plan.methods import weights_for
from merger.plan.options import FLOAT_DTYPES, Options, acc_dtype, default_max_memory
from merger.plan.order import check_order
from merger.plan.plan import Plan, ShardPlan, TensorPlan, slice_cost
from merger.sources import Source
from merger.units import SIZES, format_size, itemsize


def check_layouts(sources: list[Source], layouts: list[dict[str, TensorInfo]], *, mixed: bool = True,
                  hint: str | None = None) -> None:
    """Every tensor name, shape and dtype must agree across inputs; report every mismatch at once.
    With ``mixed``, a floating tensor may be in another floating dtype in some inputs (averaged
    upcast: :func:`mixed_note`); non-floating dtypes must always agree. ``hint``: the fix, where
    the caller knows a better one for dtypes that differ (a schedule that can't take them)."""
    problems: list[str] = []
    dtypes_differ = False
    ref_i = len(sources) - 1
    ref = layouts[ref_i]
    for i, (src, lay) in enumerate(zip(sources, layouts)):
        if i == ref_i:
            continue
        missing = [n for n in ref if n not in lay]
        extra = [n for n in lay if n not in ref]
        for n in missing:
            problems.append(f"tensor {n!r} is missing from {src.name} (present in {sources[ref_i].name})")
        for n in extra:
            problems.append(f"tensor {n!r} is in {src.name} but not in {sources[ref_i].name}")
        for n, t in lay.items():
            r = ref.get(n)
            if r is None:
                continue
            if t.shape != r.shape:
                problems.append(f"tensor {n!r}: shape {list(t.shape)} in {src.name} but "
                                f"{list(r.shape)} in {sources[ref_i].name}")
            elif t.dtype != r.dtype and not (mixed and t.dtype in FLOAT_DTYPES and r.dtype in FLOAT_DTYPES):
                dtypes_differ = True
                problems.append(f"tensor {n!r}: dtype {t.dtype} in {src.name} but {r.dtype} in {sources[ref_i].name}")
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        hint = hint if hint and dtypes_differ else "merge checkpoints of one training run (same architecture)"
        raise PlanError(f"the {len(sources)} checkpoints don't have the same tensors ({len(problems)} mismatches)",
                        problems=shown, hint=hint)


def mixed_note(sources: list[Source], tensors: list[TensorPlan], options: Options) -> str:
    """The warning for floating tensors whose dtype differs between inputs (``TensorPlan.in_dtypes``):
    which revisions differ, the accumulation dtype, the output dtype and why."""
    mixed = [t for t in tensors if t.in_dtypes]
    per_rev = [Counter(t.in_dtypes[i] for t in mixed).most_common(1)[0][0] for i in range(len(sources))]
    groups: dict[str, list[str]] = {}
    for src, dt in zip(sources, per_rev):
        groups.setdefault(dt, []).append(src.name)
    # the most common dtype is "the others"; the groups named are the rest (latest first on a tie)
    common = max(groups, key=lambda d: (len(groups[d]), d != per_rev[-1]))
    named = "; ".join(f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} {dt}"
                      for dt, names in groups.items() if dt != common)
    accs = sorted({acc_dtype(options.accumulate, t.itemsize, t.out_itemsize) for t in mixed})
    outs = sorted({t.out_dtype for t in mixed})
    why = "--dtype" if options.dtype else "the latest's dtype; --dtype to choose"
    return (f"{named} (the others {common}): {len(mixed)} tensors averaged in {'/'.join(accs)}, each input "
            f"upcast from its own dtype, written as {'/'.join(outs)} ({why})")


def shared_chunks(sources: list[Source], options: Options, output_format: str) -> frozenset[str]:
    """The tensors merged chunk by chunk: for a DCP output of DCP inputs, those cut along an inner
    dim (tensor parallelism) into the same chunks in every input. Each chunk is then one extent per
    input and one record of the output, where the whole tensor would be a run per row of every
    chunk; the output keeps the inputs' chunks (``dcp.load`` reads them into any sharding)."""
    if output_format != "dcp" or not all(s.path and of(s.path).NAME == "dcp" for s in sources):
        return frozenset()
    from merger.formats.dcp import strided_grids

    grids = [strided_grids(s.path, options.key) for s in sources]
    return frozenset(f for f, g in grids[-1].items() if all(other.get(f) == g for other in grids[:-1]))


def build(sources: list[Source], options: Options, *, layouts: list[dict[str, TensorInfo]] | None = None) -> Plan:
    """Read every input's headers and fix the whole merge.

    Args:
        sources: checkpoints, oldest first, each with a local ``path``.
        options: method, dtypes, budget, shard size, device.
        layouts: already-read headers (one per source), to avoid reading them twice.

    Raises:
        PlanError: inputs disagree on tensor names, shapes or dtypes.
        OutputError: a tensor the output format can't hold (e.g. a dtype DCP records can't name).
        UsageError: bad weights for the method, a budget too small, an unusable device.
        CheckpointFormatError: an unreadable input file.
    """
    if not sources:
        raise UsageError("no checkpoints to merge")
    weights = weights_for(options.method, len(sources), steps=[s.step for s in sources])
    fmt = of(sources[-1].path) if sources[-1].path else None
    output_format = check_output(options.to or (fmt.OUTPUT if fmt else "hf"))
    if output_format == "hf" and getattr(fmt, "HF_OUTPUT", None):  # e.g. nanoGPT -> GPT2LMHeadModel
        output_format = fmt.HF_OUTPUT
    if layouts is None:
        split = shared_chunks(sources, options, output_format)
        layouts = read_checkpoints([s.path for s in sources], key=options.key, split=split)
    ids = tuple((p, identity(p)) for p in sorted({p for lay in layouts for t in lay.values() for p in t.files}))
    check_layouts(sources, layouts)
    if not layouts[-1]:
        where = sources[-1].path or sources[-1].name
        raise CheckpointFormatError(f"{where}: the checkpoint holds no tensors (and so do the other inputs)",
                                    path=str(where), hint="point at the model's checkpoint folders; an empty "
                                                          "weights file is a failed save: save it again")
    floating = [t for t in layouts[-1].values() if t.dtype in FLOAT_DTYPES]
    if floating and not any(t.numel for t in floating):  # a model of 0 parameters: never a merge that "works"
        base = Path(sources[-1].path)  # name the weights file, where it is one
        files = [base / f if base.is_dir() else base.with_name(f) for f in of(base).weight_files(base)]
        weights = [f for f in files if not f.name.endswith(".json")]
        where = weights[0] if len(weights) == 1 else base
        e = floating[0]
        raise CheckpointFormatError(
            f"{where}: every floating tensor of the checkpoint is empty ({len(floating)} tensors, e.g. {e.name!r} "
            f"of shape {list(e.shape)}): the merge would be a model with 0 parameters", path=str(where),
            hint="a sharded save (DeepSpeed ZeRO-3, FSDP) leaves placeholders in its model file: consolidate "
                 "it first (DeepSpeed: python zero_to_fp32.py CHECKPOINT_DIR OUTPUT) and merge the outputs")
    device = resolve_device(options.device)
    if options.accumulate not in ("auto", "float32", "float64"):
        raise UsageError(f"--accumulate {options.accumulate}: use auto, float32 or float64")
    n = len(sources)
    framed = in_place(output_format)  # a format whose files the engine writes itself (DCP records)
    latest = layouts[-1]
    order = sorted(latest.values(), key=lambda t: (t.path, t.offset))
    tensors: list[TensorPlan] = []
    shards: list[list[int]] = [[]]
    shard_bytes = [0]
    shard_frame = [0]
    for t in order:
        averaged = t.dtype in FLOAT_DTYPES
        out_dtype = options.dtype if (averaged and options.dtype) else t.dtype  # default: the latest's
        in_dtypes = tuple(lay[t.name].dtype for lay in layouts)
        nbytes = math.prod(t.shape) * itemsize(out_dtype)
        head, tail = framed.span(out_dtype, t.shape, nbytes, name=t.name) if framed else (0, 0)
        if shards[-1] and shard_bytes[-1] + shard_frame[-1] + head + nbytes + tail > options.max_shard_size:
            shards.append([])
            shard_bytes.append(0)
            shard_frame.append(0)
        tensors.append(TensorPlan(
            name=t.name, dtype=t.dtype, out_dtype=out_dtype, shape=t.shape, averaged=averaged,
            locs=tuple(lay[t.name].extents for lay in layouts),
            shard=len(shards) - 1, out_offset=shard_bytes[-1] + shard_frame[-1] + head, chunk=t.chunk,
            in_dtypes=in_dtypes if len(set(in_dtypes)) > 1 else ()))
        shards[-1].append(len(tensors) - 1)
        shard_bytes[-1] += nbytes
        shard_frame[-1] += head + tail
    k = len(shards)
    shard_plans = tuple(
        ShardPlan(framed.filename(i, k) if framed else "model.safetensors" if k == 1
                  else f"model-{i + 1:05d}-of-{k:05d}.safetensors", tuple(idx), b, f)
        for i, (idx, b, f) in enumerate(zip(shards, shard_bytes, shard_frame)))

    max_memory = options.max_memory or default_max_memory()
    biggest_unit = max((slice_cost(t, n, min(t.numel, SIZES.chunk)) for t in tensors), default=0)
    if max_memory < biggest_unit:
        raise UsageError(f"--max-memory {format_size(max_memory)} is too small for {n} inputs",
                         hint=f"give at least {format_size(biggest_unit)}")
    max_block = block_budget(tensors, n, max_memory, cuda=device.startswith("cuda"))
    blocks = make_blocks(tensors, n, max_block)

    warnings = []
    if n == 1:
        warnings.append("only one checkpoint selected: the output is a copy of it")
    if any(t.in_dtypes for t in tensors):
        warnings.append(mixed_note(sources, tensors, options))
    copy = fmt.side_files(sources[-1].path) if fmt else ()
    if fmt and output_format != fmt.OUTPUT:  # files only the format's own output has (Megatron's common.pt)
        copy = tuple(f for f in copy if f not in getattr(fmt, "OWN_FILES", ()))
    if sources[-1].path and "config.json" not in copy and output_format == "hf":
        warnings.append(f"{sources[-1].name} has no config.json: the output won't load in transformers")
    # a training format's own output carries the latest's other state (nanoGPT's iter_num, DCP's objects)
    carries = bool(fmt) and output_format == fmt.OUTPUT and output_format not in ("hf", "safetensors")
    warnings += check_order(sources, options.method.name, strict=options.strict, copied=copy, carries_state=carries)
    plan = Plan(sources=tuple(sources), weights=tuple(weights), options=options, device=device,
                max_memory=max_memory, tensors=tuple(tensors), shards=shard_plans, blocks=tuple(blocks),
                copy_files=copy, warnings=tuple(warnings), output_format=output_format,
                identities=ids)
    check_plan(plan)
    return plan


