"""Whole checkpoints in memory, for scoring: tensors read with ``pread`` from their extents, as
stored (the sweep and the held-out scorer work on state dicts; merges never do)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from merger.formats.inputs import open_input
from merger.formats import TensorInfo, read_checkpoint
from merger.formats.reading import read_extents
from merger.units import dtype_from_name

StateDict = dict[str, torch.Tensor]


def read_tensors(layout: dict[str, TensorInfo], names=None) -> tuple[StateDict, int]:
    """Tensors ``names`` (default: all) of one checkpoint, as stored, read with ``pread``;
    returns (tensors, bytes read)."""
    out, fds, n = {}, {}, 0
    try:
        for name in (layout if names is None else names):
            t = layout[name]
            for path in t.files:
                if path not in fds:
                    fds[path] = open_input(path, what="weights file")
            buf = torch.empty(t.nbytes, dtype=torch.uint8)
            read_extents(fds, t.extents, 0, memoryview(buf.numpy()))
            out[name] = buf.view(dtype_from_name(t.dtype)).reshape(t.shape)
            n += t.nbytes
    finally:
        for fd in fds.values():
            os.close(fd)
    return out, n


def read_state_dict(folder: str | Path) -> StateDict:
    """Every tensor of a checkpoint folder (e.g. a ``merger average`` output), as stored."""
    return read_tensors(read_checkpoint(folder))[0]
