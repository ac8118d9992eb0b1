"""Byte sizes and dtypes as users type them: ``4GB``, ``512MiB``, ``fp16``, ``bfloat16``."""

from __future__ import annotations

import re

import torch

from merger.errors import UsageError

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


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64, "double": torch.float64,
}

# safetensors' dtype names <-> torch dtypes (the full set safetensors can store)
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
for _name, _dt in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                   ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _dt):
        ST_DTYPES[_name] = getattr(torch, _dt)
        ST_NAMES[getattr(torch, _dt)] = _name


def parse_dtype(text: str, *, option: str = "--dtype", allowed: tuple[str, ...] = ()) -> torch.dtype:
    """Parse a floating dtype name (``fp16``, ``bfloat16``, ``float32`` ...)."""
    dt = DTYPES.get(str(text).lower().removeprefix("torch."))
    if dt is None or (allowed and dtype_name(dt) not in allowed):
        names = allowed or ("float32", "float16", "bfloat16", "float64")
        raise UsageError(f"{option}: unknown dtype {text!r}", hint=f"use one of {', '.join(names)}")
    return dt


def dtype_name(dt: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dt).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16`` (inverse of :func:`dtype_name`)."""
    return getattr(torch, name)
