"""Byte sizes and dtypes as users type them: ``4GB``, ``512MiB``, ``fp16``, ``bfloat16``."""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from merger.errors import UsageError

if TYPE_CHECKING:
    import torch

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}


def parse_size(text: str | int, *, option: str = "size") -> int:
    """Parse ``"5GB"``, ``"512MiB"``, ``"1.5G"`` or a plain byte count into bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(
            f"{option}: can't read {text!r} as a size",
            hint="write a number with an optional unit, e.g. 4GB, 512MiB, 1.5G or 1000000",
        )
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise UsageError(f"{option}: {text!r} must be larger than zero")
    return value


def format_size(n: float) -> str:
    """``1536000000`` -> ``"1.54 GB"`` (decimal units, as the Hub and disks count)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# canonical dtype name -> (bytes per element, safetensors' name): the full set safetensors can store
_DTYPE_TABLE: dict[str, tuple[int, str]] = {
    "float64": (8, "F64"), "float32": (4, "F32"), "float16": (2, "F16"), "bfloat16": (2, "BF16"),
    "int64": (8, "I64"), "int32": (4, "I32"), "int16": (2, "I16"), "int8": (1, "I8"),
    "uint8": (1, "U8"), "bool": (1, "BOOL"),
    "float8_e4m3fn": (1, "F8_E4M3"), "float8_e5m2": (1, "F8_E5M2"),
    "uint16": (2, "U16"), "uint32": (4, "U32"), "uint64": (8, "U64"),
}
ST_NAMES: dict[str, str] = {name: st for name, (_, st) in _DTYPE_TABLE.items()}  # "float16" -> "F16"
ST_DTYPES: dict[str, str] = {st: name for name, st in ST_NAMES.items()}  # "F16" -> "float16"

# floating dtypes as users type them -> canonical name
DTYPES: dict[str, str] = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "f64": "float64", "double": "float64",
}


def parse_dtype(text: str, *, option: str = "--dtype", allowed: tuple[str, ...] = ()) -> str:
    """Parse a floating dtype name (``fp16``, ``bfloat16``, ``float32`` ...) into its canonical name."""
    name = DTYPES.get(str(text).lower().removeprefix("torch."))
    if name is None or (allowed and name not in allowed):
        names = allowed or ("float32", "float16", "bfloat16", "float64")
        raise UsageError(f"{option}: unknown dtype {text!r}", hint=f"use one of {', '.join(names)}")
    return name


def dtype_name(dt) -> str:
    """``torch.float16`` (or ``"float16"``, ``"torch.float16"``) -> ``"float16"``; needs no torch."""
    return str(dt).removeprefix("torch.")


def itemsize(name: str) -> int:
    """Bytes per element of a canonical dtype name: ``"bfloat16"`` -> 2."""
    return _DTYPE_TABLE[name][0]


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (inverse of :func:`dtype_name`); imports torch."""
    import torch

    return getattr(torch, name)


def parse_limit(value: float | int | None, *, option: str = "--limit") -> int | float | None:
    """``--limit`` as lm-eval takes it: N documents (an int, N >= 1) or a fraction of them (0 < x < 1).

    Raises:
        UsageError: zero, negative, NaN, infinite, or a count that is not a whole number.
    """
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise UsageError(f"{option} {value}: must be a number of documents (1, 2, ...) or a fraction in (0, 1)",
                         hint=f"e.g. {option} 200 or {option} 0.1")
    if v >= 1:
        if not v.is_integer():
            raise UsageError(f"{option} {value}: a count of documents must be a whole number",
                             hint=f"e.g. {option} {int(v)}, or a fraction below 1")
        return int(v)
    return v


def apply_limit(total: int, limit: int | float | None) -> int:
    """How many of ``total`` items a :func:`parse_limit` value keeps (a fraction rounds up, as lm-eval)."""
    if limit is None:
        return total
    return min(total, int(limit) if limit >= 1 else math.ceil(total * limit))


# -- the sizes that shape merger's loops -----------------------------------------------------------

@dataclass
class Sizes:
    """Every size that shapes a loop, set in this one place.

    Code reads them when it runs (``SIZES.chunk``), never copies them at import, so a test can make
    each one small and make every loop run more than once on small tensors (``sizes(...)``, or
    ``MERGER_SIZES=small`` for a whole process and its children, e.g. torchrun's ranks). Only
    ``chunk`` changes output bits (it is the unit of "identical in every input"); the others change
    how bytes move, never what they are. Multiples are kept as multiples: a stream piece, a native
    call's unit and a block's element range are whole chunks.
    """

    chunk: int = 1 << 18  # elements: the kernel's cache chunk, the unit of "identical in every input"
    piece_chunks: int = 64  # stream: chunks read per pread (PIECE, 16.8M elements)
    unit_chunks: int = 4  # native pipeline: chunks per native call (balances two threads in a block)
    min_block: int = 64 << 20  # bytes of working set below which the per-block overhead dominates
    max_block_cpu: int = 512 << 20  # bytes of working set per block on CPU (plan/blocks.block_budget)
    max_block_cuda: int = 2 << 30
    part_bytes: int = 256 << 20  # ranked: output bytes per part of a single-file output
    read_piece: int = 4 << 20  # bytes per pread of an extent
    stage: int = 8 << 20  # bytes per O_DIRECT write of a shard (a multiple of 4096)
    copy_piece: int = 64 << 20  # bytes copied at a time into a converted .pt output
    cache_bytes: int = 4 << 20  # native kernel: every input's share of one sub-chunk fits this
    min_sub: int = 1024  # native kernel: elements per sub-chunk at least
    record_head: int = 4096  # bytes read at a torch.save record's start (data.pkl, local headers)
    record_tail: int = 1024  # bytes read at its end (central directory, end records)
    ahead: int = 1  # stream: revisions downloaded ahead of the one being folded

    @property
    def piece(self) -> int:
        return self.piece_chunks * self.chunk

    @property
    def unit(self) -> int:
        return self.unit_chunks * self.chunk

    def spec(self) -> str:
        """``name=value,...`` of the fields that differ from the defaults (``MERGER_SIZES``'s form)."""
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                        if getattr(self, f.name) != f.default)


# Small enough that the test tensors (thousands of elements) cross every one, at sizes that are not
# powers of two where the code allows it, so that no boundary falls where another does.
SMALL = dict(chunk=1024, piece_chunks=3, unit_chunks=2, min_block=4096, max_block_cpu=48 << 10,
             max_block_cuda=48 << 10, part_bytes=20_000, read_piece=3000, stage=8192, copy_piece=5000,
             cache_bytes=4096, min_sub=64, record_head=512, record_tail=128)

SIZES = Sizes()


def _parse_sizes(text: str) -> dict[str, int]:
    if text.strip() == "small":
        return dict(SMALL)
    known = {f.name for f in fields(Sizes)}
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, _, value = item.partition("=")
        if name not in known or not value.strip().isdigit() or int(value) <= 0:
            raise UsageError(f"MERGER_SIZES: can't read {item!r}",
                             hint=f"'small', or name=value,... with names from {', '.join(sorted(known))}")
        out[name] = int(value)
    return out


def set_sizes(**values: int) -> None:
    """Set sizes for this process and the processes it starts (``MERGER_SIZES``); no names: defaults."""
    for f in fields(Sizes):
        setattr(SIZES, f.name, values.get(f.name, f.default))
    if SIZES.stage % 4096 or SIZES.min_sub > SIZES.chunk:
        raise UsageError(f"MERGER_SIZES: stage must be a multiple of 4096 and min_sub at most chunk ({SIZES})")
    spec = SIZES.spec()
    if spec:
        os.environ["MERGER_SIZES"] = spec
    else:
        os.environ.pop("MERGER_SIZES", None)


@contextmanager
def sizes(**values: int):
    """``with sizes(**SMALL):`` ... : the sizes for a block of code (tests), then the previous ones."""
    before = {f.name: getattr(SIZES, f.name) for f in fields(Sizes)}
    set_sizes(**{**before, **values})
    try:
        yield SIZES
    finally:
        set_sizes(**before)


if os.environ.get("MERGER_SIZES"):
    set_sizes(**_parse_sizes(os.environ["MERGER_SIZES"]))
