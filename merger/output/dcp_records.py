"""The bytes torch writes for a DCP folder, written without importing torch (3-5 s of imports on the
CPU path, where merger otherwise needs none).

- :func:`write_record`: one ``torch.save(tensor)`` record (a stored zip: ``archive/data.pkl``,
  ``byteorder``, ``data/0``, ``version``), its storage bytes streamed in pieces from a reader, so
  memory stays at one piece whatever the tensor's size;
- :func:`metadata_pickle`: ``.metadata``, the pickle of torch's ``Metadata`` classes.

Both pickles name torch's globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``,
``torch.distributed.checkpoint.metadata.Metadata`` ...) by module and name, through
:class:`_Pickler`, exactly as torch's own pickles do; ``tests/test_dcp.py`` loads the result with
``torch.load`` / ``dcp.load``.
"""

from __future__ import annotations

import copyreg
import io
import pickle
import zipfile
from collections.abc import Callable

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


class _Relative:
    """The open file ``f`` from its current position on, as a file of its own (zip offsets count from
    the record's first byte, as ``torch.save`` into DCP's stream writes them)."""

    def __init__(self, f):
        self.f, self.base = f, f.tell()

    def write(self, b) -> int:
        return self.f.write(b)

    def tell(self) -> int:
        return self.f.tell() - self.base

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(self.base + pos if whence == 0 else pos, whence) - self.base

    def seekable(self) -> bool:
        return True

    def flush(self) -> None:
        self.f.flush()


def write_record(f, dtype: str, shape: tuple[int, ...], nbytes: int, fill: Callable[[Callable], None]) -> None:
    """Append a ``torch.save`` record of a contiguous ``dtype`` tensor of ``shape`` to the open file ``f``.

    ``fill(write)`` must call ``write(bytes_like)`` with the tensor's ``nbytes`` bytes, in order.
    """
    numel = nbytes // max(1, _itemsize(dtype))
    tensor = Call(Global("torch._utils", "_rebuild_tensor_v2"),
                  (_Storage(dtype, numel), 0, tuple(shape), contiguous_strides(tuple(shape)), False,
                   Call(Global("collections", "OrderedDict"))))
    with zipfile.ZipFile(_Relative(f), "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr("archive/data.pkl", dumps(tensor, 2))
        zf.writestr("archive/byteorder", "little")
        with zf.open(zipfile.ZipInfo("archive/data/0"), "w", force_zip64=nbytes >= 1 << 31) as w:
            fill(w.write)
        zf.writestr("archive/version", "3\n")


def _itemsize(dtype: str) -> int:
    from merger.units import itemsize

    return itemsize(dtype)


def metadata_pickle(tensors: list[tuple[str, str, tuple[int, ...], str, int, int]], planner: dict) -> bytes:
    """``.metadata`` for whole-tensor chunks: ``tensors`` are (fqn, dtype, shape, file, offset, length)."""
    layout = Call(Global("torch.serialization", "_get_layout"), ("torch.strided",))
    entries, storage, planner_data = {}, {}, {}
    for fqn, dtype, shape, file, offset, length in tensors:
        props = New(Global(_MD, "TensorProperties"),
                    (Global("torch", dtype), layout, False, Call(Global(_MD, "_MEM_FORMAT_ENCODING"), (0,)), False))
        zeros = _size([0] * len(shape))
        chunk = New(Global(_MD, "ChunkStorageMetadata"), {"offsets": zeros, "sizes": _size(shape)})
        entries[fqn] = New(Global(_MD, "TensorStorageMetadata"),
                           {"properties": props, "size": _size(shape), "chunks": [chunk]})
        index = New(Global(_MD, "MetadataIndex"), {"fqn": fqn, "offset": zeros, "index": 0})
        storage[index] = New(Global(_FS, "_StorageInfo"), {"relative_path": file, "offset": offset, "length": length})
        planner_data[fqn] = tuple(planner.get(fqn, (fqn,)))
    meta = New(Global(_MD, "StorageMeta"), {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": []})
    md = New(Global(_MD, "Metadata"), {"state_dict_metadata": entries, "planner_data": planner_data,
                                       "storage_data": storage, "storage_meta": meta, "version": "1.0.0"})
    return dumps(md, 4)
