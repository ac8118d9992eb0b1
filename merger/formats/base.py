"""What every format produces: :class:`TensorInfo`, a tensor's dtype, shape and the byte extents
that hold it, read from headers only.

A tensor is a list of :class:`Extent` s: ``nbytes`` bytes at ``offset`` in ``path`` that land at byte
``start`` of the tensor's C-contiguous bytes. A safetensors or ``pytorch_model.bin`` tensor is one
extent; a torch.distributed.checkpoint tensor is one extent per chunk (and per row of a chunk cut
across columns). The extents of a tensor tile its bytes exactly, in order: :func:`check_extents`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merger.errors import CheckpointFormatError
from merger.units import itemsize

RESAVE = "re-download the file, or re-save the checkpoint with save_pretrained(safe_serialization=True)"


@dataclass(frozen=True)
class Extent:
    """``nbytes`` bytes at byte ``offset`` of ``path``, landing at byte ``start`` of the tensor."""

    path: str
    offset: int
    start: int
    nbytes: int


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
        if e.nbytes < 0 or e.offset < 0:
            raise fail(where, f"tensor {t.name!r}: an extent has a negative offset or size", RESAVE)
        if e.start != at:
            what = "missing" if e.start > at else "overlapping"
            raise fail(where, f"tensor {t.name!r}: bytes {min(at, e.start)}..{max(at, e.start)} are {what} "
                              f"(chunks don't tile the tensor)", "the checkpoint is incomplete or corrupt: "
                                                                   "re-save it")
        at += e.nbytes
    if at != t.nbytes:
        raise fail(where, f"tensor {t.name!r}: its chunks hold {at} bytes, its shape needs {t.nbytes}",
                   "the checkpoint is incomplete or corrupt: re-save it")


def clip(extents: tuple[Extent, ...], start: int, stop: int) -> list[Extent]:
    """The pieces of ``extents`` that hold tensor bytes ``start:stop``, with ``start`` rebased to 0."""
    out = []
    for e in extents:
        a, b = max(start, e.start), min(stop, e.start + e.nbytes)
        if a < b:
            out.append(Extent(e.path, e.offset + a - e.start, a - start, b - a))
        elif e.start >= stop:
            break
    return out
