"""``merger sweep --methods ...,decay``: the decay-by-merging average of the window ending at a step.

The LAWA window sum in :mod:`merger.eval.sweep` slides (add the newest checkpoint, subtract the one
leaving), which only works for equal weights. The decay weights (:mod:`merger.plan.decay`) are fixed
per position in the window, so each window is summed afresh: K checkpoints read per step, one at
a time into a float64 accumulator (memory: one float64 model plus one checkpoint as stored).
Tensors bit-identical in every checkpoint of the window are kept as they are, and floating
tensors are cast once to their stored dtype, as ``merger average --method decay`` writes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merger.formats import TensorInfo
from merger.eval.state import StateDict
from merger.eval.state import read_tensors
from merger.sources import Source


def window_weights(window: list[Source], shape: str | None) -> list[float]:
    """The ``decay`` weights of ``window`` (oldest first), placed by its step numbers."""
    from merger.plan.methods import Method, weights_for

    return weights_for(Method("decay", shape=shape), len(window), steps=[s.step for s in window])


def decay_state(window: list[Source], layouts: list[dict[str, TensorInfo]], shape: str | None,
                counter: Callable[[int], None] | None = None) -> StateDict:
    """The float64 weighted sum of the ``window``'s checkpoints with the decay weights, cast to
    each tensor's stored dtype.

    Args:
        window: the K checkpoints, oldest first, each with a local ``path``.
        layouts: ``read_checkpoint`` of each checkpoint of the window.
        shape: ``linear``, ``cosine`` or ``1-sqrt`` (None: linear).
        counter: called with the bytes of every read.

    Returns:
        A state dict (tensor name -> tensor), names and dtypes as in the newest checkpoint.
    """

    weights = window_weights(window, shape)
    first: StateDict = {}
    acc: dict[str, torch.Tensor] = {}
    same: set[str] = set()
    for j, (layout, w) in enumerate(zip(layouts, weights)):
        x, n = read_tensors(layout)
        if counter:
            counter(n)
        for name, v in x.items():
            if j == 0:
                first[name] = v
                same.add(name)
            elif name in same and not _bit_equal(first[name], v):
                same.discard(name)
            if v.is_floating_point():
                if j == 0:
                    acc[name] = v.double() * w
                else:
                    acc[name].add_(v.double(), alpha=w)
    return {name: first[name] if name in same or name not in acc else acc[name].to(first[name].dtype)
            for name in first}


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and \
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
