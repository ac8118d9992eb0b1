"""safetensors files: an 8-byte little-endian header length, a JSON header, then raw data.

The header is read and validated as the safetensors library validates it (see
:func:`read_safetensors`); each tensor is one extent.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from merger.formats.base import RESAVE as _RESAVE
from merger.formats.base import TensorInfo
from merger.formats.base import fail as _fail
from merger.formats.inputs import open_input
from merger.units import ST_DTYPES, itemsize

MAX_HEADER = 100_000_000  # safetensors refuses larger headers too


def _strict_json(raw: bytes):
    """The header as the safetensors library parses it: UTF-8, no NaN/Infinity literals, no
    duplicate keys (the library keeps the last of two; merger refuses the ambiguity)."""

    def pairs(items):
        d = {}
        for k, v in items:
            if k in d:
                raise ValueError(f"the name {k!r:.80} appears twice")
            d[k] = v
        return d

    def no_constant(c):
        raise ValueError(f"{c} is not a number safetensors allows")

    return json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=no_constant)


def _uint(x) -> bool:
    return type(x) is int and 0 <= x < 1 << 64  # bool is not an int here, nor 1.0


def _entry(path, name: str, e) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry, checked as the library checks it."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise _fail(path, f"corrupt safetensors header: the entry of tensor {name!r:.80} needs dtype, shape "
                          "and data_offsets", _RESAVE)
    shape, offs = e["shape"], e["data_offsets"]
    if not isinstance(shape, list) or not all(_uint(d) for d in shape):
        raise _fail(path, f"corrupt safetensors header: tensor {name!r:.80} has shape {shape!r:.80}, not a list "
                          "of non-negative integers", _RESAVE)
    if not isinstance(offs, list) or len(offs) != 2 or not all(_uint(x) for x in offs):
        raise _fail(path, f"corrupt safetensors header: tensor {name!r:.80} has data_offsets {offs!r:.80}, not "
                          "two non-negative integers", _RESAVE)
    dt = ST_DTYPES.get(e["dtype"]) if isinstance(e["dtype"], str) else None
    if dt is None:
        raise _fail(path, f"tensor {name!r:.80} has dtype {e['dtype']!r:.40}, which merger doesn't know",
                    f"supported: {', '.join(ST_DTYPES)}")
    return dt, tuple(shape), offs[0], offs[1]


def read_safetensors(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor layout of a ``.safetensors`` file (see :func:`read_safetensors_header`)."""
    return read_safetensors_header(path)[0]


def read_safetensors_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor layout of a ``.safetensors`` file and its ``__metadata__``, validated as strictly as
    the safetensors library validates them: a UTF-8 JSON object of at most ``MAX_HEADER`` bytes;
    ``__metadata__`` a map of strings; each tensor a known dtype, a shape of non-negative integers
    whose byte size fits 64 bits and equals its ``data_offsets`` span; the spans tiling the data
    section exactly (no gap, no overlap or alias, no trailing bytes); and no name twice.

    Raises:
        CheckpointFormatError: truncated file, corrupt header, unknown dtype, bad offsets.
    """
    path = Path(path)
    fd = open_input(path, what="weights file")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _fail(path, f"truncated safetensors file ({size} bytes, no header)", _RESAVE)
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _fail(path, f"corrupt or truncated safetensors header (says {n} bytes, file has {size})", _RESAVE)
        raw = f.read(n)
    try:
        header = _strict_json(raw)
    except UnicodeDecodeError:
        raise _fail(path, "corrupt safetensors header (not UTF-8)", _RESAVE) from None
    except RecursionError:
        raise _fail(path, "corrupt safetensors header (JSON nested too deeply)", _RESAVE) from None
    except ValueError as e:
        raise _fail(path, f"corrupt safetensors header (not valid JSON: {str(e):.120})", _RESAVE) from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)", _RESAVE)
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _fail(path, "corrupt safetensors header: __metadata__ must map names to strings", _RESAVE)
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        dt, shape, start, end = _entry(path, name, e)
        nbytes = math.prod(shape) * itemsize(dt)
        if nbytes >= 1 << 64:
            raise _fail(path, f"tensor {name!r:.80}: shape {list(shape)!s:.80} is too large ({dt})", _RESAVE)
        if end - start != nbytes:
            raise _fail(path, f"tensor {name!r:.80}: header offsets {start}..{end} don't match shape "
                              f"{list(shape)!s:.80} of {e['dtype']}", _RESAVE)
        spans.append((start, end, name))
        out[name] = TensorInfo.contiguous(name, dt, shape, str(path), base + start)
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            what = "overlaps another tensor's bytes" if start < at else f"leaves bytes {at}..{start} unused"
            raise _fail(path, f"tensor {name!r:.80}: header offsets {start}..{end} {what}", _RESAVE)
        at = end
    if base + at > size:
        raise _fail(path, f"truncated: the header needs {base + at} bytes but the file has {size}", _RESAVE)
    if base + at < size:
        raise _fail(path, f"{size - base - at} bytes after the last tensor that the header doesn't describe "
                          "(safetensors refuses such files too)", _RESAVE)
    return out, meta
