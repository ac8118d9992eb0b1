"""``pytorch_model.bin``: a ``torch.save`` zip of one flat state dict, from headers only.

``*/data.pkl`` is a pickle that only *names* storages ``*/data/<key>``, stored uncompressed in the
zip. It is read by ``pt_header.py`` (the one torch-zip reader, shared with training checkpoints)
with :class:`~merger.formats.pt_header.StateDictUnpickler`, which knows a handful of torch globals
and builds no object at all, so a malicious pickle can't run code; the legacy (non-zip) torch
format, big-endian files, duplicate zip members and malformed tensor records are refused. Each
tensor is read where it lies in its storage (views too).
"""

from __future__ import annotations

from pathlib import Path

from merger.formats.base import RESAVE as _RESAVE
from merger.formats.base import TensorInfo
from merger.formats.base import fail as _fail
from merger.formats.pt_header import StateDictUnpickler, StorageRef, TensorRef, read_header, tensor_extents


def _describe(obj) -> str:
    if isinstance(obj, TensorRef):
        return "a tensor"
    if isinstance(obj, StorageRef):
        return "a bare storage (torch.save of t.storage(), not of tensors)"
    if isinstance(obj, dict):
        return "a dict (a nested state dict?)"
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _check_state_dict(obj, path) -> None:
    """``obj`` must be {name: tensor}, every tensor over a real storage record."""
    hint = ("save model.state_dict() alone (not a training checkpoint with optimizer state or a step "
            "counter), or convert the checkpoint to safetensors")
    if not isinstance(obj, dict):
        raise _fail(path, f"holds {_describe(obj)}, not a state dict of tensors (name -> tensor)", hint)
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, TensorRef):
            raise _fail(path, f"is not a flat state dict of tensors: the entry {k!r:.80} is {_describe(v)}", hint)
        if not isinstance(v.storage, StorageRef):
            raise _fail(path, f"tensor {k!r} has no storage record (corrupt data.pkl)", _RESAVE)


def read_torch_zip(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor layout of a ``torch.save`` zip file (``pytorch_model.bin``), without loading data.

    Raises:
        CheckpointFormatError: not a zip (legacy format or garbage), compressed members,
            non-tensor pickles, unreadable views, truncated data (see ``pt_header``).
    """
    header = read_header(path, unpickler=StateDictUnpickler)
    _check_state_dict(header.tree, path)
    return tensor_extents(header, header.tree, list(header.tree), path)
