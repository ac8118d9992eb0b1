"""The bytes torch writes for a DCP folder, written without importing torch (seconds of imports on
the CPU path, where merger otherwise needs none).

- :func:`record_head` and :func:`record_tail`: one ``torch.save(tensor)`` record (a stored zip:
  ``archive/data.pkl``, ``byteorder``, ``data/0``, ``version``) as the bytes before and after its
  storage, so the engine writes the storage in place as it folds it (memory: the fold's buffers,
  whatever the tensor's size);
- :func:`metadata_pickle`: ``.metadata``, the pickle of torch's ``Metadata`` classes.

Both pickles name torch's globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``,
``torch.distributed.checkpoint.metadata.Metadata`` ...) by module and name, through
:class:`_Pickler`, exactly as torch's own pickles do; ``tests/formats/test_dcp.py`` loads the result with
``torch.load`` / ``dcp.load``.
"""

from __future__ import annotations

import copyreg
import functools
import io
import pickle
import struct
import zlib

from merger.formats.pt_header import STORAGE_DTYPES, contiguous_strides

STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}  # "float32" -> "FloatStorage"
_MD = "torch.distributed.checkpoint.metadata"
_FS = "torch.distributed.checkpoint.filesystem"


class Global:
    """A global (``module.name``) as a pickle names it, without importing it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce wants a callable; it is only ever named
        raise TypeError(f"{self.module}.{self.name} is only named in a pickle")


class Call:
    """``func(*args)`` in the pickle (REDUCE), then ``state`` (BUILD) if given."""

    def __init__(self, func: Global, args: tuple = (), state=None):
        self.func, self.args, self.state = func, args, state


class New:
    """``cls.__new__(cls)`` (NEWOBJ) then ``state`` (BUILD): how dataclasses pickle."""

    def __init__(self, cls: Global, state):
        self.cls, self.state = cls, state


class _Storage:
    def __init__(self, dtype: str, numel: int):
        self.dtype, self.numel = dtype, numel


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its save() can be extended
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save_reduce(obj.func, obj.args, obj.state)
        elif isinstance(obj, New):
            self.save_reduce(copyreg.__newobj__, (obj.cls,), obj.state)
        else:
            super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", Global("torch", STORAGES[obj.dtype]), "0", "cpu", obj.numel)
        return None


def dumps(obj, protocol: int) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def _size(dims) -> Call:
    return Call(Global("torch", "Size"), (tuple(dims),))


# -- one torch.save record, as the bytes before and after its storage ----------------------------
# A record is a stored zip: archive/data.pkl, archive/byteorder, archive/data/0 (the storage),
# archive/version, then the central directory. The storage member carries a data descriptor
# (general-purpose flag bit 3: its CRC-32 follows the data, and the central directory has it too),
# so every byte before the storage is known before the storage is: the engine writes the record
# around the tensor as it folds it (`output/shards.py`), in one pass, with no second copy.
_DOS_DATE = 0x21  # 1980-01-01 00:00: fixed, so a merge's bytes never depend on when it ran
_ALIGN = 64  # the storage starts at a multiple of 64 bytes in its record, as torch.save aligns it
_NO = 0xFFFFFFFF  # a 32-bit field whose value is in the zip64 extra field
_MEMBERS = (b"archive/data.pkl", b"archive/byteorder", b"archive/data/0", b"archive/version")


def _local(name: bytes, crc: int, size: int, *, descriptor: bool = False, extra: bytes = b"") -> bytes:
    crc, size = (0, 0) if descriptor else (crc, size)
    return struct.pack("<IHHHHHIIIHH", 0x04034B50, 45 if extra[:2] == b"\x01\x00" else 20, 8 if descriptor else 0,
                       0, 0, _DOS_DATE, crc, size, size, len(name), len(extra)) + name + extra


def _central(name: bytes, crc: int, size: int, offset: int, *, descriptor: bool = False) -> bytes:
    big = [v for v in (size, size) if v >= _NO] + ([offset] if offset >= _NO else [])
    extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
    return struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45 if big else 20, 8 if descriptor else 0, 0, 0,
                       _DOS_DATE, crc, min(size, _NO), min(size, _NO), len(name), len(extra), 0, 0, 0, 0,
                       min(offset, _NO)) + name + extra


def _end(count: int, cd_at: int, cd_len: int) -> bytes:
    out = b""
    if cd_at + cd_len >= _NO:  # zip64 end of central directory record + its locator
        out = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, cd_len, cd_at)
        out += struct.pack("<IIQI", 0x07064B50, 0, cd_at + cd_len, 1)
    return out + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, count, count, min(cd_len, _NO), min(cd_at, _NO), 0)


def _pickle(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    return _pickle_of(dtype, tuple(shape), nbytes)


@functools.lru_cache(maxsize=1024)  # a model has a few dozen shapes; the pure-Python pickler is slow
def _pickle_of(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    numel = nbytes // max(1, _itemsize(dtype))
    return dumps(Call(Global("torch._utils", "_rebuild_tensor_v2"),
                      (_Storage(dtype, numel), 0, tuple(shape), contiguous_strides(tuple(shape)), False,
                       Call(Global("collections", "OrderedDict")))), 2)


def record_head(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    """The bytes of a ``torch.save`` record of a contiguous ``dtype`` tensor of ``shape`` (``nbytes``
    bytes) that come before its storage: the storage starts right after them."""
    return _head_of(dtype, tuple(shape), nbytes)


@functools.lru_cache(maxsize=1024)
def _head_of(dtype: str, shape: tuple[int, ...], nbytes: int) -> bytes:
    pkl = _pickle(dtype, shape, nbytes)
    head = _local(_MEMBERS[0], zlib.crc32(pkl), len(pkl)) + pkl + _local(_MEMBERS[1], _LITTLE_CRC, 6) + b"little"
    zip64 = struct.pack("<HHQQ", 1, 16, 0, 0) if nbytes >= _NO else b""
    at = len(head) + 30 + len(_MEMBERS[2]) + len(zip64)
    pad = -(at + 4) % _ALIGN  # torch's own alignment field: id "FB", padding bytes "Z"
    return head + _local(_MEMBERS[2], 0, nbytes, descriptor=True, extra=zip64 + b"FB" + struct.pack("<H", pad)
                         + b"Z" * pad)


def record_tail(dtype: str, shape: tuple[int, ...], nbytes: int, crc: int, *, head: int | None = None) -> bytes:
    """The bytes of the record that come after its storage, whose CRC-32 is ``crc``: the storage's
    data descriptor, ``archive/version``, the central directory. Their length doesn't depend on
    ``crc`` (:func:`tail_length`). ``head``: ``len(record_head(...))`` when known."""
    pkl = _pickle(dtype, shape, nbytes)
    head = len(record_head(dtype, shape, nbytes)) if head is None else head
    at_bo = 30 + len(_MEMBERS[0]) + len(pkl)
    at_data = at_bo + 30 + len(_MEMBERS[1]) + 6
    end = head + nbytes
    desc = struct.pack("<IIQQ", 0x08074B50, crc, nbytes, nbytes) if nbytes >= _NO else \
        struct.pack("<IIII", 0x08074B50, crc, nbytes, nbytes)
    at_ver = end + len(desc)
    tail = desc + _local(_MEMBERS[3], _VERSION_CRC, 2) + b"3\n"
    cd_at = end + len(tail)
    cd = (_central(_MEMBERS[0], zlib.crc32(pkl), len(pkl), 0) + _central(_MEMBERS[1], _LITTLE_CRC, 6, at_bo)
          + _central(_MEMBERS[2], crc, nbytes, at_data, descriptor=True)
          + _central(_MEMBERS[3], _VERSION_CRC, 2, at_ver))
    return tail + cd + _end(4, cd_at, len(cd))


def tail_length(dtype: str, shape: tuple[int, ...], nbytes: int, *, head: int | None = None) -> int:
    return len(record_tail(dtype, shape, nbytes, 0, head=head))


_LITTLE_CRC = zlib.crc32(b"little")
_VERSION_CRC = zlib.crc32(b"3\n")


def _itemsize(dtype: str) -> int:
    from merger.units import itemsize

    return itemsize(dtype)


def metadata_pickle(tensors: list[tuple[str, str, tuple[int, ...], list[tuple]]], planner: dict,
                    objects: list[tuple[str, str, int, int, tuple[str, ...]]] = ()) -> bytes:
    """``.metadata``: ``tensors`` are (fqn, dtype, shape, chunks), each chunk (offsets, sizes, file,
    offset, length) of a record; ``objects`` pickled-bytes entries (fqn, file, offset, length,
    transform descriptors)."""
    layout = Call(Global("torch.serialization", "_get_layout"), ("torch.strided",))
    entries, storage, planner_data = {}, {}, {}
    for fqn, dtype, shape, chunks in tensors:
        props = New(Global(_MD, "TensorProperties"),
                    (Global("torch", dtype), layout, False, Call(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,)), False))
        metas = []
        for i, (offsets, sizes, file, offset, length) in enumerate(chunks):
            metas.append(New(Global(_MD, "ChunkStorageMetadata"), {"offsets": _size(offsets), "sizes": _size(sizes)}))
            index = New(Global(_MD, "MetadataIndex"), {"fqn": fqn, "offset": _size(offsets), "index": i})
            storage[index] = New(Global(_FS, "_StorageInfo"),
                                 {"relative_path": file, "offset": offset, "length": length})
        entries[fqn] = New(Global(_MD, "TensorStorageMetadata"),
                           {"properties": props, "size": _size(shape), "chunks": metas})
        planner_data[fqn] = tuple(planner.get(fqn, (fqn,)))
    for fqn, file, offset, length, transforms in objects:
        entries[fqn] = New(Global(_MD, "BytesStorageMetadata"), None)
        index = New(Global(_MD, "MetadataIndex"), {"fqn": fqn, "offset": None, "index": None})
        info = {"relative_path": file, "offset": offset, "length": length}
        storage[index] = New(Global(_FS, "_StorageInfo"),
                             {**info, "transform_descriptors": list(transforms)} if transforms else info)
        planner_data[fqn] = tuple(planner.get(fqn, (fqn,)))
    meta = New(Global(_MD, "StorageMeta"), {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []})
    md = New(Global(_MD, "Metadata"), {"state_dict_metadata": entries, "planner_data": planner_data,
                                       "storage_data": storage, "storage_meta": meta, "version": "1.0.0"})
    return dumps(md, 4)
