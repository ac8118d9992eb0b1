"""Properties of the merge over random trajectories (hypothesis), against the float64 reference.

A drawn case: 1-5 inputs of random tensors (shapes with 0-3 dims, scalars and empty tensors
included; float16, bfloat16 or float32; tensors that move between inputs, tensors identical in
every input, int64/bool buffers; sometimes one tensor larger than ``CHUNK`` elements), stored as
safetensors or torch zip; a method (uniform, linear, ema, explicit weights with or without
normalising); an output dtype; an accumulation dtype; a ``--max-memory`` from the smallest the
plan accepts (tensors cut into ``CHUNK``-multiple element ranges) upwards; a shard size.

Properties: every output tensor is within an ulp of the float64 weighted sum (identical tensors
and buffers bit for bit); and the budget never changes a bit of the output.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import check_against_reference, files_equal
from helpers.fuzz import examples
from merger.testing import synth
from merger.api import average
from merger.errors import UsageError
from merger.plan.methods import Method
from merger.plan import Options
from merger.units import SIZES

CHUNK = SIZES.chunk  # the default sizes: this module never changes them

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    sds: list[dict[str, torch.Tensor]]
    fmt: str
    method: Method
    out_dtype: torch.dtype | None
    accumulate: str
    max_shard_size: int
    budgets: tuple[int, int]  # multiples of the smallest working set the plan accepts

    def options(self, budget: int | None) -> Options:
        return Options(method=self.method, dtype=str(self.out_dtype).removeprefix("torch.") if self.out_dtype else None,
                       accumulate=self.accumulate, max_shard_size=self.max_shard_size,
                       max_memory=None if budget is None else budget * self.min_budget())

    def min_budget(self) -> int:
        """The plan's smallest accepted --max-memory: one CHUNK of the widest tensor, all buffers."""
        n = len(self.sds)
        out = self.out_dtype.itemsize if self.out_dtype else None

        def cost(t: torch.Tensor) -> int:
            o = out if (out and t.is_floating_point()) else t.element_size()
            return min(t.numel(), CHUNK) * (2 * n * t.element_size() + 2 * o)
        return max(cost(t) for t in self.sds[-1].values())

    def write(self, root: Path) -> Path:
        for i, sd in enumerate(self.sds):
            synth.save_checkpoint(root / f"step{1000 * (i + 1)}", sd, fmt=self.fmt)
        return root


shapes = st.lists(st.integers(0, 24), min_size=0, max_size=3).map(tuple)


@st.composite
def cases(draw) -> Case:
    n = draw(st.sampled_from([2, 3, 4, 5, 1]))  # shrinks towards 2; one input is a copy
    dtype = draw(st.sampled_from(FLOATS))
    specs = draw(st.lists(st.tuples(shapes, st.sampled_from(["moving", "moving", "moving", "identical", "int64",
                                                                "bool"])), min_size=1, max_size=5))
    if draw(st.booleans()):  # one tensor cut into element ranges by small budgets
        specs.append(((draw(st.integers(CHUNK + 1, 5 * CHUNK // 2)),), "moving"))
    floating = [shape for shape, kind in specs if kind in ("moving", "identical")]
    if floating and not any(math.prod(shape) for shape in floating):  # 0 parameters: refused (test_deepspeed_zero3)
        specs.append(((draw(st.integers(1, 24)),), "moving"))
    kind = draw(st.sampled_from(["uniform", "linear", "ema", "weights", "weights-raw"]))
    if kind == "ema":
        method = Method("ema", decay=draw(st.floats(0.05, 0.95)))
    elif kind.startswith("weights"):
        raw = kind == "weights-raw"
        w = draw(st.lists(st.floats(-1.0 if raw else 0.05, 3.0), min_size=n, max_size=n))
        method = Method("weights", weights=tuple(w), normalize=not raw)
    else:
        method = Method(kind)
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    sds: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, (shape, kind) in enumerate(specs):
        name = f"t{k}.{kind}"
        if kind in ("int64", "bool"):
            x = torch.randint(0, 2 if kind == "bool" else 1000, shape, generator=g).to(getattr(torch, kind))
            xs = [x.clone() for _ in range(n)]
        else:
            base = torch.randn(shape, generator=g) * scale
            if kind == "identical":
                if base.numel() and method.normalize:  # unnormalised weights scale it: -inf * w is no average
                    base.view(-1)[0] = -float("inf")  # like Pythia's masked_bias
                xs = [base.to(dtype) for _ in range(n)]
            else:
                xs = [(base + 0.05 * scale * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
        for sd, x in zip(sds, xs):
            sd[name] = x
    event(f"{n} inputs, {kind}, {'a tensor over CHUNK' if specs[-1][0] and max(specs[-1][0]) > CHUNK else 'small'}")
    return Case(sds=sds, fmt=draw(st.sampled_from(["safetensors", "bin"])), method=method,
                out_dtype=draw(st.sampled_from([None, *FLOATS])), accumulate=draw(st.sampled_from(["auto", "float64"])),
                max_shard_size=draw(st.sampled_from([5 * 10**9, 300_000])),
                budgets=(draw(st.integers(1, 3)), draw(st.integers(1, 8))))


@pytest.mark.fuzz
@SETTINGS
@given(case=cases())
def test_merge_matches_float64_reference(case, tmp_path_factory):
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as d:
        root = case.write(Path(d) / "run")
        plan, _ = average([str(root)], options=case.options(case.budgets[0]), output=Path(d) / "out")
        check_against_reference(Path(d) / "out", case.sds, list(plan.weights), out_dtype=case.out_dtype,
                                accumulate=case.accumulate)


@pytest.mark.fuzz
@SETTINGS
@given(case=cases())
def test_any_budget_gives_identical_bits(case, tmp_path_factory):
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as d:
        root = case.write(Path(d) / "run")
        with pytest.raises(UsageError, match="--max-memory .* is too small"):  # min_budget() is the smallest
            average([str(root)], options=dataclasses.replace(case.options(1), max_memory=case.min_budget() - 1),
                    output=Path(d) / "never")
        outs = []
        for i, budget in enumerate([*case.budgets, None]):
            out = Path(d) / f"out{i}"
            plan, _ = average([str(root)], options=case.options(budget), output=out)
            outs.append(out)
            if budget == 1:  # the smallest budget cuts a tensor over CHUNK elements at CHUNK multiples
                for ti, t in enumerate(plan.tensors):
                    starts = [s.start for b in plan.blocks for s in b if s.tensor == ti]
                    assert len(starts) == max(1, -(-t.numel // CHUNK)) and all(x % CHUNK == 0 for x in starts)
        assert files_equal(outs[0], outs[1]) and files_equal(outs[0], outs[2])


def test_unnormalised_weights_apply_to_chunks_identical_in_every_input(tmp_path):
    """``--weights 1,-1 --no-normalize`` (the difference of two checkpoints) is 0 where they agree."""
    x = torch.randn(2 * CHUNK, generator=torch.Generator().manual_seed(0)).half()
    for i in range(2):
        y = x.clone()
        y[CHUNK:] += 0.01 * (i + 1)  # the first CHUNK is identical in both inputs, the second isn't
        synth.save_checkpoint(tmp_path / "run" / f"step{i + 1}", {"w": y})
    average([str(tmp_path / "run")], output=tmp_path / "out",
            options=Options(method=Method("weights", weights=(1.0, -1.0), normalize=False)))
    out = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert torch.equal(out[:CHUNK], torch.zeros(CHUNK, dtype=torch.float16))
