"""The kernel's two implementations: the CPU chunk loop and the vectorized path CUDA runs.

The vectorized path is plain torch, so it runs on CPU tensors too: CI (no GPU) checks here that
it gives the same bits as the chunk loop, the same identical-chunk copies and the same errors.
"""

from __future__ import annotations

import pytest
import torch

from merger.errors import TensorError
from merger.fold.torch_kernel import Kernel
from merger.plan import TensorPlan
from merger.units import SIZES

CHUNK = SIZES.chunk  # the default sizes: this module never changes them


def raw(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


def plan_for(dtype: torch.dtype, out_dtype: torch.dtype, n: int) -> TensorPlan:
    name = str(dtype).removeprefix("torch.")
    return TensorPlan("w", name, str(out_dtype).removeprefix("torch."), (n,), True, (), 0, 0)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_vectorized_equals_chunk_loop(dtype, out_dtype):
    n_el = 3 * CHUNK + 1234  # a partial last chunk
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n_el, generator=g)
    xs = [(base + 0.01 * torch.randn(n_el, generator=g)).to(dtype) for _ in range(5)]
    for x in xs:  # chunk 1 identical in every input, with an -inf: copied bit for bit
        x[CHUNK: 2 * CHUNK] = xs[0][CHUNK: 2 * CHUNK] if x is not xs[0] else x[CHUNK: 2 * CHUNK]
    xs[0][CHUNK + 7] = float("-inf")
    for x in xs[1:]:
        x[CHUNK + 7] = float("-inf")
    w = [0.1, 0.3, 0.2, 0.25, 0.15]
    t = plan_for(dtype, out_dtype, n_el)
    outs = []
    for path in ("_fold_cpu", "_fold_vectorized"):
        k = Kernel(w, list("abcde"))
        out = torch.empty(n_el * out_dtype.itemsize, dtype=torch.uint8)
        getattr(k, path)(t, [raw(x) for x in xs], out)
        outs.append(out)
        assert k.copied == {"w": False}
    assert torch.equal(outs[0], outs[1])
    merged = outs[0].view(out_dtype)
    assert torch.equal(merged[CHUNK: 2 * CHUNK], xs[0][CHUNK: 2 * CHUNK].to(out_dtype))


@pytest.mark.parametrize("path", ["_fold_cpu", "_fold_vectorized"])
def test_nan_names_the_revision(path):
    xs = [torch.randn(CHUNK + 5).half() for _ in range(3)]
    xs[2][CHUNK + 2] = float("nan")
    k = Kernel([1 / 3] * 3, ["step1", "step2", "step3"])
    with pytest.raises(TensorError, match="NaN or Inf in step3"):
        getattr(k, path)(plan_for(torch.float16, torch.float16, CHUNK + 5), [raw(x) for x in xs],
                         torch.empty((CHUNK + 5) * 2, dtype=torch.uint8))
    k = Kernel([1 / 3] * 3, ["step1", "step2", "step3"], allow_nonfinite=True)
    getattr(k, path)(plan_for(torch.float16, torch.float16, CHUNK + 5), [raw(x) for x in xs],
                     torch.empty((CHUNK + 5) * 2, dtype=torch.uint8))


@pytest.mark.parametrize("path", ["_fold_cpu", "_fold_vectorized"])
def test_overflow_of_the_output_dtype(path):
    xs = [torch.full((10,), 70000.0, dtype=torch.float32), torch.full((10,), 80000.0, dtype=torch.float32)]
    k = Kernel([0.5, 0.5], ["a", "b"])
    with pytest.raises(TensorError, match="overflows float16"):
        getattr(k, path)(plan_for(torch.float32, torch.float16, 10), [raw(x) for x in xs],
                         torch.empty(20, dtype=torch.uint8))


def test_duplicates_and_exact_tensors():
    a = torch.randn(1000).half()
    b = torch.randn(1000).half()
    k = Kernel([1 / 3] * 3, ["s0", "s1", "s2"])
    k.fold(plan_for(torch.float16, torch.float16, 1000), [raw(a), raw(a), raw(b)], torch.empty(2000, dtype=torch.uint8))
    assert k.duplicates() == [("s0", "s1")]
    mask = torch.tensor([1, 0, 1], dtype=torch.uint8)
    t = TensorPlan("m", "uint8", "uint8", (3,), False, (), 0, 0)
    with pytest.raises(TensorError, match="differs between revisions: s0 vs s2"):
        k.fold(t, [mask, mask, torch.tensor([1, 1, 1], dtype=torch.uint8)], torch.empty(3, dtype=torch.uint8))


@pytest.mark.parametrize("accumulate", ["auto", "float32"])
def test_mixed_dtypes_vectorized_equals_chunk_loop(accumulate):
    """Inputs of different dtypes (fp32, fp32, bf16, fp16): both paths give the same bits, within
    1 ulp of the fp64 mean of the upcast values; a chunk equal in value everywhere (with an -inf)
    is written as those values; no chunk counts as copied bit for bit; no input is a duplicate
    of a predecessor of another dtype."""
    n_el = 2 * CHUNK + 77
    g = torch.Generator().manual_seed(1)
    base = torch.randn(n_el, generator=g)
    dts = (torch.float32, torch.float32, torch.bfloat16, torch.float16)
    xs = [(base + 0.01 * torch.randn(n_el, generator=g)).to(dt) for dt in dts]
    same = torch.full((CHUNK,), 0.5)  # exact in every dtype
    same[3] = float("-inf")
    for x in xs:
        x[CHUNK: 2 * CHUNK] = same
    xs[1][:CHUNK] = xs[0][:CHUNK]  # step 2 == step 1 in chunk 0 only: not a duplicate (chunk 2 differs)
    t = TensorPlan("w", "float16", "bfloat16", (n_el,), True, (), 0, 0,
                   in_dtypes=tuple(str(d).removeprefix("torch.") for d in dts))
    assert t.itemsize == 4 and [t.input_itemsize(i) for i in range(4)] == [4, 4, 2, 2]
    outs = []
    for path in ("_fold_cpu", "_fold_vectorized"):
        k = Kernel([0.25] * 4, list("abcd"), accumulate=accumulate)
        out = torch.empty(n_el * 2, dtype=torch.uint8)
        getattr(k, path)(t, [raw(x) for x in xs], out)
        outs.append(out)
        assert k.copied == {"w": False}
        assert k.duplicates() == []
    assert torch.equal(outs[0], outs[1])
    merged = outs[0].view(torch.bfloat16)
    ref = sum(x.double() for x in xs) / 4
    assert torch.equal(merged[CHUNK: 2 * CHUNK], same.to(torch.bfloat16))
    fin = torch.isfinite(ref)
    err = (merged.double() - ref).abs()[fin]
    ulp = torch.ldexp(torch.ones_like(ref), torch.frexp(ref.abs().clamp_min(1e-30))[1] - 8)[fin]  # bf16 spacing
    assert bool((err <= ulp).all())
