"""Shared fixtures: offline environment, seeded checkpoint trajectories, the fp64 reference.

Every test runs with no network: the Hub is reached only through a hand-built HF cache under a
temporary ``HF_HUB_CACHE`` (see ``test_hub.py``), set here before huggingface_hub is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The session's HF cache holds ~1.6 GB of Pythia-shaped revisions (test_hub.py): removed when the
# test process exits, so repeated runs do not fill the disk.
_CACHE = tempfile.mkdtemp(prefix="merger-test-hfcache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update({
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_CACHE": _CACHE, "HF_HOME": os.path.join(_CACHE, "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "MERGER_CACHE": os.path.join(_CACHE, "merger"),
})

import math  # noqa: E402
import random  # noqa: E402
import secrets  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from merger.testing import synth  # noqa: E402

# ---- fuzz tests: deterministic by default, fresh draws under `make fuzz` ---------------------------
# Every test that draws inputs (hypothesis, or the ``rng`` fixture) is marked ``fuzz``. By default
# ("ci" profile) they draw the same cases on every run: hypothesis derandomized (seeded from the
# test itself, no example database), ``rng`` seeded from the test's name. With MERGER_FUZZ=1 (or
# HYPOTHESIS_PROFILE=fuzz; `make fuzz`) they draw fresh cases, FUZZ_FACTOR times as many
# hypothesis examples; the session's seed (hypothesis' --hypothesis-seed and the rng fixture's) is
# printed in pytest's header and summary, and MERGER_FUZZ_SEED=N repeats the run's draws.
FUZZ = os.environ.get("MERGER_FUZZ", "") not in ("", "0") or os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZ_FACTOR = int(os.environ.get("MERGER_FUZZ_FACTOR", "10"))
FUZZ_SEED = int(os.environ.get("MERGER_FUZZ_SEED") or secrets.randbits(32)) if FUZZ else 0
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True, deadline=None,
                          max_examples=100 * FUZZ_FACTOR)
settings.load_profile("fuzz" if FUZZ else "ci")


def examples(n: int) -> int:
    """A hypothesis test's ``max_examples``: ``n`` by default, FUZZ_FACTOR times more under fuzz."""
    return n * FUZZ_FACTOR if FUZZ else n


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin reads --hypothesis-seed
def pytest_configure(config):
    if FUZZ and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(FUZZ_SEED)  # one seed for hypothesis and rng: one to repeat


def _fuzz_line() -> str:
    if FUZZ:
        return (f"merger fuzz: fresh draws, seed {FUZZ_SEED} (MERGER_FUZZ_SEED={FUZZ_SEED} repeats them), "
                f"{FUZZ_FACTOR}x the hypothesis examples")
    return "merger fuzz tests: fixed draws (hypothesis derandomized); MERGER_FUZZ=1 for fresh ones"


def pytest_report_header(config):
    return _fuzz_line()


def pytest_terminal_summary(terminalreporter):
    if FUZZ:  # also under -q, which hides the header
        terminalreporter.write_line(_fuzz_line())


@pytest.fixture
def rng(request) -> random.Random:
    """A ``random.Random`` for a test's random draws: seeded from the test's name by default (the
    same draws on every run), from the session's fresh seed under fuzz. The seed is printed (pytest
    shows it when the test fails)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ FUZZ_SEED
    print(f"rng seed {seed} (MERGER_FUZZ_SEED={FUZZ_SEED})")
    return random.Random(seed)


# One intra-op thread: predictable on a shared 2-core machine, where OpenMP workers spinning
# against other processes made the fp64 reference checks 2x slower (merger's own pipeline sets
# one thread too). Restored by nothing: the whole test process runs this way.
torch.set_num_threads(1)

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
                            accumulate: str = "auto") -> None:
    """Every merged tensor: within ``ulps`` of the fp64 reference (or the accumulation error bound
    where the sum cancels), identical tensors bit for bit, integer tensors exactly."""
    merged = load_dir(folder)
    ref = reference(sds, weights)
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


def make_run(root: Path, *, shape="tiny", steps=(1000, 2000, 3000), fmt="safetensors", dtype=torch.float16,
             max_shard_size=None, seed=0, name="step{step}"):
    """Write a trajectory and return (root, [state dicts])."""
    shape_ = synth.SHAPES[shape] if isinstance(shape, str) else shape
    sds = []
    for s in steps:
        sds.append(synth.pythia_state_dict(shape_, seed=seed, step=s, dtype=dtype))
        synth.save_checkpoint(Path(root) / name.format(step=s), sds[-1], fmt=fmt,
                              max_shard_size=max_shard_size, config=shape_.config(dtype))
    return root, sds


# a shape whose embedding (8192 x 128 = 4 CHUNKs) is cut into element ranges by small budgets
WIDE = synth.Shape(hidden=128, layers=1, heads=4, vocab=8192, max_pos=64)


@pytest.fixture
def tiny_run(tmp_path):
    return make_run(tmp_path / "run")


def files_equal(a: Path, b: Path, pattern: str = "*.safetensors") -> bool:
    fa, fb = sorted(Path(a).glob(pattern)), sorted(Path(b).glob(pattern))
    return [f.name for f in fa] == [f.name for f in fb] and \
        all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))


def weights_of(method: str, n: int, decay=0.8, given=None):
    from merger.plan.methods import Method, weights_for

    return weights_for(Method(name=method, decay=decay, weights=given), n)


assert math  # keep import for helpers that need it
