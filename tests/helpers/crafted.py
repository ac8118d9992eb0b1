"""Hand-written torch zip files with torch's own pickle structure (``_rebuild_tensor_v2`` records
over ``("storage", <StorageClass>, key, "cpu", numel)`` persistent ids): any record, however wrong,
so tests can check what merger does with files ``torch.save`` would never write; and stored zips
written by hand (:func:`build`), whose local headers and central directory may disagree."""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib
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


def members(record: bytes) -> list[dict]:
    """The members of a record, in order, as :func:`build` takes them."""
    z = zipfile.ZipFile(io.BytesIO(record))
    return [{"name": i.filename.encode(), "data": z.read(i)} for i in z.infolist()]


def build(ms: list[dict], *, cd_at: int | None = None, comment: bytes = b"", zip64_end: bool = True) -> bytes:
    """A stored zip written by hand. Each member: ``name``, ``data``; optional ``lname``/``lextra``
    (its local header's name and extra field), ``lsize`` (the local header's size fields), ``flags``,
    ``method``, ``cdata`` (the stored bytes, when ``method`` says compressed), ``local_at`` (the
    directory's offset for it), ``zip64`` (sizes and offset in a zip64 extra field), ``attrs``."""
    out, cd = bytearray(), bytearray()
    for m in ms:
        at, data = len(out), m["data"]
        stored, crc, flags = m.get("cdata", data), zlib.crc32(data), m.get("flags", 0)
        lname, lextra = m.get("lname", m["name"]), m.get("lextra", b"")
        lsize = m.get("lsize", 0 if flags & 8 else len(stored))
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, flags, m.get("method", 0), 0, 0, 0 if flags & 8 else crc,
                           lsize, lsize, len(lname), len(lextra)) + lname + lextra + stored
        if flags & 8:
            out += struct.pack("<4s3L", b"PK\x07\x08", crc, len(stored), len(data))
        csize, usize, local, extra = len(stored), len(data), m.get("local_at", at), b""
        if m.get("zip64"):
            extra = struct.pack("<HHQQQ", 1, 24, usize, csize, local)
            csize = usize = local = 0xFFFFFFFF
        cd += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 45, 20, flags, m.get("method", 0), 0, 0, crc, csize, usize,
                          len(m["name"]), len(extra), 0, 0, 0, m.get("attrs", 0), local) + m["name"] + extra
    cd_off = len(out) if cd_at is None else cd_at
    out += cd
    if zip64_end:
        at64 = len(out)
        out += struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, len(ms), len(ms), len(cd), cd_off)
        out += struct.pack("<4sLQL", b"PK\x06\x07", 0, at64, 1)
    out += struct.pack("<4s4HLLH", b"PK\x05\x06", 0, 0, len(ms), len(ms), len(cd), cd_off, len(comment)) + comment
    return bytes(out)
