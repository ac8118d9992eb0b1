"""The plan: everything about a merge that file headers can tell, fixed before a tensor is read.

A :class:`Plan` is a frozen, JSON-serialisable value: the ordered inputs, their weights, every
tensor (where its bytes lie in each input, its output dtype and place in an output shard), the
schedule, and estimates of memory, reads and disk. ``--dry-run`` prints it.

Blocks (the *blocks* schedule): tensors are grouped, in the latest input's file order, into
blocks whose working set (every input's bytes of the block, double-buffered, plus the output
bytes, double-buffered) fits ``--max-memory``. A tensor larger than a block is cut into element
ranges at multiples of ``CHUNK`` elements, so ranges never depend on the budget's rounding.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from merger import __version__
from merger.errors import PlanError, UsageError
from merger.formats import TensorInfo, read_folder
from merger.methods import Method, weights_for
from merger.sources import Source
from merger.units import dtype_name, format_size, itemsize

CHUNK = 1 << 18  # elements: the kernel's cache chunk, and the unit of "identical in every input"
MAX_BLOCK_CPU = 512 << 20  # bytes of working set per block (see build())
MAX_BLOCK_CUDA = 2 << 30
MIN_BLOCK = 64 << 20  # bytes of working set; below that the per-block overhead dominates
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its inputs' byte locations and its place in the output."""

    name: str
    dtype: str  # input dtype (the same in every input)
    out_dtype: str
    shape: tuple[int, ...]
    averaged: bool  # floating: averaged; otherwise must be identical in every input
    locs: tuple[tuple[str, int], ...]  # per input: (file path, byte offset)
    shard: int
    out_offset: int  # byte offset in the shard's data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype)

    @property
    def out_itemsize(self) -> int:
        return itemsize(self.out_dtype)


@dataclass(frozen=True)
class Slice:
    """Elements ``start:stop`` of tensor ``tensor`` (an index into ``Plan.tensors``)."""

    tensor: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[int, ...]  # indices into Plan.tensors, in data order
    data_bytes: int


@dataclass(frozen=True)
class Options:
    """How to merge; one object instead of a long signature (CLI flags map 1:1)."""

    method: Method = Method()
    dtype: str | None = None  # output dtype of floating tensors; None: the inputs'
    accumulate: str = "auto"  # float32 for 16-bit tensors, float64 for 32-bit ones
    max_memory: int | None = None  # bytes; None: derived from the machine
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    allow_nonfinite: bool = False
    strict: bool = False
    hash_inputs: bool = False  # sha256 of local inputs (Hub files carry theirs for free)
    keep: bool = True  # keep downloaded revisions in the HF cache (False: --no-keep)
    resume: bool = False  # continue an interrupted run's verified shards (--resume); see execute.py


@dataclass(frozen=True)
class Plan:
    sources: tuple[Source, ...]
    weights: tuple[float, ...]
    options: Options
    device: str
    max_memory: int
    tensors: tuple[TensorPlan, ...]
    shards: tuple[ShardPlan, ...]
    blocks: tuple[tuple[Slice, ...], ...]
    copy_files: tuple[str, ...]
    schedule: str = "blocks"
    warnings: tuple[str, ...] = field(default=())

    @property
    def read_bytes(self) -> int:
        return sum(t.numel * t.itemsize for t in self.tensors) * len(self.sources)

    @property
    def out_bytes(self) -> int:
        return sum(s.data_bytes for s in self.shards)

    @property
    def block_bytes(self) -> int:
        return max((block_cost(self, b) for b in self.blocks), default=0)

    def to_dict(self) -> dict:
        """JSON-serialisable summary (what ``--dry-run --json`` prints)."""
        o = self.options
        return {
            "merger_version": __version__,
            "method": o.method.describe(),
            "weights": list(self.weights),
            "inputs": [dict(s.to_dict(), weight=w) for s, w in zip(self.sources, self.weights)],
            "schedule": self.schedule,
            "device": self.device,
            "accumulate": o.accumulate,
            "dtype": o.dtype or sorted({t.out_dtype for t in self.tensors if t.averaged}),
            "tensors": len(self.tensors),
            "parameters": sum(t.numel for t in self.tensors),
            "averaged_tensors": sum(t.averaged for t in self.tensors),
            "blocks": len(self.blocks),
            "max_memory": self.max_memory,
            "estimated_memory": self.block_bytes,
            "read_bytes": self.read_bytes,
            "output_bytes": self.out_bytes,
            "shards": [{"file": s.filename, "bytes": s.data_bytes, "tensors": len(s.tensors)} for s in self.shards],
            "copy_files": list(self.copy_files),
            "warnings": list(self.warnings),
            "options": asdict(o),
        }


def slice_cost(t: TensorPlan, n_inputs: int, elems: int) -> int:
    """Working-set bytes of ``elems`` elements: inputs and output, each double-buffered."""
    return elems * (2 * n_inputs * t.itemsize + 2 * t.out_itemsize)


def block_cost(plan: Plan, block: tuple[Slice, ...]) -> int:
    n = len(plan.sources)
    return sum(slice_cost(plan.tensors[s.tensor], n, s.stop - s.start) for s in block)


def default_max_memory() -> int:
    """A quarter of physical memory, at most 8 GB: the budget when ``--max-memory`` isn't given."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 10**9
    return max(MIN_BLOCK * 4, min(total // 4, 8 * 10**9))


# a GPU driver leaves one of these behind (NVIDIA; ROCm's kfd); without any, torch can't see a GPU either
GPU_DEVICE_PATHS = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/proc/driver/nvidia")


def gpu_possible() -> bool:
    """Whether a CUDA (or ROCm) device could be visible: a driver's device file exists."""
    return any(os.path.exists(p) for p in GPU_DEVICE_PATHS)


def resolve_device(device: str, *, allow_mps: bool = False) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; checks ``cuda:i`` exists.

    torch (1 s to import) is imported only to answer a question about a GPU: ``cpu`` never
    imports it, nor does ``auto`` on a machine with no GPU driver (none of ``GPU_DEVICE_PATHS``
    exists); ``auto`` with a driver, ``cuda[:i]`` and ``mps`` ask torch.

    ``allow_mps``: also accept Apple's ``mps`` where it is there (evaluation runs on it; the merge
    kernel is only tested on CPU and CUDA).
    """
    if device == "cpu" or (device == "auto" and not gpu_possible()):
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if re.fullmatch(r"cuda(:\d+)?", device):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is visible", hint="use --device cpu")
        idx = device.partition(":")[2]
        if idx and int(idx) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
        return device
    if allow_mps and device in ("mps", "mps:0") and torch.backends.mps.is_available():
        return device
    raise UsageError(f"--device {device!r}: unknown device", hint="use auto, cpu, cuda or cuda:N")


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


def make_blocks(tensors: list[TensorPlan], n_inputs: int, max_block: int) -> list[tuple[Slice, ...]]:
    """Group tensors, in order, into blocks of working set <= ``max_block`` bytes."""
    blocks: list[tuple[Slice, ...]] = []
    cur: list[Slice] = []
    used = 0
    for ti, t in enumerate(tensors):
        cost = slice_cost(t, n_inputs, t.numel)
        if used + cost <= max_block:
            cur.append(Slice(ti, 0, t.numel))
            used += cost
            continue
        if cur:
            blocks.append(tuple(cur))
            cur, used = [], 0
        if cost <= max_block:
            cur, used = [Slice(ti, 0, t.numel)], cost
            continue
        per = max(CHUNK, (max_block // slice_cost(t, n_inputs, 1)) // CHUNK * CHUNK)
        for start in range(0, t.numel, per):
            blocks.append((Slice(ti, start, min(t.numel, start + per)),))
    if cur:
        blocks.append(tuple(cur))
    return blocks


def build(sources: list[Source], options: Options, *, layouts: list[dict[str, TensorInfo]] | None = None) -> Plan:
    """Read every input's headers and fix the whole merge.

    Args:
        sources: checkpoints, oldest first, each with a local ``path``.
        options: method, dtypes, budget, shard size, device.
        layouts: already-read headers (one per source), to avoid reading them twice.

    Raises:
        PlanError: inputs disagree on tensor names, shapes or dtypes.
        UsageError: bad weights for the method, a budget too small, an unusable device.
        CheckpointFormatError: an unreadable input file.
    """
    if not sources:
        raise UsageError("no checkpoints to merge")
    weights = weights_for(options.method, len(sources), steps=[s.step for s in sources])
    layouts = layouts or [read_folder(s.path) for s in sources]
    check_layouts(sources, layouts)
    device = resolve_device(options.device)
    if options.accumulate not in ("auto", "float32", "float64"):
        raise UsageError(f"--accumulate {options.accumulate}: use auto, float32 or float64")
    n = len(sources)
    latest = layouts[-1]
    order = sorted(latest.values(), key=lambda t: (t.path, t.offset))
    tensors: list[TensorPlan] = []
    shards: list[list[int]] = [[]]
    shard_bytes = [0]
    for t in order:
        averaged = t.dtype in FLOAT_DTYPES
        out_dtype = options.dtype if (averaged and options.dtype) else t.dtype
        nbytes = math.prod(t.shape) * itemsize(out_dtype)
        if shards[-1] and shard_bytes[-1] + nbytes > options.max_shard_size:
            shards.append([])
            shard_bytes.append(0)
        tensors.append(TensorPlan(
            name=t.name, dtype=t.dtype, out_dtype=out_dtype, shape=t.shape, averaged=averaged,
            locs=tuple((lay[t.name].path, lay[t.name].offset) for lay in layouts),
            shard=len(shards) - 1, out_offset=shard_bytes[-1]))
        shards[-1].append(len(tensors) - 1)
        shard_bytes[-1] += nbytes
    k = len(shards)
    shard_plans = tuple(
        ShardPlan("model.safetensors" if k == 1 else f"model-{i + 1:05d}-of-{k:05d}.safetensors", tuple(idx), b)
        for i, (idx, b) in enumerate(zip(shards, shard_bytes)))

    max_memory = options.max_memory or default_max_memory()
    biggest_unit = max((slice_cost(t, n, min(t.numel, CHUNK)) for t in tensors), default=0)
    if max_memory < biggest_unit:
        raise UsageError(f"--max-memory {format_size(max_memory)} is too small for {n} inputs",
                         hint=f"give at least {format_size(biggest_unit)}")
    total = sum(slice_cost(t, n, t.numel) for t in tensors)
    # several blocks even when everything fits, so that reading, folding and writing overlap; on
    # CPU at most 512 MB: first touches of bigger fresh buffers cost more in page faults than
    # they save (410m x 9: 3.0 s of system time at 2 GB blocks, 1.1 s at 512 MB)
    cap = MAX_BLOCK_CUDA if device.startswith("cuda") else MAX_BLOCK_CPU
    max_block = min(max_memory, max(MIN_BLOCK, total // 8), cap)
    max_block = max(max_block, biggest_unit)
    blocks = make_blocks(tensors, n, max_block)

    warnings = []
    if n == 1:
        warnings.append("only one checkpoint selected: the output is a copy of it")
    copy = tuple(f for f in COPY_FILES if (Path(sources[-1].path) / f).is_file()) if sources[-1].path else ()
    if sources[-1].path and "config.json" not in copy:
        warnings.append(f"{sources[-1].name} has no config.json: the output won't load in transformers")
    return Plan(sources=tuple(sources), weights=tuple(weights), options=options, device=device,
                max_memory=max_memory, tensors=tuple(tensors), shards=shard_plans, blocks=tuple(blocks),
                copy_files=copy, warnings=tuple(warnings))


def output_dtypes(plan: Plan) -> dict[str, str]:
    """Input dtype -> output dtype of the averaged tensors (for the manifest)."""
    return {t.dtype: t.out_dtype for t in plan.tensors if t.averaged}


__all__ = ["CHUNK", "Options", "Plan", "Slice", "TensorPlan", "ShardPlan", "build", "dtype_name"]
