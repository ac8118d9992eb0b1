"""The fresh initialisation of the grown model, one tensor at a time, reproducible from (seed, name).

Two rules (``r`` is the config's ``initializer_range``; fan-ins are read along the rule's fan-in axis):

- ``standard``: the architecture's own init as transformers applies it: weights N(0, r²) (GPT-2's
  residual ``c_proj``: r / sqrt(2 · n_layer)), biases 0, LayerNorm weights 1 and biases 0.
- ``mup``: μP relative to the small model (Yang et al., Tensor Programs V, table 8), so that at the
  small width it is the standard init: hidden matrices std · sqrt(fan_in_small / fan_in), the
  output (unembedding) matrix std · fan_in_small / fan_in, input embeddings unchanged.

The generator of a tensor is seeded from sha256(seed, name), so the same seed gives the same bytes
whatever the order, the sharding or the other tensors.
"""

from __future__ import annotations

import hashlib
import math

import torch

from merger.grow.arch import Rule, Sizes

INITS = ("mup", "standard")


def generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the tensor's name (not from Python's salted hash)."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def fresh_value(rule: Rule, shape: tuple[int, ...], small_shape: tuple[int, ...], *, init: str,
                init_range: float, big: Sizes) -> float | tuple[str, float]:
    """What a fresh tensor is: a constant (``float``) or ``("normal", std)``.

    Args:
        rule: the tensor's rule.
        shape: its grown shape.
        small_shape: its shape in the small model (for μP's fan-in ratio).
        init: ``mup`` or ``standard``.
        init_range: the config's ``initializer_range``.
        big: the grown sizes (GPT-2's scaled c_proj reads n_layer from it).
    """
    if rule.role in ("bias", "norm_bias"):
        return 0.0
    if rule.role == "norm_weight":
        return 1.0
    std = init_range
    if rule.scaled:
        std /= math.sqrt(2 * big.layers)
    if init == "mup" and rule.fan_in_axis is not None:
        ratio = small_shape[rule.fan_in_axis] / shape[rule.fan_in_axis]
        std *= ratio if rule.role == "output" else math.sqrt(ratio)
    return ("normal", std)


def fresh_tensor(value: float | tuple[str, float], shape: tuple[int, ...], *, seed: int, name: str) -> torch.Tensor:
    """The fresh tensor in float64 (normal draws are made in float32, then widened)."""
    if not isinstance(value, tuple):
        return torch.full(shape, value, dtype=torch.float64)
    out = torch.randn(shape, generator=generator(seed, name), dtype=torch.float32).double()
    return out.mul_(value[1])
