"""Checkpoint file formats, read from headers only: where every tensor's bytes lie in which file.

Two formats, one result (:class:`TensorInfo`: dtype, shape, file, byte offset, byte count):
- safetensors: an 8-byte little-endian header length, a JSON header, then raw data.
- ``pytorch_model.bin`` (torch's zip format): ``*/data.pkl`` is a pickle that only *names*
  storages ``*/data/<key>``, stored uncompressed in the zip. We read that pickle with a restricted
  unpickler that knows a handful of torch globals and builds no object at all, so a malicious
  pickle can't run code; the legacy (non-zip) torch format is refused.
Tensors are then read with ``pread`` at their offsets (see ``io.py``); no file is mmapped.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from merger.errors import CheckpointFormatError
from merger.units import ST_DTYPES, itemsize

MAX_HEADER = 100_000_000  # safetensors refuses larger headers too

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: ``nbytes`` bytes at ``offset`` in ``path``, C-contiguous."""

    name: str
    dtype: str  # canonical dtype name, e.g. "float16" (see units.py)
    shape: tuple[int, ...]
    path: str
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _fail(path, what: str, hint: str | None = None) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: {what}", path=str(path), hint=hint)


_RESAVE = "re-download the file, or re-save the checkpoint with save_pretrained(safe_serialization=True)"


def read_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor layout of a ``.safetensors`` file, validated against the file's size.

    Raises:
        CheckpointFormatError: truncated file, corrupt header, unknown dtype, bad offsets.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated safetensors file ({size} bytes, no header)", _RESAVE)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _fail(path, f"corrupt or truncated safetensors header (says {n} bytes, file has {size})", _RESAVE)
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (ValueError, AssertionError, UnicodeDecodeError):
        raise _fail(path, "corrupt safetensors header (not a JSON object)", _RESAVE) from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    end_max = 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = ST_DTYPES.get(e["dtype"])
            shape = tuple(int(d) for d in e["shape"])
            start, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, f"corrupt safetensors header entry for tensor {name!r}", _RESAVE) from None
        if dt is None:
            raise _fail(path, f"tensor {name!r} has dtype {e['dtype']!r:.40}, which merger doesn't know",
                        f"supported: {', '.join(ST_DTYPES)}")
        nbytes = math.prod(shape) * itemsize(dt)
        if end - start != nbytes or start < 0 or any(d < 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: header offsets {start}..{end} don't match shape {list(shape)} "
                              f"of {e['dtype']}", _RESAVE)
        end_max = max(end_max, end)
        out[name] = TensorInfo(name, dt, shape, str(path), base + start, nbytes)
    if base + end_max > size:
        raise _fail(path, f"truncated: the header needs {base + end_max} bytes but the file has {size}", _RESAVE)
    return out


# --- pytorch_model.bin (torch zip format) ------------------------------------------------------

_STORAGE_DTYPES = {  # torch's storage classes (as the pickle names them) -> canonical dtype names
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "ByteStorage": "uint8", "CharStorage": "int8",
    "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64",
    "BoolStorage": "bool",
}


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *args):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *args):
    return data


class _HeaderUnpickler(pickle.Unpickler):
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
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise _fail(self.path, f"holds a non-tensor object ({module}.{name}); merger never unpickles "
                               "arbitrary objects", "save a plain state dict, or convert it to safetensors")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise _fail(self.path, f"unexpected storage record {pid!r:.80}", _RESAVE)
        return _StorageRef(str(pid[2]), pid[1].dtype, int(pid[4]))


def _describe(obj) -> str:
    if isinstance(obj, _TensorRef):
        return "a tensor"
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
        if not isinstance(k, str) or not isinstance(v, _TensorRef):
            raise _fail(path, f"is not a flat state dict of tensors: the entry {k!r:.80} is {_describe(v)}", hint)
        if not isinstance(v.storage, _StorageRef):
            raise _fail(path, f"tensor {k!r} has no storage record (corrupt data.pkl)", _RESAVE)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def read_torch_zip(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor layout of a ``torch.save`` zip file (``pytorch_model.bin``), without loading data.

    Raises:
        CheckpointFormatError: not a zip (legacy format or garbage), compressed members,
            non-tensor pickles, non-contiguous tensors, truncated data.
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise _fail(path, "is not a torch zip checkpoint (truncated, corrupt, or torch's legacy format)",
                    "re-save it with torch.save (PyTorch >= 1.6) or convert it to safetensors") from None
    with zf:
        pkls = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
        if len(pkls) != 1:
            raise _fail(path, "zip file has no single data.pkl: not a torch checkpoint", _RESAVE)
        prefix = pkls[0].filename[: -len("data.pkl")]
        try:
            import io as _io

            obj = _HeaderUnpickler(_io.BytesIO(zf.read(pkls[0])), path).load()
        except CheckpointFormatError:
            raise
        except Exception as e:  # a broken pickle stream: truncated or garbage bytes
            raise _fail(path, f"corrupt pickle in data.pkl ({type(e).__name__}: {e})", _RESAVE) from None
        _check_state_dict(obj, path)
        members = {i.filename: i for i in zf.infolist()}
        out: dict[str, TensorInfo] = {}
        with open(path, "rb") as f:
            for name, t in obj.items():
                info = members.get(f"{prefix}data/{t.storage.key}")
                if info is None:
                    raise _fail(path, f"tensor {name!r}: storage data/{t.storage.key} is missing", _RESAVE)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise _fail(path, f"tensor {name!r}: storage is compressed", _RESAVE)
                f.seek(info.header_offset)
                local = f.read(30)
                if len(local) < 30 or local[:4] != b"PK\x03\x04":
                    raise _fail(path, f"tensor {name!r}: corrupt zip entry", _RESAVE)
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                data_start = info.header_offset + 30 + n_name + n_extra
                size_el = itemsize(t.storage.dtype)
                numel = math.prod(t.shape)
                if numel > 1 and t.stride != _contiguous_strides(t.shape):
                    raise _fail(path, f"tensor {name!r} is not contiguous (stride {t.stride})",
                                "save contiguous tensors, e.g. {k: v.contiguous() for k, v in sd.items()}")
                start = data_start + t.storage_offset * size_el
                nbytes = numel * size_el
                if (t.storage_offset + numel) * size_el > info.file_size or start + nbytes > size:
                    raise _fail(path, f"truncated: tensor {name!r} lies beyond the end of the data", _RESAVE)
                out[name] = TensorInfo(name, t.storage.dtype, t.shape, str(path), start, nbytes)
    return out


def read_weights_file(path: str | Path) -> dict[str, TensorInfo]:
    """Dispatch on the file name: ``*.safetensors`` or a torch zip (``*.bin``, ``*.pt``)."""
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_zip(path)


def weights_files(folder: str | Path) -> tuple[str, list[str]]:
    """The weight files of a checkpoint folder, preferring safetensors: (kind, relative names).

    ``kind`` is the file that defines the layout (an index or a single weights file).

    Raises:
        CheckpointFormatError: no weights in the folder, an unreadable index.
    """
    folder = Path(folder)
    for kind in WEIGHT_FILES:
        p = folder / kind
        if not p.exists():
            continue
        if not kind.endswith(".index.json"):
            return kind, [kind]
        try:
            wmap = json.loads(p.read_text())["weight_map"]
            files = sorted(set(wmap.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _fail(p, "corrupt index file (no weight_map)", _RESAVE) from None
        return kind, files
    raise CheckpointFormatError(
        f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})", path=str(folder),
        hint="point at a Hugging Face checkpoint folder, or a folder of revision subfolders (step1000/ ...)")


def read_folder(folder: str | Path) -> dict[str, TensorInfo]:
    """Tensor layout of a whole checkpoint folder (single file or shards with their index).

    Raises:
        CheckpointFormatError: missing shard, a tensor the index lists but its shard lacks, or any
            file-level problem.
    """
    folder = Path(folder)
    kind, files = weights_files(folder)
    out: dict[str, TensorInfo] = {}
    for fname in files:
        fpath = folder / fname
        if not fpath.exists():
            raise _fail(folder, f"shard {fname} is listed in {kind} but missing",
                        "re-download the checkpoint (a shard is missing)")
        out.update(read_weights_file(fpath))
    if kind.endswith(".index.json"):
        wmap = json.loads((folder / kind).read_text())["weight_map"]
        for name, fname in wmap.items():
            if name not in out or Path(out[name].path).name != Path(fname).name:
                raise _fail(folder, f"{kind} says tensor {name!r} is in {fname}, but it isn't there", _RESAVE)
    return out
