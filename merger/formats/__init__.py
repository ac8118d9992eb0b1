"""Checkpoint formats: turn a path into its tensors (dtype, shape, byte extents) from headers alone.

A *format* is a module with ``NAME`` and four functions:

- ``detect(path) -> bool``: whether ``path`` (a folder or a file) is a checkpoint of this format;
- ``read(path, *, key=None) -> dict[str, TensorInfo]``: every tensor of the model, as byte extents
  (``base.py``), never building pickled objects and never reading tensor data; ``key`` (``--key``)
  says where the model lies in a training checkpoint that holds more (optimizer, step, config);
- ``OUTPUT``: the output format (a name in ``output.convert.OUTPUTS``) that writes this format
  back, so that training can restart from a merge;
- ``weight_files(path) -> list[str]``: the files those extents lie in (for provenance);
- ``side_files(path) -> tuple[str, ...]``: files copied into the output byte for byte (optional
  ``OWN_FILES``: those of them copied only when the output is the format's own, e.g. Megatron's
  ``common.pt`` beside a DCP output, not beside ``--to safetensors``).

**Add a format**: write ``formats/<name>.py`` with those four, add ``"<name>": "merger.formats.<name>"``
to :data:`REGISTRY` (detection tries them in order, so put specific formats before general ones),
and add tests in ``tests/formats/`` that read files made by the format's real writer.
Modules are imported on first use, so a format's dependencies cost nothing until it is met.
Open input files only through ``formats.inputs`` (``open_input``/``read_input``/``check_regular``):
regular files only, never blocking on a FIFO, a clear error at the open-file limit.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Protocol

from merger.errors import CheckpointFormatError, MergerError
from merger.formats.base import PIECE_BYTES, Extent, TensorInfo, check_extents, clip, row_bytes

REGISTRY: dict[str, str] = {
    "dcp": "merger.formats.dcp",
    "dcp_safetensors": "merger.formats.dcp_safetensors",  # HuggingFaceStorageWriter(save_distributed=True)
    "torch_pt": "merger.formats.torch_pt",  # training files (ckpt_<step>.pt, .ckpt) and nanoGPT out/ckpt.pt
    "hf": "merger.formats.hf_folder",
}


class Format(Protocol):
    """What a format module provides (see the module docstring)."""

    NAME: str

    def detect(self, path: str | Path) -> bool: ...

    OUTPUT: str

    def read(self, path: str | Path, *, key: str | None = None) -> dict[str, TensorInfo]: ...

    def weight_files(self, path: str | Path) -> list[str]: ...

    def side_files(self, path: str | Path) -> tuple[str, ...]: ...


def get(name: str) -> Format:
    """The format module registered as ``name``."""
    module: ModuleType = importlib.import_module(REGISTRY[name])
    return module  # type: ignore[return-value]


def detect(path: str | Path) -> Format | None:
    """The first registered format that recognises ``path``, or None."""
    for name in REGISTRY:
        fmt = get(name)
        if fmt.detect(path):
            return fmt
    return None


def of(path: str | Path) -> Format:
    """The format of ``path``.

    Raises:
        CheckpointFormatError: no registered format recognises it.
    """
    fmt = detect(path)
    if fmt is None:
        hf = get("hf")
        raise CheckpointFormatError(
            f"{path}: no checkpoint found (expected a folder with one of {', '.join(hf.WEIGHT_FILES)})",
            path=str(path), hint="point at a Hugging Face checkpoint folder, or a folder of revision "
                                 "subfolders (step1000/ ...)")
    return fmt


def read_checkpoint(path: str | Path, *, key: str | None = None, split: frozenset[str] = frozenset()
                    ) -> dict[str, TensorInfo]:
    """Every tensor of the model in the checkpoint at ``path``, whatever its format; ``split``: the
    tensors a DCP folder gives chunk by chunk (``formats/dcp.read``).

    Raises:
        CheckpointFormatError: unrecognised, unreadable, truncated or unsafe input.
        UsageError: a ``key`` the format can't use.
    """
    fmt = of(path)
    return fmt.read(path, key=key, split=split) if split else fmt.read(path, key=key)


def read_checkpoints(paths: list, *, key: str | None = None, split: frozenset[str] = frozenset()
                     ) -> list[dict[str, TensorInfo]]:
    """:func:`read_checkpoint` of each path. Out of file descriptors while one is read (a DCP
    revision opens all its rank files at once), the error counts what the merge opens at once:
    every weight file of every path (each DCP revision's ``.distcp`` files of its model part).

    Raises:
        MergerError: too many files for ``ulimit -n``; else as :func:`read_checkpoint`.
    """
    from merger.formats.inputs import too_many_files

    try:
        return [read_checkpoint(p, key=key, split=split) for p in paths]
    except MergerError as e:
        if getattr(e, "needed", None) is None:
            raise
        from merger.formats import dcp

        total = sum(len(dcp.storage_files(p, key)) if of(p).NAME == "dcp" else len(of(p).weight_files(p))
                    for p in paths)
        raise too_many_files(max(total, e.needed)) from None


__all__ = ["PIECE_BYTES", "REGISTRY", "Extent", "Format", "TensorInfo", "check_extents", "clip", "detect", "get",
           "of", "read_checkpoint", "read_checkpoints", "row_bytes"]
