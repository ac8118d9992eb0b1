"""The ``.metadata`` file of a torch.distributed.checkpoint (DCP) folder, read without running code.

``.metadata`` is a pickle of ``torch.distributed.checkpoint.metadata.Metadata``: for every entry
of the flattened state dict, a ``TensorStorageMetadata`` (dtype, global shape, chunks: offsets
and sizes) or a ``BytesStorageMetadata`` (a pickled object); ``storage_data`` maps each chunk
(``MetadataIndex(fqn, offset)``) to a ``_StorageInfo`` (file, byte offset and length of the chunk's
``torch.save`` record, transforms such as zstd). :class:`_MetadataUnpickler` maps exactly those
classes, and the handful of torch globals they hold (``torch.Size``, dtypes, layouts), to the plain
records below (and the save plans Megatron-Core adds as ``all_local_plans``, to inert records);
any other global (``os.system``, ``builtins.eval``, a framework's own class) is
refused when the pickle names it, before anything is called. Read this way, ``.metadata`` builds
no torch object and needs no torch import.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from merger.formats.base import fail
from merger.formats.inputs import read_input
from merger.formats.pickle_machine import WIDE_OPCODES, SafeUnpickler, check_depth

METADATA = ".metadata"
RESAVE = "the checkpoint is incomplete or corrupt: re-save it with torch.distributed.checkpoint.save"

# torch dtypes as DCP pickles them (``torch.float32`` -> "float32"); merger's canonical names
_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
           "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64", "complex64", "complex128",
           "float8_e4m3fnuz", "float8_e5m2fnuz"}


class _Record:
    """A DCP metadata object as plain attributes (BUILD sets them from the pickled state)."""

    def __setstate__(self, state):
        if type(state) is dict:  # the common case, first: one call per chunk record
            self.__dict__.update(state)
            return
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict, slots)
            state = {**(state[0] or {}), **state[1]}
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"unexpected state for {type(self).__name__}")
        self.__dict__.update(state)


class MetadataRecord(_Record):
    """``Metadata``: ``state_dict_metadata``, ``storage_data``, ``planner_data``, ``version``."""


class TensorRecord(_Record):
    """``TensorStorageMetadata``: ``properties`` (a :class:`PropertiesRecord`), ``size``, ``chunks``."""


class BytesRecord(_Record):
    """``BytesStorageMetadata``: a pickled object in a ``.distcp`` file (never read by merger)."""


class ChunkRecord(_Record):
    """``ChunkStorageMetadata``: ``offsets`` and ``sizes`` of one chunk in the global tensor."""


class IndexRecord(_Record):
    """``MetadataIndex``: ``fqn`` and ``offset`` (the chunk's offsets) keying ``storage_data``."""


class StorageRecord(_Record):
    """``_StorageInfo``: ``relative_path``, ``offset``, ``length``, ``transform_descriptors``."""


class StorageMetaRecord(_Record):
    """``StorageMeta``: checkpoint and save ids."""


class PlanRecord(_Record):
    """``SavePlan``, ``WriteItem``, ``TensorWriteData``, ``BytesIOWriteData``: the ranks' save plans that
    Megatron-Core keeps in ``Metadata.all_local_plans`` (never used by merger)."""


class PropertiesRecord(_Record):
    """``TensorProperties``: pickled as a tuple (dtype, layout, requires_grad, memory format, pinned)."""

    def __setstate__(self, state):
        if isinstance(state, tuple) and state and not isinstance(state[-1], dict):
            self.__dict__["dtype"] = state[0]
            return
        super().__setstate__(state)


@dataclass(frozen=True)
class DType:
    """A ``torch.<dtype>`` global: its name."""

    name: str


def _callable(f):
    f._pickle_callable = True
    return f


@_callable
def _path(*parts):
    if not all(type(p) is str for p in parts) or sum(map(len, parts)) > 4096:
        raise pickle.UnpicklingError("a path of something other than short strings")
    return "/".join(parts)


@_callable
def _size(dims=()):
    """``torch.Size``: a tuple of ints (never of a string's characters)."""
    if not isinstance(dims, (tuple, list)) or not all(type(d) is int for d in dims):
        raise pickle.UnpicklingError("torch.Size of something other than ints")
    return tuple(dims)


@_callable
def _layout(name):
    """``_get_layout("torch.strided")``: its name (never ``str`` of a built value)."""
    if type(name) is not str or len(name) > 64:
        raise pickle.UnpicklingError("a layout that is not a name")
    return name


@_callable
def _int(x=0):
    if type(x) is not int:
        raise pickle.UnpicklingError("an enum value that is not an int")
    return x


@_callable
def _dict(*args):
    return dict(*args)


_CLASSES = {
    "Metadata": MetadataRecord, "TensorStorageMetadata": TensorRecord, "BytesStorageMetadata": BytesRecord,
    "ChunkStorageMetadata": ChunkRecord, "MetadataIndex": IndexRecord, "TensorProperties": PropertiesRecord,
    "StorageMeta": StorageMetaRecord,
}
_PLANS = {"SavePlan", "WriteItem", "TensorWriteData", "BytesIOWriteData"}  # torch.distributed.checkpoint.planner
_MODULES = ("torch.distributed.checkpoint.metadata",
            "torch.distributed._shard.sharded_tensor.metadata",  # TensorProperties before torch 2.2
            "torch.distributed._shard.metadata")


class _MetadataUnpickler(SafeUnpickler):
    """Resolves DCP's metadata classes to records; every other global is refused. The machine is
    ``pickle_machine``'s (a dict memo, a budget for what calls make); its callables take only the
    values DCP pickles (``torch.Size`` of ints, a layout's name, a path's parts), so no chain of
    calls grows a small file."""

    OPCODES = WIDE_OPCODES
    NEW = (*_CLASSES.values(), StorageRecord, PlanRecord)
    CALLABLES = frozenset({*_CLASSES.values(), StorageRecord, PlanRecord})

    def find_class(self, module, name):
        if module in _MODULES and name in _CLASSES:
            return _CLASSES[name]
        if module in _MODULES and name == "_MEM_FORMAT_ENCODING":
            return _int
        if module == "torch.distributed.checkpoint.filesystem" and name == "_StorageInfo":
            return StorageRecord
        if module == "torch.distributed.checkpoint.planner" and name in _PLANS:
            return PlanRecord
        if module == "torch.distributed.checkpoint.planner" and name == "WriteItemType":
            return _int  # an enum pickled as WriteItemType(value)
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and name in _DTYPES:
            return DType(name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "WindowsPath", "PurePosixPath",
                                                                  "PureWindowsPath", "Path"):
            return _path
        if module == "collections" and name == "OrderedDict":
            return _dict
        raise fail(self.path, f"names {module}.{name}, which is not part of torch.distributed.checkpoint's "
                              "metadata; merger refuses it without running anything (a .metadata that carries "
                              "code or a framework's own objects)",
                   "only open checkpoints you trust; re-save the checkpoint with torch.distributed.checkpoint.save")

    def persistent_load(self, pid):
        raise fail(self.path, "holds a persistent reference, which DCP metadata never does", RESAVE)

    def build(self, inst, state) -> None:
        if isinstance(inst, _Record):
            inst.__setstate__(state)
            return
        super().build(inst, state)


@dataclass(frozen=True)
class Chunk:
    """One saved chunk of a tensor: where it sits in the tensor, and the record that holds it."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str | None  # relative path of the .distcp file; None when storage_data lacks the chunk
    offset: int = 0
    length: int = 0
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Entry:
    """One entry of the flattened state dict: a tensor (dtype, shape, chunks) or pickled bytes."""

    fqn: str
    is_tensor: bool
    dtype: str | None = None
    shape: tuple[int, ...] = ()
    chunks: tuple[Chunk, ...] = ()


@dataclass(frozen=True)
class DcpMetadata:
    """What merger needs from ``.metadata``: the entries, in saved order, and the planner's key paths."""

    entries: dict[str, Entry]
    planner_data: dict = field(default_factory=dict)  # fqn -> path in the nested state dict
    version: str | None = None
    file_ends: dict[str, int] = field(default_factory=dict)  # .distcp file -> end of its last record


def read_metadata(folder: str | Path) -> DcpMetadata:
    """Parse ``folder/.metadata`` with the restricted unpickler.

    Raises:
        CheckpointFormatError: a global outside DCP's metadata (code is never run), a broken
            pickle, or records that don't fit together.
    """
    path = Path(folder) / METADATA
    data = read_input(path, what="DCP metadata file")  # a regular file: a FIFO or a folder is refused
    try:
        md = _MetadataUnpickler(io.BytesIO(data), path, size=len(data)).load()
        check_depth(md.__dict__ if isinstance(md, _Record) else md)
    except pickle.UnpicklingError as e:
        raise fail(path, f"is not a DCP metadata pickle ({e})", RESAVE) from None
    except Exception as e:
        if getattr(e, "path", None) == str(path):  # our own refusal
            raise
        raise fail(path, f"is not a readable DCP metadata pickle ({type(e).__name__}: {e})", RESAVE) from None
    if not isinstance(md, MetadataRecord) or not isinstance(getattr(md, "state_dict_metadata", None), dict):
        raise fail(path, "holds no torch.distributed.checkpoint Metadata", RESAVE)
    storage: dict[tuple[str, tuple[int, ...]], StorageRecord] = {}
    ends: dict[str, int] = {}
    for k, v in (getattr(md, "storage_data", None) or {}).items():
        if isinstance(k, IndexRecord) and isinstance(v, StorageRecord):
            try:
                storage[(k.fqn, tuple(map(int, getattr(k, "offset", None) or ())))] = v
                ends[str(v.relative_path)] = max(ends.get(str(v.relative_path), 0), int(v.offset) + int(v.length))
            except (AttributeError, TypeError, ValueError):
                raise fail(path, f"entry {getattr(k, 'fqn', '?')!r}: malformed storage record", RESAVE) from None
    entries: dict[str, Entry] = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, BytesRecord):  # pickled bytes (a Megatron ShardedObject, extra state): one record
            s = storage.get((fqn, ()))
            chunk = (Chunk((), (), str(s.relative_path), int(s.offset), int(s.length),
                           tuple(getattr(s, "transform_descriptors", None) or ())),) if s is not None else ()
            entries[fqn] = Entry(str(fqn), False, chunks=chunk)
            continue
        try:
            dt = item.properties.dtype
            dtype = dt.name if isinstance(dt, DType) else None
            shape = tuple(map(int, item.size))
            chunks = []
            for c in item.chunks:
                offsets, sizes = tuple(map(int, c.offsets)), tuple(map(int, c.sizes))
                s = storage.get((fqn, offsets))
                if s is None:
                    chunks.append(Chunk(offsets, sizes, None))
                    continue
                chunks.append(Chunk(offsets, sizes, str(s.relative_path), int(s.offset), int(s.length),
                                    tuple(getattr(s, "transform_descriptors", None) or ())))
        except (AttributeError, TypeError, ValueError):
            raise fail(path, f"entry {fqn!r}: malformed tensor metadata", RESAVE) from None
        entries[fqn] = Entry(str(fqn), True, dtype, shape, tuple(chunks))
    planner = getattr(md, "planner_data", None)
    return DcpMetadata(entries, planner if isinstance(planner, dict) else {}, getattr(md, "version", None), ends)
