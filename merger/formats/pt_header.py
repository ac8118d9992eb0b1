"""The header of a ``torch.save`` training checkpoint: its pickle, read without building an object,
and where each storage's bytes lie in the zip, even when the file is cut short.

A training checkpoint (nanoGPT's ``ckpt.pt``, Lightning's ``.ckpt``, ...) is a zip whose
``data.pkl`` holds a tree of plain containers (dicts, lists, numbers, strings) whose leaves name
storages ``data/<key>``. We unpickle it with :class:`TreeUnpickler`, a generalisation of
``torch_zip``'s header unpickler: the torch globals become the same inert records
(``torch_zip._TensorRef`` / ``_StorageRef``), a short list of plain types is allowed, and every
other global is refused: no class is imported and no code runs.

Storage offsets come from the zip's central directory. torch writes its members with data
descriptors (sizes after the data, not in the local headers), so when the central directory is
missing (a file truncated at its end, e.g. inside the optimizer's storages) we walk the local
headers, taking each storage's size from the pickle: the storages before the cut stay readable.
"""

from __future__ import annotations

import codecs
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from merger.formats.base import RESAVE, fail
from merger.formats.torch_zip import _HeaderUnpickler, _StorageRef, _TensorRef
from merger.units import itemsize

RESAVE_PLAIN = ("re-save it with plain values, e.g. torch.save({'model': model.state_dict(), "
                "'model_args': dict(...), 'iter_num': step}, path), or save model.state_dict() alone")
LEGACY = ("it was saved in torch's legacy (non-zip) format (PyTorch < 1.6, or "
          "_use_new_zipfile_serialization=False)")
LEGACY_HINT = ("convert it once where you trust the file: torch.save(torch.load(old, weights_only=False), new) "
               "with PyTorch >= 1.6")
_TORCH_DTYPES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
                 "int32", "int64", "uint8", "bool", "long", "int")


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


class TreeUnpickler(_HeaderUnpickler):
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


def storages(tree) -> dict[str, int]:
    """Every storage the tree refers to: key -> bytes."""
    out: dict[str, int] = {}
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, _TensorRef) and isinstance(x.storage, _StorageRef):
            out[x.storage.key] = x.storage.numel * itemsize(x.storage.dtype)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
    return out


def _unpickle(data: bytes, path) -> tuple[object, int]:
    """The tree, and how many bytes of ``data`` the pickle used."""
    buf = io.BytesIO(data)
    try:
        tree = TreeUnpickler(buf, path).load()
    except pickle.UnpicklingError as e:
        raise fail(path, f"corrupt pickle in data.pkl ({e})", RESAVE) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
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


def _walk(f, size: int, path) -> tuple[object, dict[str, int]]:
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
            tree, used = _unpickle(data, path)
            break
        except Exception:
            if len(data) < n or n >= 1 << 30:
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


def read_header(path: str | Path) -> Header:
    """The pickle tree of a ``torch.save`` file and where its storages lie.

    Raises:
        CheckpointFormatError: the legacy format, not a torch zip, a pickle that needs a class,
            a corrupt pickle.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic[:1] == b"\x80":
            raise fail(path, LEGACY, LEGACY_HINT)
        if magic != b"PK\x03\x04":
            raise fail(path, "is not a torch checkpoint (not a zip file)",
                       "give a file written by torch.save (PyTorch >= 1.6)")
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError):
            tree, offsets = _walk(f, size, path)  # cut short: no central directory
            return Header(str(path), tree, offsets, size, complete=False)
        with zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
            if len(pkls) != 1:
                raise fail(path, "zip file has no single data.pkl: not a torch checkpoint", RESAVE)
            prefix = pkls[0].filename[: -len("data.pkl")]
            tree, _ = _unpickle(zf.read(pkls[0]), path)
            offsets = {}
            for key in storages(tree):
                info = zf.NameToInfo.get(f"{prefix}data/{key}")
                if info is not None:
                    offsets[key] = _local(f, info.header_offset, path)[2]
    return Header(str(path), tree, offsets, size, complete=True)


def plain(x) -> bool:
    """Whether ``x`` holds no tensor (only plain Python values)."""
    if isinstance(x, _TensorRef):
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
