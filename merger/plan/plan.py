"""The plan: everything about a merge that file headers can tell, fixed before a tensor is read.

A :class:`Plan` is a frozen, JSON-serialisable value: the ordered inputs, their weights, every
tensor (the byte extents that hold it in each input, its output dtype and place in an output
shard), the schedule, and estimates of memory, reads and disk. ``--dry-run`` prints it. It is
built by :func:`merger.plan.build.build`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

from merger import __version__
from merger.formats import PIECE_BYTES, Extent, row_bytes
from merger.plan.options import Options
from merger.sources import Source
from merger.units import itemsize


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: its inputs' byte locations and its place in the output."""

    name: str
    dtype: str  # input dtype: the latest input's (every input's, unless in_dtypes says otherwise)
    out_dtype: str
    shape: tuple[int, ...]
    averaged: bool  # floating: averaged; otherwise must be identical in every input
    locs: tuple[tuple[Extent, ...], ...]  # per input: the byte extents that hold the tensor
    shard: int
    out_offset: int  # byte offset in the shard's data section (after the header; past the framing
    # of the tensors before it and its own, for a format that frames each tensor: output/convert.py)
    chunk: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None  # TensorInfo.chunk: a DCP chunk
    # per input, where a floating tensor's dtype differs between inputs (a run that saved its last step in
    # bf16): each input is read in its own dtype and upcast into the accumulator; () where all are ``dtype``
    in_dtypes: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per input element; the widest input's where they differ (buffers are sized by it)."""
        return max(map(itemsize, self.in_dtypes)) if self.in_dtypes else itemsize(self.dtype)

    def input_dtype(self, i: int) -> str:
        """Input ``i``'s dtype."""
        return self.in_dtypes[i] if self.in_dtypes else self.dtype

    def input_itemsize(self, i: int) -> int:
        return itemsize(self.input_dtype(i))

    def read_nbytes(self, n_inputs: int, elems: int | None = None) -> int:
        """Bytes of ``elems`` elements (default: the whole tensor) in all ``n_inputs`` inputs together."""
        elems = self.numel if elems is None else elems
        if self.in_dtypes:
            return elems * sum(map(itemsize, self.in_dtypes))
        return elems * itemsize(self.dtype) * n_inputs

    @property
    def out_itemsize(self) -> int:
        return itemsize(self.out_dtype)

    @property
    def files(self) -> tuple[str, ...]:
        """Every input file this tensor's bytes lie in."""
        return tuple(dict.fromkeys(e.path for ext in self.locs for e in ext))

    @cached_property
    def row_bytes(self) -> int:
        """The shortest row of any input's strided extents (a DCP chunk cut along columns); 0: none."""
        return min((r for ext in self.locs if (r := row_bytes(ext))), default=0)


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
    data_bytes: int  # the tensors' bytes
    framing: int = 0  # bytes the output format writes around its tensors (a DCP record's zip headers)


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
    output_format: str = "hf"  # a name in output.convert.OUTPUTS
    # every input file's (st_dev, st_ino, size, mtime_ns, ctime_ns) when planned (formats/inputs.py)
    identities: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def read_bytes(self) -> int:
        return sum(t.read_nbytes(len(self.sources)) for t in self.tensors)

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
            "output_format": self.output_format,
            "warnings": list(self.warnings),
            "options": asdict(o),
        }


def slice_cost(t: TensorPlan, n_inputs: int, elems: int) -> int:
    """Working-set bytes of ``elems`` elements: inputs and output, each double-buffered; for a tensor held
    as strided extents, the pieces (one per row) a slice of them is read as, double-buffered too."""
    cost = elems * (2 * n_inputs * t.itemsize + 2 * t.out_itemsize)
    if t.row_bytes:
        records = max(len(ext) for ext in t.locs)
        cost += 2 * n_inputs * (elems * t.itemsize // t.row_bytes + records) * PIECE_BYTES
    return cost


def block_cost(plan: Plan, block: tuple[Slice, ...]) -> int:
    n = len(plan.sources)
    return sum(slice_cost(plan.tensors[s.tensor], n, s.stop - s.start) for s in block)




def output_dtypes(plan: Plan) -> dict[str, str]:
    """Input dtype -> output dtype of the averaged tensors (for the manifest)."""
    return {t.dtype: t.out_dtype for t in plan.tensors if t.averaged}


