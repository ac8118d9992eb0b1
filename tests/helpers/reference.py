"""The float64 reference every merge test compares against, and the tolerances it is held to.

``reference(sds, weights)`` is the weighted sum in float64; ``check_against_reference(folder, sds,
weights)`` loads a merged folder and holds every floating tensor within ``ulps`` of it (or within
the accumulation bound where a sum cancels to near zero), every other tensor bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` numbers at the magnitude of ``ref`` (float64), subnormals included."""
    _, exp = torch.frexp(ref.abs().clamp_min(torch.finfo(dtype).tiny))  # |ref| = m * 2^exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(ref), exp - 1 - MANTISSA[dtype])


def assert_close_ulp(out: torch.Tensor, ref: torch.Tensor, *, ulps: float = 1.0, name: str = "",
                     acc_bound=None) -> None:
    """``out`` (any float dtype) is within ``ulps`` units in the last place of ``out.dtype`` of the
    float64 ``ref``; non-finite values must match exactly.

    ``acc_bound`` (a function returning a per-element bound, called only if needed) widens the
    tolerance where the sum cancels: the accumulation's own rounding error,
    n * eps(acc dtype) * sum_i |w_i x_i|, can exceed an ulp of a result near zero.
    """
    assert out.shape == ref.shape, name
    o = out.double()
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(o), fin), f"{name}: non-finite values differ"
    assert torch.equal(o[~fin], ref[~fin]) or not (~fin).any(), f"{name}: inf/nan differ"
    err = (o - ref).abs()
    err[~fin] = 0
    tol = ulps * ulp(ref, out.dtype)
    bad = err > tol
    if acc_bound is not None and bad.any():
        bad &= err > acc_bound()
    assert not bad.any(), (f"{name}: {int(bad.sum())} elements off by more than {ulps} ulp; worst "
                           f"{float((err / tol).max()):.3f} ulp")


def reference(sds: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """The naive in-memory float64 weighted sum (identical tensors stay exactly as they are)."""
    out = {}
    average = abs(math.fsum(weights) - 1) <= 1e-9  # merger copies identical tensors only then
    for k in sds[0]:
        xs = [sd[k] for sd in sds]
        if not xs[0].is_floating_point() or (average and all(torch.equal(x, xs[0]) for x in xs[1:])):
            out[k] = xs[0].double() if xs[0].is_floating_point() else xs[0]
            continue
        acc = torch.zeros(xs[0].shape, dtype=torch.float64)
        for w, x in zip(weights, xs):
            acc.add_(x.double(), alpha=w)
        out[k] = acc
    return out


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors output folder (sharded or not)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def acc_dtype(dtype: torch.dtype, out_dtype: torch.dtype, accumulate: str = "auto") -> torch.dtype:
    """What merger accumulates in (see merger.fold.torch_kernel.Kernel.acc_dtype)."""
    if accumulate != "auto":
        return getattr(torch, accumulate)
    return torch.float64 if max(dtype.itemsize, out_dtype.itemsize) >= 4 else torch.float32


def check_against_reference(folder: Path, sds, weights, *, out_dtype=None, ulps: float = 1.0,
                            accumulate: str = "auto", ref: dict[str, torch.Tensor] | None = None) -> None:
    """Every merged tensor: within ``ulps`` of the fp64 reference (or the accumulation error bound
    where the sum cancels), identical tensors bit for bit, integer tensors exactly. ``ref``:
    :func:`reference` of ``sds`` and ``weights``, if already computed (model-sized tests reuse it)."""
    merged = load_dir(folder)
    ref = reference(sds, weights) if ref is None else ref
    assert set(merged) == set(ref)
    for k, r in ref.items():
        m = merged[k]
        if not sds[0][k].is_floating_point():
            assert torch.equal(m, r), k
            continue
        assert m.dtype == (out_dtype or sds[0][k].dtype), k
        if abs(math.fsum(weights) - 1) <= 1e-9 and all(torch.equal(sd[k], sds[0][k]) for sd in sds[1:]) \
                and m.dtype == sds[0][k].dtype:
            assert torch.equal(m.view(torch.uint8) if m.dim() else m.reshape(1).view(torch.uint8),
                               sds[0][k].view(torch.uint8) if m.dim() else sds[0][k].reshape(1).view(torch.uint8)), \
                f"{k}: identical in every input but not copied bit for bit"
            continue
        adt = acc_dtype(sds[0][k].dtype, m.dtype, accumulate)
        xs = [sd[k] for sd in sds]

        def bound(xs=xs, scale=len(sds) * EPS[adt]):  # n * eps * sum_i |w_i x_i|, only if needed
            return scale * sum(abs(w) * x.double().abs() for w, x in zip(weights, xs))

        assert_close_ulp(m, r, ulps=ulps, name=k, acc_bound=bound)


def weights_of(method: str, n: int, decay=0.8, given=None):
    from merger.plan.methods import Method, weights_for

    return weights_for(Method(name=method, decay=decay, weights=given), n)
