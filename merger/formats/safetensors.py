"""safetensors files: an 8-byte little-endian header length, a JSON header, then raw data.

The header is read and validated against the file's size; each tensor is one extent.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from merger.formats.base import RESAVE as _RESAVE
from merger.formats.base import TensorInfo
from merger.formats.base import fail as _fail
from merger.units import ST_DTYPES, itemsize

MAX_HEADER = 100_000_000  # safetensors refuses larger headers too


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
        out[name] = TensorInfo.contiguous(name, dt, shape, str(path), base + start)
    if base + end_max > size:
        raise _fail(path, f"truncated: the header needs {base + end_max} bytes but the file has {size}", _RESAVE)
    return out


