"""Decay by merging: weights that turn constant-LR checkpoints into the end of a learning-rate decay.

Checkpoints θ_1..θ_n of a constant-LR phase sit at fractions u_1 = 0 < ... < u_n = 1 of the
window. A decay over the same window with LR multiplier α(u), α(0) = 1 to α(1) = 0, takes each
interval's steps scaled by α, so it ends near

    θ_1 + Σ_{i<n} ᾱ_i (θ_{i+1} − θ_i),   ᾱ_i = mean of α over [u_i, u_{i+1}],

a weighted average with w_1 = 1 − ᾱ_1, w_i = ᾱ_{i−1} − ᾱ_i, w_n = ᾱ_{n−1} (they telescope to 1,
and are >= 0 because α falls). ᾱ_i is the exact interval mean, (A(u_{i+1}) − A(u_i)) / Δu, from
the antiderivative A of each shape, in float64:

| shape    | α(u)             | A(u)                     | weights, equal spacing        |
|----------|------------------|--------------------------|-------------------------------|
| linear   | 1 − u            | u − u²/2                 | (½, 1, ..., 1, ½) / (n − 1)   |
| cosine   | (1 + cos πu) / 2 | (u + sin(πu)/π) / 2      | more on the ends              |
| 1-sqrt   | 1 − √u           | u − (2/3) u^(3/2)        | Hägele et al. 2024's cooldown |

u comes from the checkpoints' step numbers when every step is known and they increase (unequal
spacing, e.g. ``--revisions step100,step200,step400``); otherwise checkpoints are equally spaced.
"""

from __future__ import annotations

import math

from merger.errors import UsageError

# shape -> antiderivative A(u) of α(u) on [0, 1], A(0) = 0
SHAPES = {
    "linear": lambda u: u - u * u / 2,
    "cosine": lambda u: (u + math.sin(math.pi * u) / math.pi) / 2,
    "1-sqrt": lambda u: u - (2.0 / 3.0) * u ** 1.5,
}


def positions(n: int, steps: list[int | None] | None = None) -> list[float]:
    """u_1 = 0, ..., u_n = 1: from ``steps`` when all are known and strictly increasing, else
    equally spaced."""
    if steps is not None and len(steps) == n and all(s is not None for s in steps) \
            and all(a < b for a, b in zip(steps, steps[1:])):
        first, span = steps[0], steps[-1] - steps[0]
        return [(s - first) / span for s in steps[:-1]] + [1.0]
    return [i / (n - 1) for i in range(n - 1)] + [1.0]


def decay_weights(shape: str, n: int, steps: list[int | None] | None = None) -> list[float]:
    """The weights of ``--method decay --shape shape`` over ``n`` checkpoints, oldest first.

    Args:
        shape: ``linear``, ``cosine`` or ``1-sqrt``.
        n: the number of checkpoints (at least 2: a decay needs a window).
        steps: each checkpoint's training step (None where unknown), to place them on the window.

    Returns:
        n float64 weights, each >= 0, summing to 1 (to rounding).

    Raises:
        UsageError: an unknown shape, or fewer than 2 checkpoints.
    """
    A = SHAPES.get(shape)
    if A is None:
        raise UsageError(f"--shape {shape!r}: unknown decay shape",
                         hint=f"use one of {', '.join(SHAPES)}, e.g. --method decay --shape linear")
    if n < 2:
        raise UsageError(f"--method decay needs at least 2 checkpoints (a window to decay over); "
                         f"{n} selected",
                         hint="select the stable-phase checkpoints of the window, e.g. "
                              "--revisions step8000..step10000 --every 500")
    u = positions(n, steps)
    means = [(A(b) - A(a)) / (b - a) for a, b in zip(u, u[1:])]  # ᾱ_i, i = 1..n-1
    return [1.0 - means[0]] + [p - q for p, q in zip(means, means[1:])] + [means[-1]]
