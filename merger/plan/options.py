"""What a merge is asked to do: :class:`Options` (CLI flags map 1:1), and the dtypes every stage agrees on.
The sizes that shape the loops (the kernel's ``chunk``, block bounds, ...) are in ``merger.units.SIZES``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from merger.plan.methods import Method
from merger.units import SIZES

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Options:
    """How to merge; one object instead of a long signature (CLI flags map 1:1)."""

    method: Method = Method()
    dtype: str | None = None  # output dtype of floating tensors; None: the inputs'
    accumulate: str = "auto"  # float32 for 16-bit tensors, float64 for 32-bit ones
    max_memory: int | None = None  # bytes; None: derived from the machine
    max_shard_size: int = 5 * 10**9
    device: str = "auto"
    allow_nonfinite: bool = False
    strict: bool = False
    hash_inputs: bool = False  # sha256 of local inputs (Hub files carry theirs for free)
    keep: bool = True  # keep downloaded revisions in the HF cache (False: --no-keep)
    resume: bool = False  # continue an interrupted run's verified shards (--resume); see engine/resume.py
    key: str | None = None  # where the model lies in a training checkpoint (--key); None: found by the format
    to: str | None = None  # output format (--to, a name in output.convert.OUTPUTS); None: the input's own


def acc_dtype(accumulate: str, itemsize: int, out_itemsize: int) -> str:
    """``float32`` or ``float64``: ``auto`` is float32 for 16-bit tensors, float64 where the input
    or the output is 32-bit or wider (float32 sums of float32 values can't be within an ulp)."""
    if accumulate != "auto":
        return accumulate
    return "float64" if max(itemsize, out_itemsize) >= 4 else "float32"


def default_max_memory() -> int:
    """A quarter of physical memory, at most 8 GB: the budget when ``--max-memory`` isn't given."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 10**9
    return max(SIZES.min_block * 4, min(total // 4, 8 * 10**9))


