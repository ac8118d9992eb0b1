"""Build a :class:`~merger.plan.plan.Plan` from every input's headers: check that the inputs agree,
fix weights, output dtypes, shards and blocks.
"""

from __future__ import annotations

import math

from merger.device import resolve_device
from merger.errors import CheckpointFormatError, PlanError, UsageError
from merger.formats import TensorInfo, of, read_checkpoints
from merger.formats.inputs import identity
from merger.output.convert import check_output, check_plan, in_place
from merger.plan.blocks import block_budget, make_blocks
from merger.plan.methods import weights_for
from merger.plan.options import FLOAT_DTYPES, Options, default_max_memory
from merger.plan.plan import Plan, ShardPlan, TensorPlan, slice_cost
from merger.sources import Source
from merger.units import SIZES, format_size, itemsize


def check_layouts(sources: list[Source], layouts: list[dict[str, TensorInfo]]) -> None:
    """Every tensor name, shape and dtype must agree across inputs; report every mismatch at once."""
    problems: list[str] = []
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
            elif t.dtype != r.dtype:
                problems.append(f"tensor {n!r}: dtype {t.dtype} in {src.name} but {r.dtype} in {sources[ref_i].name}")
    if problems:
        shown = problems[:50] + ([f"... and {len(problems) - 50} more"] if len(problems) > 50 else [])
        raise PlanError(f"the {len(sources)} checkpoints don't have the same tensors ({len(problems)} mismatches)",
                        problems=shown, hint="merge checkpoints of one training run (same architecture and dtype)")


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
        out_dtype = options.dtype if (averaged and options.dtype) else t.dtype
        nbytes = math.prod(t.shape) * itemsize(out_dtype)
        head, tail = framed.span(out_dtype, t.shape, nbytes, name=t.name) if framed else (0, 0)
        if shards[-1] and shard_bytes[-1] + shard_frame[-1] + head + nbytes + tail > options.max_shard_size:
            shards.append([])
            shard_bytes.append(0)
            shard_frame.append(0)
        tensors.append(TensorPlan(
            name=t.name, dtype=t.dtype, out_dtype=out_dtype, shape=t.shape, averaged=averaged,
            locs=tuple(lay[t.name].extents for lay in layouts),
            shard=len(shards) - 1, out_offset=shard_bytes[-1] + shard_frame[-1] + head, chunk=t.chunk))
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
    copy = fmt.side_files(sources[-1].path) if fmt else ()
    if fmt and output_format != fmt.OUTPUT:  # files only the format's own output has (Megatron's common.pt)
        copy = tuple(f for f in copy if f not in getattr(fmt, "OWN_FILES", ()))
    if sources[-1].path and "config.json" not in copy and output_format == "hf":
        warnings.append(f"{sources[-1].name} has no config.json: the output won't load in transformers")
    plan = Plan(sources=tuple(sources), weights=tuple(weights), options=options, device=device,
                max_memory=max_memory, tensors=tuple(tensors), shards=shard_plans, blocks=tuple(blocks),
                copy_files=copy, warnings=tuple(warnings), output_format=output_format,
                identities=ids)
    check_plan(plan)
    return plan


