"""The header of a ``torch.save`` training checkpoint: its pickle, read without building an object,
and where each storage's bytes lie in the zip, even when the file is cut short.

A training checkpoint (nanoGPT's ``ckpt.pt``, Lightning's ``.ckpt``, ...) is a zip whose
``data.pkl`` holds a tree of plain containers (dicts, lists, numbers, strings) whose leaves name
storages ``data/<key>``. We unpickle it with :class:`TreeUnpickler`, a generalisation of
``torch_zip``'s header unpickler: the torch globals become the same inert records
(``torch_zip.TensorRef`` / ``StorageRef``), a short list of plain types is allowed, and every
other global is refused: no class is imported and no code runs.

Storage offsets come from the zip's central directory. torch writes its members with data
descriptors (sizes after the data, not in the local headers), so when the central directory is
missing (a file truncated at its end, e.g. inside the optimizer's storages) we walk the local
headers, taking each storage's size from the pickle: the storages before the cut stay readable.
A record lying at a byte range of a larger file (a DCP chunk in a ``.distcp`` file) is read by
``pt_record.read_record``, by its central directory as torch reads it, with these unpicklers.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from merger.formats.base import RESAVE, Extent, TensorInfo, fail
from merger.units import itemsize

RESAVE_PLAIN = ("re-save it with plain values, e.g. torch.save({'model': model.state_dict(), "
                "'model_args': dict(...), 'iter_num': step}, path), or save model.state_dict() alone")
LEGACY = ("it was saved in torch's legacy format: the legacy (non-zip) format of PyTorch < 1.6, or of "
          "_use_new_zipfile_serialization=False")
LEGACY_HINT = ("convert it once where you trust the file: torch.save(torch.load(old, weights_only=False), new) "
               "with PyTorch >= 1.6")
_TORCH_DTYPES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
                 "int32", "int64", "uint8", "bool", "long", "int")


STORAGE_DTYPES = {  # torch's storage classes (as the pickle names them) -> canonical dtype names
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "ByteStorage": "uint8", "CharStorage": "int8",
    "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64",
    "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _count(x) -> bool:
    """A non-negative int (not a bool, float or anything else a crafted pickle could hold)."""
    return type(x) is int and x >= 0


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    if not (_count(storage_offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(_count(d) for d in size) and all(_count(s) for s in stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"a tensor record with offset {storage_offset!r:.40}, shape {size!r:.80} "
                                     f"and stride {stride!r:.80} (negative, non-integer or mismatched)")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data, *args):
    return data


class StateDictUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; everything else is refused."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        raise fail(self.path, f"holds a non-tensor object ({module}.{name}); merger never unpickles "
                               "arbitrary objects", "save a plain state dict, or convert it to safetensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and _count(pid[4])):
            raise fail(self.path, f"malformed storage record in data.pkl: {pid!r:.80}", RESAVE)
        return StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


class _PlainDict(dict):
    """A dict that accepts attributes (Lightning's ``AttributeDict`` and friends land here)."""


def _rebuild_parameter_with_state(data, requires_grad, hooks, state):
    return data


_PLAIN_GLOBALS = {
    ("torch", "Size"): tuple,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("_codecs", "encode"): codecs.encode,  # bytes, in pickle protocol 2
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("lightning.fabric.utilities.data", "AttributeDict"): _PlainDict,
    ("lightning_fabric.utilities.data", "AttributeDict"): _PlainDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): _PlainDict,
}


class TreeUnpickler(StateDictUnpickler):
    """``torch_zip``'s header unpickler, widened to the plain values a training checkpoint holds."""

    def find_class(self, module, name):
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_DTYPES:
            return f"torch.{name}"  # a dtype in a config: kept as its name
        if module == "torch" and name == "device":
            return lambda *a: ":".join(map(str, a))
        if module in ("collections", "torch", "torch._utils"):
            try:
                return super().find_class(module, name)
            except Exception:  # noqa: BLE001 - refused below with our own words
                pass
        raise fail(self.path, f"its pickle needs the class or function {module}.{name}; merger reads only "
                              "tensors and plain Python values (it imports no class and runs no code)",
                   RESAVE_PLAIN)


@dataclass
class Header:
    """A checkpoint's pickle tree and the byte offset of each storage's data in the file."""

    path: str
    tree: object
    offsets: dict[str, int]  # storage key -> offset of its first byte in the file
    size: int  # file size
    complete: bool  # the central directory was there (False: walked the local headers of a cut file)
    sizes: dict[str, int] | None = None  # storage key -> bytes of its zip member (None: walked, unknown)


def storages(tree) -> dict[str, int]:
    """Every storage the tree refers to: key -> bytes."""
    out: dict[str, int] = {}
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, TensorRef) and isinstance(x.storage, StorageRef):
            out[x.storage.key] = x.storage.numel * itemsize(x.storage.dtype)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
    return out


def unpickle(data: bytes, path, unpickler: type = None) -> tuple[object, int]:
    """The tree, and how many bytes of ``data`` the pickle used."""
    buf = io.BytesIO(data)
    try:
        tree = (unpickler or TreeUnpickler)(buf, path).load()
    except pickle.UnpicklingError as e:
        raise fail(path, f"corrupt pickle in data.pkl ({e})", RESAVE) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError,
            RecursionError) as e:  # what a corrupt or crafted pickle makes the unpickler raise
        raise fail(path, f"corrupt pickle in data.pkl ({type(e).__name__}: {e})", RESAVE) from None
    return tree, buf.tell()


def _local(f, at: int, path) -> tuple[str, int, int, int]:
    """Local file header at ``at``: (name, flags, data start, compressed size in the header)."""
    f.seek(at)
    h = f.read(30)
    if len(h) < 30 or h[:4] != b"PK\x03\x04":
        raise fail(path, "corrupt zip entry", RESAVE)
    flags, method = struct.unpack("<HH", h[6:10])
    csize, n_name, n_extra = struct.unpack("<I4xHH", h[18:30])
    name = f.read(n_name).decode("utf-8", "replace")
    if method != 0:
        raise fail(path, f"zip member {name} is compressed", RESAVE)
    return name, flags, at + 30 + n_name + n_extra, csize


def _skip_descriptor(f, at: int, nbytes: int) -> int:
    """The offset after the data descriptor that follows data ending at ``at``."""
    f.seek(at)
    d = f.read(24)
    off = 4 if d[:4] == b"PK\x07\x08" else 0
    if len(d) >= off + 12 and struct.unpack("<I", d[off + 4: off + 8])[0] == nbytes:
        return at + off + 12
    return at + off + 20  # zip64: 8-byte sizes


def _walk(f, size: int, path, unpickler: type) -> tuple[object, dict[str, int]]:
    """Storage offsets of a zip without its central directory, from the local headers."""
    name, flags, start, csize = _local(f, 0, path)
    if not name.endswith("data.pkl"):
        raise fail(path, "zip file does not start with data.pkl: not a torch checkpoint", RESAVE)
    prefix = name[: -len("data.pkl")]
    n = 1 << 20
    while True:
        f.seek(start)
        data = f.read(n)
        try:
            tree, used = unpickle(data, path, unpickler)
            break
        except Exception:
            if len(data) < n or n >= MAX_PICKLE:
                raise
            n *= 4
    sizes = storages(tree)
    offsets: dict[str, int] = {}
    at = _skip_descriptor(f, start + used, used) if flags & 8 else start + csize
    while at + 30 <= size:
        f.seek(at)
        if f.read(4) != b"PK\x03\x04":
            break
        name, flags, start, csize = _local(f, at, path)
        if name == prefix + "byteorder":
            f.seek(start)
            check_byteorder(f.read(16), path)  # the record may be followed by its data descriptor
        key = name[len(prefix) + 5:] if name.startswith(prefix + "data/") else None
        if key in sizes:
            nbytes = sizes[key]
            offsets[key] = start
        elif flags & 8 and csize == 0:  # a small record of unknown size: find its descriptor
            f.seek(start)
            tail = f.read(1 << 16)
            i = tail.find(b"PK\x07\x08")
            while i >= 0 and (len(tail) < i + 12 or struct.unpack("<I", tail[i + 8: i + 12])[0] != i):
                i = tail.find(b"PK\x07\x08", i + 1)
            if i < 0:
                break
            nbytes = i
        else:
            nbytes = csize
        at = start + nbytes
        if flags & 8:
            at = _skip_descriptor(f, at, nbytes)
    return tree, offsets


MAX_PICKLE = 256 << 20  # bytes of data.pkl: a state dict's names and records, even for optimizer state


def check_byteorder(record: bytes, path) -> None:
    """torch writes ``byteorder`` = ``little`` or ``big``; merger reads little-endian bytes only."""
    if not record.startswith(b"little"):
        raise fail(path, f"was saved with byte order {record[:8]!r} (a big-endian machine?); merger "
                         "reads little-endian checkpoints only", "load and re-save it with torch.save on a "
                                                                 "little-endian machine (x86, ARM)")


def read_header(path: str | Path, *, unpickler: type | None = None) -> Header:
    """The pickle tree of a ``torch.save`` file and where its storages lie.

    ``unpickler``: the restricted unpickler (default :class:`TreeUnpickler`; a ``pytorch_model.bin``
    uses the narrower :class:`StateDictUnpickler`).

    Raises:
        CheckpointFormatError: the legacy format, not a torch zip, duplicate member names, a
            big-endian file, a compressed or oversized data.pkl, a pickle that needs a class, a
            corrupt pickle.
    """
    unpickler = unpickler or TreeUnpickler
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic[:1] == b"\x80":
            raise fail(path, LEGACY, LEGACY_HINT)
        if magic != b"PK\x03\x04":
            raise fail(path, "is not a torch zip checkpoint (not a zip file: truncated, corrupt, or garbage)",
                       "give a file written by torch.save (PyTorch >= 1.6), or convert it to safetensors")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError):
            tree, offsets = _walk(f, size, path, unpickler)  # cut short: no central directory
            return Header(str(path), tree, offsets, size, complete=False)
        with zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkls) != 1:
                raise fail(path, "zip file has no single data.pkl: not a torch checkpoint", RESAVE)
            prefix = pkls[0].filename[: -len("data.pkl")]
            names = [i.filename for i in zf.infolist()]
            if len(names) != len(set(names)):
                dup = next(n for n in names if names.count(n) > 1)
                raise fail(path, f"holds the zip member {dup!r} twice: which one a reader takes is undefined",
                           "re-save it with torch.save")
            pkl = pkls[0]
            if pkl.compress_type != zipfile.ZIP_STORED or pkl.file_size > MAX_PICKLE:
                raise fail(path, f"data.pkl is {'compressed' if pkl.compress_type else 'larger than 256 MB'} "
                                 f"({pkl.file_size} bytes): torch.save writes neither", "re-save it with torch.save")
            if prefix + "byteorder" in zf.NameToInfo:
                check_byteorder(zf.read(prefix + "byteorder")[:16], path)
            tree, _ = unpickle(zf.read(pkl), path, unpickler)
            offsets, sizes = {}, {}
            for key in storages(tree):
                info = zf.NameToInfo.get(f"{prefix}data/{key}")
                if info is not None:
                    offsets[key] = _local(f, info.header_offset, path)[2]
                    sizes[key] = info.file_size
    return Header(str(path), tree, offsets, size, complete=True, sizes=sizes)


def plain(x) -> bool:
    """Whether ``x`` holds no tensor (only plain Python values)."""
    if isinstance(x, TensorRef):
        return False
    if isinstance(x, dict):
        return all(plain(v) for v in x.values())
    if isinstance(x, (list, tuple, set, frozenset)):
        return all(plain(v) for v in x)
    return True


def to_plain(x):
    """``x`` with its dict subclasses turned into dicts (for re-saving with ``weights_only`` loads)."""
    if isinstance(x, OrderedDict):
        return OrderedDict((k, to_plain(v)) for k, v in x.items())
    if isinstance(x, dict):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [to_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(to_plain(v) for v in x)
    return x


# -- tensors as byte extents ---------------------------------------------------------------------
MAX_RUNS = 1 << 16  # extents per tensor before a strided view is refused (each is one pread)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape`` (size-1 dims count as 1)."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def signature(t: TensorRef) -> tuple:
    """What makes two entries the same tensor (a tied weight): storage, offset, shape, stride, dtype."""
    return (t.storage.key, t.storage_offset, t.shape, t.stride, t.storage.dtype)


def _runs(t: TensorRef) -> list[tuple[int, int, int]]:
    """(element offset in the storage, element start in the tensor, elements) per contiguous run."""
    numel = math.prod(t.shape)
    if numel == 0:
        return []
    dims = [(n, s) for n, s in zip(t.shape, t.stride) if n != 1]
    run, inner = 1, len(dims)
    while inner > 0 and dims[inner - 1][1] == run:  # the C-contiguous innermost dims
        run *= dims[inner - 1][0]
        inner -= 1
    outer = dims[:inner]
    offsets = [t.storage_offset]
    for n, s in outer:
        offsets = [o + i * s for o in offsets for i in range(n)] if len(offsets) * n <= MAX_RUNS else []
        if not offsets:
            break
    return [(o, i * run, run) for i, o in enumerate(offsets)] if offsets else []


def tensor_extents(header: Header, sd: dict, names: list[str], path) -> dict[str, TensorInfo]:
    """The entries ``names`` of state dict ``sd`` (a subtree of ``header.tree``) as byte extents:
    views read where they lie, one extent per contiguous run; entries that are the same view
    (tied) share extents; anything else that overlaps in one storage is refused.

    Raises:
        CheckpointFormatError: a tensor whose bytes the file lacks (truncated), a view that can't be
            read in contiguous runs, a tensor past the end of its storage, overlapping tensors.
    """
    out: dict[str, TensorInfo] = {}
    used: dict[str, list[tuple[int, int, str]]] = {}  # storage key -> (first byte, end, tensor)
    for name in names:
        t = sd[name]
        if not isinstance(t.storage, StorageRef):
            raise fail(path, f"tensor {name!r} has no storage record (corrupt data.pkl)", "re-save the checkpoint")
        size = itemsize(t.storage.dtype)
        runs = _runs(t)
        if math.prod(t.shape) and not runs:
            raise fail(path, f"tensor {name!r} is a strided view (shape {list(t.shape)}, stride {list(t.stride)}) "
                          "that can't be read in contiguous runs", "save contiguous tensors: "
                          "{k: v.contiguous() for k, v in model.state_dict().items()}")
        base = header.offsets.get(t.storage.key)
        end = max((o + n for o, _, n in runs), default=t.storage_offset) * size
        if base is None or base + end > header.size:
            raise fail(path, f"truncated: the bytes of model tensor {name!r} are missing "
                          f"(storage data/{t.storage.key})", "the file is cut short: copy or save it again")
        if end > t.storage.numel * size:
            raise fail(path, f"tensor {name!r} reaches past the end of its storage", "re-save the checkpoint")
        held = (header.sizes or {}).get(t.storage.key)
        if held is not None and held != t.storage.numel * size:  # torch.load refuses such a file too
            raise fail(path, f"storage data/{t.storage.key} of tensor {name!r} holds {held} bytes, its record "
                             f"says {t.storage.numel * size}", "the file is corrupt: re-save the checkpoint")
        lo = min((o for o, _, _ in runs), default=t.storage_offset) * size
        for a, b, other in used.get(t.storage.key, []):
            if lo < b and a < end and signature(sd[other]) != signature(t):
                raise fail(path, f"tensors {other!r} and {name!r} overlap in one storage without being the same "
                              "view", "save separate tensors: {k: v.clone() for k, v in sd.items()}")
        used.setdefault(t.storage.key, []).append((lo, end, name))
        out[name] = TensorInfo(name, t.storage.dtype, tuple(t.shape),
                               tuple(Extent(str(path), base + o * size, s * size, n * size) for o, s, n in runs))
    return out
