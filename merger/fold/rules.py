"""What every kernel agrees on, without torch: the fold weights, the accumulation dtype, the errors.

Two kernels compute the same bits: the torch one (``torch_kernel.py``: CUDA, ``--hash``, CPUs without
AVX2) and the native one (``native.py`` over ``_fold.c``: the CPU default). Both take their
arithmetic from :class:`FoldRule` and raise the errors built here, as do the stream schedule
and ``merger sweep`` (with their own hints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merger.errors import TensorError
from merger.plan.options import acc_dtype  # the accumulation rule: the plan states it too

__all__ = ["FoldRule", "acc_dtype", "differing_error", "nonfinite_error", "overflow_error"]


@dataclass(frozen=True)
class FoldRule:
    """How weights become per-element operations.

    ``acc = x_1 * w_1``, ``acc = fma(x_i, w_i, acc)``, then ``acc / divide`` or ``acc * scale``.
    Equal weights fold the plain sum (``weights`` all 1) and scale once at the end: an average
    divides by n, which is correctly rounded.
    """

    weights: tuple[float, ...]  # per input, as folded
    divide: int | None  # equal weights that average: divide the sum by n
    scale: float | None  # other equal weights: multiply the sum by this
    copy_identical: bool  # a chunk identical in every input is copied (only when the weights sum to 1)

    @classmethod
    def of(cls, weights: list[float] | tuple[float, ...]) -> FoldRule:
        w = [float(x) for x in weights]
        n = len(w)
        equal = all(x == w[0] for x in w)
        divide = n if equal and abs(w[0] * n - 1.0) <= 1e-12 else None
        scale = w[0] if equal and divide is None and w[0] != 1.0 else None
        return cls(weights=tuple([1.0] * n if equal else w), divide=divide, scale=scale,
                   copy_identical=abs(math.fsum(w) - 1.0) <= 1e-9)


def nonfinite_error(name: str, revision: str, *,
                    hint: str = "drop that revision (it may be a diverged or corrupt checkpoint), "
                                "or pass --allow-nonfinite to keep going") -> TensorError:
    return TensorError(f"tensor {name!r} holds NaN or Inf in {revision}, and it is being averaged",
                       tensor=name, revisions=[revision], hint=hint)


def overflow_error(name: str, out_dtype: str) -> TensorError:
    return TensorError(f"tensor {name!r}: the weighted sum overflows {out_dtype}", tensor=name,
                       revisions=[], hint="use a wider --dtype (e.g. float32), or check the weights")


def differing_error(name: str, dtype: str, first: str, differ: list[str], *,
                    hint: str = "merge checkpoints of one run, or drop the revisions whose buffers differ",
                    ) -> TensorError:
    if dtype.startswith("float8"):  # floating, but merger doesn't average it (no accumulation rule)
        return TensorError(
            f"tensor {name!r} is {dtype}, which merger copies but doesn't average, and it differs between "
            f"revisions: {first} vs {', '.join(differ)}", tensor=name, revisions=[first, *differ],
            hint="convert the checkpoints to bfloat16 or float16 first to average them, or drop the "
                 "revisions whose values differ")
    return TensorError(
        f"tensor {name!r} ({dtype}) is not floating and differs between revisions: "
        f"{first} vs {', '.join(differ)}; integer and bool tensors are never averaged",
        tensor=name, revisions=[first, *differ], hint=hint)
