"""Hand-written torch zip files with torch's own pickle structure (``_rebuild_tensor_v2`` records
over ``("storage", <StorageClass>, key, "cpu", numel)`` persistent ids): any record, however wrong,
so tests can check what merger does with files ``torch.save`` would never write."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch


class Storage:
    def __init__(self, key: str, numel, cls=torch.HalfStorage):
        self.key, self.numel, self.cls = key, numel, cls


class Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage: Storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def write_torch_zip(path: Path, tensors: dict, blobs: dict[str, bytes]) -> None:
    """A torch zip: ``tensors`` (name -> :class:`Tensor`) in data.pkl, storage ``key`` holding ``blobs[key]``."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(OrderedDict(tensors))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(zipfile.ZipInfo("archive/data.pkl"), buf.getvalue())
        z.writestr("archive/byteorder", b"little")
        for key, data in blobs.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", b"3\n")
