"""What every format produces: :class:`TensorInfo`, a tensor's dtype, shape and the byte extents
that hold it, read from headers only.

A tensor is a list of :class:`Extent` s: ``nbytes`` bytes at ``offset`` in ``path`` that land at byte
``start`` of the tensor's C-contiguous bytes, or, strided, ``rows`` such runs that lie one after the
other in the file and ``stride`` bytes apart in the tensor. A safetensors or ``pytorch_model.bin``
tensor is one extent; a torch.distributed.checkpoint tensor is one extent per chunk, strided for a
chunk cut across columns (tensor parallelism): one record a chunk, never one a row. The extents of a
tensor tile its bytes exactly: :func:`check_extents`. :func:`clip` turns them into plain extents of
a byte range, in tensor order, so what a reader holds at once is bounded by the range it reads.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from merger.errors import CheckpointFormatError
from merger.units import itemsize

RESAVE = "re-download the file, or re-save the checkpoint with save_pretrained(safe_serialization=True)"


# memory one piece of a clipped strided extent costs while a slice is read (the Extent, its list slot,
# the native kernel's fd/offset/end arrays or the torch pipeline's run): what plan.slice_cost counts
PIECE_BYTES = 256


@dataclass(frozen=True, slots=True)
class Extent:
    """``nbytes`` bytes at byte ``offset`` of ``path``, landing at byte ``start`` of the tensor; strided
    (``rows`` > 1): row ``i`` is ``nbytes`` bytes at ``offset + i * nbytes`` of the file, landing at
    ``start + i * stride`` (a chunk cut along columns: its rows are contiguous in its record)."""

    path: str
    offset: int
    start: int
    nbytes: int  # bytes of each row
    rows: int = 1
    stride: int = 0  # tensor bytes from one row's start to the next's (rows > 1)

    @property
    def size(self) -> int:
        """Bytes of the tensor this extent holds."""
        return self.rows * self.nbytes

    @property
    def stop(self) -> int:
        """The tensor byte after its last row."""
        return self.start + (self.rows - 1) * self.stride + self.nbytes


def strided(path: str, offset: int, start: int, nbytes: int, rows: int, stride: int) -> Extent:
    """``rows`` runs of ``nbytes`` (contiguous in the file) ``stride`` bytes apart in the tensor: one
    plain extent where the rows touch (``stride == nbytes``) or there is one."""
    if rows == 1 or stride == nbytes:
        return Extent(path, offset, start, rows * nbytes)
    return Extent(path, offset, start, nbytes, rows, stride)


def row_bytes(extents: tuple[Extent, ...]) -> int | None:
    """The shortest row of a strided extent (what bounds how many pieces a byte range is); None: none."""
    return min((e.nbytes for e in extents if e.rows > 1), default=None)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: dtype, shape and where its bytes lie."""

    name: str
    dtype: str  # canonical dtype name, e.g. "float16" (see units.py)
    shape: tuple[int, ...]
    extents: tuple[Extent, ...]
    # one saved chunk of a bigger tensor, merged on its own (DCP in and out: formats/dcp.py
    # ``split``): (the tensor's name, the chunk's offsets in it, the tensor's shape); None: whole
    chunk: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None

    @classmethod
    def contiguous(cls, name: str, dtype: str, shape: tuple[int, ...], path: str, offset: int) -> TensorInfo:
        """A tensor stored as one run of bytes (safetensors, torch zip)."""
        nbytes = math.prod(shape) * itemsize(dtype)
        return cls(name, dtype, tuple(shape), (Extent(str(path), offset, 0, nbytes),))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    @property
    def path(self) -> str:
        """The file of the first extent (the only one, for most formats)."""
        return self.extents[0].path if self.extents else ""

    @property
    def offset(self) -> int:
        """Where the first extent starts in its file: the tensor's position, for ordering."""
        return self.extents[0].offset if self.extents else 0

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.path for e in self.extents))


def fail(path, what: str, hint: str | None = None) -> CheckpointFormatError:
    """A :class:`CheckpointFormatError` that starts with the file's path."""
    return CheckpointFormatError(f"{path}: {what}", path=str(path), hint=hint)


def check_extents(t: TensorInfo, where: str) -> None:
    """The extents of ``t`` must cover its bytes exactly once, in order (no gap, no overlap).

    Raises:
        CheckpointFormatError: naming the tensor, the byte where the tiling breaks, and ``where``.
    """
    at = 0
    for e in t.extents:
        if e.nbytes < 0 or e.offset < 0 or e.rows < 1 or e.rows > 1 and e.stride < max(e.nbytes, 1):
            raise fail(where, f"tensor {t.name!r}: an extent has a negative offset or size", RESAVE)
    if any(e.rows > 1 for e in t.extents):
        at = _sweep(t, where)
    else:
        for e in t.extents:
            if e.start != at:
                raise _broken(t, where, at, e.start)
            at += e.nbytes
    if at != t.nbytes:
        raise fail(where, f"tensor {t.name!r}: its chunks hold {at} bytes, its shape needs {t.nbytes}",
                   "the checkpoint is incomplete or corrupt: re-save it")


def _broken(t: TensorInfo, where: str, at: int, start: int) -> CheckpointFormatError:
    what = "missing" if start > at else "overlapping"
    return fail(where, f"tensor {t.name!r}: bytes {min(at, start)}..{max(at, start)} are {what} "
                       f"(chunks don't tile the tensor)", "the checkpoint is incomplete or corrupt: re-save it")


def _sweep(t: TensorInfo, where: str) -> int:
    """Walk the rows of every extent in tensor order (a heap of one next row per extent: memory in
    extents, not rows); returns the byte after the last, or raises at the first gap or overlap."""
    heap = [(e.start, i, 0) for i, e in enumerate(t.extents) if e.nbytes]
    heapq.heapify(heap)
    at = 0
    while heap:
        s, i, r = heap[0]
        e = t.extents[i]
        if s != at:
            raise _broken(t, where, at, s)
        at = s + e.nbytes
        if r + 1 < e.rows:
            heapq.heapreplace(heap, (s + e.stride, i, r + 1))
        else:
            heapq.heappop(heap)
    return at


def clip(extents: tuple[Extent, ...], start: int, stop: int) -> list[Extent]:
    """The pieces of ``extents`` that hold tensor bytes ``start:stop``, with ``start`` rebased to 0: plain
    extents in tensor order (``extents`` sorted by ``start``, as every format gives them). A strided
    extent gives one piece per row in the range: as many as the range holds, never the whole tensor's."""
    out = []
    rows = False
    for e in extents:
        if e.start >= stop:
            break
        if e.rows > 1:
            rows = True
            out += _clip_rows(e, start, stop)
            continue
        a, b = max(start, e.start), min(stop, e.start + e.nbytes)
        if a < b:
            out.append(Extent(e.path, e.offset + a - e.start, a - start, b - a))
    if rows:
        out.sort(key=lambda p: p.start)
    return out


def _clip_rows(e: Extent, start: int, stop: int) -> list[Extent]:
    """The rows of strided ``e`` that hold bytes of ``start:stop``, clipped to it and rebased."""
    first = max(0, (start - e.start - e.nbytes) // e.stride + 1)
    last = min(e.rows, -(-(stop - e.start) // e.stride))
    out = []
    for i in range(first, last):
        s = e.start + i * e.stride
        a, b = max(start, s), min(stop, s + e.nbytes)
        if a < b:
            out.append(Extent(e.path, e.offset + i * e.nbytes + a - s, a - start, b - a))
    return out
