"""The header of a ``torch.save`` file (a training checkpoint, a ``pytorch_model.bin``): its
pickle, read without building an object, and where each storage's bytes lie in the zip, even when
the file is cut short; and its tensors as byte extents.

A training checkpoint (nanoGPT's ``ckpt.pt``, Lightning's ``.ckpt``, ...) is a zip whose
``data.pkl`` holds a tree of plain containers (dicts, lists, numbers, strings) whose leaves name
storages ``data/<key>``. It is unpickled by ``pt_record``'s restricted unpicklers
(:class:`TreeUnpickler`; :class:`StateDictUnpickler` for a ``pytorch_model.bin``): the torch
globals become inert records (:class:`TensorRef` / :class:`StorageRef`), a short list of plain
types is allowed, and every other global is refused: no class is imported and no code runs.

A complete file is read by ``pt_record.read_record`` over the whole file, the one way merger finds
a torch zip's members, the way torch (miniz) finds them: by the central directory, names ignoring
ASCII case, the small records checked as torch checks them (a DCP chunk is read by the same
reader at its byte range). torch writes its members with data descriptors (sizes after the data,
not in the local headers), so when the file has no zip end record (truncated at its end, e.g.
inside the optimizer's storages; torch.load refuses it) we walk the local headers, taking each
storage's size from the pickle: the storages before the cut stay readable.
"""

from __future__ import annotations

import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from merger.formats.base import RESAVE, Extent, TensorInfo, fail
from merger.formats.pt_pickle import TorchDevice, TorchDType, walk
from merger.formats.pt_record import (MAX_PICKLE, STORAGE_DTYPES, NoEndRecord, StateDictUnpickler, StorageRef,
                                      TensorRef, TreeUnpickler, check_byteorder, read_record, storages, unpickle)
from merger.units import itemsize

__all__ = ["STORAGE_DTYPES", "Header", "StateDictUnpickler", "StorageRef", "TensorRef", "TreeUnpickler",
           "contiguous_strides", "is_contiguous", "plain", "read_header", "signature", "tensor_extents",
           "to_plain"]

LEGACY = ("it was saved in torch's legacy format: the legacy (non-zip) format of PyTorch < 1.6, or of "
          "_use_new_zipfile_serialization=False")
LEGACY_HINT = ("convert it once where you trust the file: torch.save(torch.load(old, weights_only=False), new) "
               "with PyTorch >= 1.6")
@dataclass
class Header:
    """A checkpoint's pickle tree and the byte offset of each storage's data in the file."""

    path: str
    tree: object
    offsets: dict[str, int]  # storage key -> offset of its first byte in the file
    size: int  # file size
    complete: bool  # the central directory was there (False: walked the local headers of a cut file)
    sizes: dict[str, int] | None = None  # storage key -> bytes of its zip member (None: walked, unknown)


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


def read_header(path: str | Path, *, unpickler: type | None = None) -> Header:
    """The pickle tree of a ``torch.save`` file and where its storages lie.

    ``unpickler``: the restricted unpickler (default :class:`TreeUnpickler`; a ``pytorch_model.bin``
    uses the narrower :class:`StateDictUnpickler`).

    Returns:
        A :class:`Header`: ``complete`` when the file has its zip end record (read by
        ``pt_record.read_record``), else the storages its local headers reach before the cut.

    Raises:
        CheckpointFormatError: the legacy format, not a torch zip, anything ``read_record``
            refuses in a file with an end record (duplicate or compressed members, names equal
            ignoring case, a big-endian file, an oversized data.pkl, no version record, ...), a
            pickle that needs a class, a corrupt pickle.
    """
    unpickler = unpickler or TreeUnpickler
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if magic[:1] == b"\x80":
            raise fail(path, LEGACY, LEGACY_HINT)
        if magic != b"PK\x03\x04":
            raise fail(path, "is not a torch zip checkpoint (not a zip file: truncated, corrupt, or garbage)",
                       "give a file written by torch.save (PyTorch >= 1.6), or convert it to safetensors")
        try:
            tree, offsets, sizes = read_record(f.fileno(), 0, size, path, what="the file", unpickler=unpickler)
        except NoEndRecord:  # cut short: no central directory; any other refusal stands
            tree, offsets = _walk(f, size, path, unpickler)
            return Header(str(path), tree, offsets, size, complete=False)
    return Header(str(path), tree, offsets, size, complete=True, sizes=sizes)


def plain(x) -> bool:
    """Whether ``x`` holds no tensor or storage (only plain Python values)."""
    return not any(isinstance(v, (TensorRef, StorageRef)) for v in walk(x))


def to_plain(x):
    """``x`` with its dict subclasses turned into dicts and torch's dtypes and devices back into
    ``torch.dtype`` / ``torch.device`` (for re-saving with ``weights_only`` loads): the same values,
    of the same types, as ``torch.load`` reads; a subtree shared in ``x`` is shared in the copy."""
    done: dict[int, object] = {}

    def copy(v):
        if id(v) in done:
            return done[id(v)]
        if isinstance(v, TorchDType):
            import torch  # only for a checkpoint that carries one: the output that saves it has torch

            out = getattr(torch, v.removeprefix("torch."))
        elif isinstance(v, TorchDevice):
            import torch

            out = torch.device(str(v))
        elif isinstance(v, dict):
            out = OrderedDict() if isinstance(v, OrderedDict) else {}
            done[id(v)] = out
            out.update((copy(k), copy(w)) for k, w in v.items())
            return out
        elif isinstance(v, list):
            out = []
            done[id(v)] = out
            out.extend(copy(w) for w in v)
            return out
        elif isinstance(v, (tuple, set, frozenset)):
            out = type(v)(copy(w) for w in v)
        else:
            return v
        done[id(v)] = out
        return out

    return copy(x)


# -- tensors as byte extents ---------------------------------------------------------------------
MAX_RUNS = 1 << 16  # extents per tensor before a strided view is refused (each is one pread)


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides of a C-contiguous tensor of ``shape`` (size-1 dims count as 1)."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C-contiguous as torch's ``is_contiguous()`` decides it: a size-1 dim's stride is never used
    (``x[i:i+1]`` and a column's transpose keep other strides there)."""
    return all(n == 1 or s == c for n, s, c in zip(shape, stride, contiguous_strides(shape)))


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
        if t.view:
            raise fail(path, f"tensor {name!r} is a {'negative' if t.view == 'neg' else 'conjugate'} view (torch "
                             "reads its stored values negated or conjugated); merger reads stored bytes only",
                       "save resolved tensors: {k: v.resolve_neg().resolve_conj() for k, v in sd.items()}")
        if any(n > 1 and s == 0 for n, s in zip(t.shape, t.stride)) or math.prod(t.shape) > t.storage.numel:
            raise fail(path, f"tensor {name!r} is an expanded view (shape {list(t.shape)}, stride {list(t.stride)}"
                             f"): its {math.prod(t.shape)} elements repeat {t.storage.numel} stored ones",
                       "save real tensors: {k: v.contiguous() for k, v in sd.items()}")
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
