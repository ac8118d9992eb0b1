"""torch's zip checkpoint format (``pytorch_model.bin``, ``torch.save`` files), from headers only.

``*/data.pkl`` is a pickle that only *names* storages ``*/data/<key>``, stored uncompressed in the
zip. We read that pickle with a restricted unpickler that knows a handful of torch globals and
builds no object at all, so a malicious pickle can't run code; the legacy (non-zip) torch format
is refused. Each tensor is one extent inside its storage's zip member.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from merger.errors import CheckpointFormatError
from merger.formats.base import RESAVE as _RESAVE
from merger.formats.base import TensorInfo
from merger.formats.base import fail as _fail
from merger.units import itemsize

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


            obj = _HeaderUnpickler(io.BytesIO(zf.read(pkls[0])), path).load()
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
                out[name] = TensorInfo.contiguous(name, t.storage.dtype, t.shape, str(path), start)
    return out


