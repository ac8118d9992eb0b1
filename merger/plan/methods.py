"""Averaging methods. Every method is a weight vector over the ordered checkpoints, oldest first.

| method    | w_i, i = 1..n                                          | known as                 |
|-----------|--------------------------------------------------------|--------------------------|
| uniform   | 1/n                                                    | LAWA, SWA, PMA's SMA     |
| ema       | w_1 = b^(n-1), w_i = (1-b) b^(n-i)  (sums to 1)        | EMA (PMA's alpha = 1-b)  |
| linear    | i / (1 + 2 + ... + n)                                  | PMA's WMA                |
| weights   | given, normalised to sum 1 unless normalize=False      | model soups, hand weights|
| decay     | drops of the LR schedule's interval means (decay.py)   | WSM, PMA: merge ~ decay  |

The kernel only ever computes sum_i w_i x_i; weights are computed here in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from merger.errors import UsageError

METHODS = ("uniform", "ema", "linear", "weights", "decay")


@dataclass(frozen=True)
class Method:
    """A method name and its parameters, as given on the command line."""

    name: str = "uniform"
    decay: float | None = None
    weights: tuple[float, ...] | None = None
    normalize: bool = True
    shape: str | None = None  # decay: linear | cosine | 1-sqrt (None: linear)

    def describe(self) -> str:
        if self.name == "ema":
            return f"ema(decay={self.decay})"
        if self.name == "weights":
            return "weights" + ("" if self.normalize else " (not normalised)")
        if self.name == "decay":
            return f"decay(shape={self.shape or 'linear'})"
        return self.name


def parse_weights(text: str) -> tuple[float, ...]:
    """``"1,2,3"`` -> ``(1.0, 2.0, 3.0)``, refusing empty items and non-numbers."""
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise UsageError(
            f"--weights: can't read {text!r} as comma-separated numbers",
            hint="write one number per checkpoint, oldest first, e.g. --weights 1,1,2",
        ) from None
    return values


def weights_for(method: Method, n: int, *, steps: list[int | None] | None = None) -> list[float]:
    """The weight vector of ``method`` over ``n`` checkpoints (oldest first).

    Args:
        method: the method and its parameters.
        n: the number of checkpoints.
        steps: each checkpoint's training step (None where unknown); only ``decay`` uses them,
            to place unequally spaced checkpoints on the window.

    Raises:
        UsageError: unknown method or decay shape, decay outside (0, 1), wrong count of weights,
            non-finite weights, weights that sum to zero or less when they must be normalised,
            or ``decay`` over fewer than 2 checkpoints.
    """
    if n < 1:
        raise UsageError("no checkpoints to average")
    if method.shape is not None and method.name != "decay":
        raise UsageError(f"--shape is only used with --method decay (not {method.name})",
                         hint="add --method decay")
    if method.name == "decay":
        from merger.plan.decay import decay_weights

        return decay_weights(method.shape or "linear", n, steps)
    if method.name == "uniform":
        return [1.0 / n] * n
    if method.name == "linear":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method.name == "ema":
        b = method.decay
        if b is None:
            raise UsageError("--method ema needs --decay", hint="e.g. --method ema --decay 0.9")
        if not (0.0 < b < 1.0) or math.isnan(b):
            raise UsageError(f"--decay {b} is outside (0, 1)", hint="EMA decay is e.g. 0.9 or 0.99")
        return [b ** (n - 1)] + [(1.0 - b) * b ** (n - i) for i in range(2, n + 1)]
    if method.name == "weights":
        w = method.weights
        if not w:
            raise UsageError("--method weights needs --weights", hint="e.g. --weights 1,1,2")
        if len(w) != n:
            raise UsageError(
                f"--weights has {len(w)} values but {n} checkpoints are selected",
                hint="give one weight per checkpoint, oldest first (see --dry-run for the list)",
            )
        if not all(math.isfinite(x) for x in w):
            raise UsageError(f"--weights {','.join(map(str, w))} contains NaN or Inf",
                             hint="give one finite number per checkpoint, e.g. --weights 1,1,2")
        if not method.normalize:
            return list(w)
        # scaled by a power of two first (exact), so that weights near the float limit (1e308,1e308)
        # can't overflow the sum: x / total is the same quotient either way
        e = max(math.frexp(x)[1] for x in w)
        w = [math.ldexp(x, -e) for x in w]
        total = math.fsum(w)
        if total <= 0:
            try:
                shown = f"{math.ldexp(total, e):g}"
            except OverflowError:
                shown = "-inf"
            raise UsageError(
                f"--weights sum to {shown}; they must sum to more than zero to be normalised",
                hint="use positive weights, or --no-normalize to use them exactly as given",
            )
        return [x / total for x in w]
    raise UsageError(f"unknown method {method.name!r}", hint=f"use one of {', '.join(METHODS)}")
