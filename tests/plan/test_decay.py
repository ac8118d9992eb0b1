"""``--method decay --shape S``: the weights against independent quadrature, unequal spacing, the
claim they encode (a decayed walk along the checkpoints' path ends at the weighted average), real
merges through the CLI against the float64 reference, errors, and ``merger sweep -m ...,decay``.

The test's weights come from its own integrals (composite Simpson on the substituted integral
u = t², which is smooth for all three shapes, 1-sqrt included), not from merger's antiderivatives.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import EPS, assert_close_ulp, check_against_reference, make_run, reference
from typer.testing import CliRunner

from merger.cli import app
from merger.errors import UsageError
from merger.plan.methods import Method, weights_for
from merger.sources.local import resolve_local
from merger.eval.sweep_decay import decay_state

runner = CliRunner()

ALPHA = {  # the LR multiplier of each shape, from the issue
    "linear": lambda u: 1 - u,
    "cosine": lambda u: (1 + math.cos(math.pi * u)) / 2,
    "1-sqrt": lambda u: 1 - math.sqrt(u),
}


def simpson_mean(alpha, a: float, b: float, m: int = 4000) -> float:
    """Mean of alpha over [a, b]: ∫ alpha(t²) 2t dt over [√a, √b] by composite Simpson (m even),
    divided by b - a."""
    lo, hi = math.sqrt(a), math.sqrt(b)
    h = (hi - lo) / m
    f = [alpha((lo + k * h) ** 2) * 2 * (lo + k * h) for k in range(m + 1)]
    s = f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2])
    return s * h / 3 / (b - a)


def expected_weights(shape: str, u: list[float]) -> list[float]:
    """w_1 = 1 - ᾱ_1, w_i = ᾱ_(i-1) - ᾱ_i, w_n = ᾱ_(n-1), the means by quadrature."""
    means = [simpson_mean(ALPHA[shape], a, b) for a, b in zip(u, u[1:])]
    return [1 - means[0]] + [means[i - 1] - means[i] for i in range(1, len(means))] + [means[-1]]


@pytest.mark.parametrize("n", [2, 5, 9])
@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_weights_against_integrals(shape, n):
    w = weights_for(Method("decay", shape=shape), n)
    assert w == pytest.approx(expected_weights(shape, [i / (n - 1) for i in range(n)]), abs=1e-12)
    assert abs(math.fsum(w) - 1) < 1e-15 and all(x >= 0 for x in w)
    if shape == "linear":  # the trapezoid rule's weights
        assert w == pytest.approx([0.5 / (n - 1)] + [1 / (n - 1)] * (n - 2) + [0.5 / (n - 1)], abs=1e-15)
    if shape != "1-sqrt":  # α(1 - u) = 1 - α(u): symmetric weights
        assert w == pytest.approx(w[::-1], abs=1e-15)
    else:  # 1-sqrt drops fastest at the start: the first checkpoint weighs most
        assert w[0] == max(w)


def test_closed_forms_by_hand():
    assert weights_for(Method("decay", shape="cosine"), 2) == pytest.approx([0.5, 0.5], abs=1e-15)
    # 1-sqrt, n = 2: ᾱ = 1 - 2/3 = 1/3
    assert weights_for(Method("decay", shape="1-sqrt"), 2) == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    # cosine, n = 3: ᾱ_1 = 1/2 + 1/π, ᾱ_2 = 1/2 - 1/π
    assert weights_for(Method("decay", shape="cosine"), 3) == \
        pytest.approx([0.5 - 1 / math.pi, 2 / math.pi, 0.5 - 1 / math.pi], abs=1e-15)
    assert Method("decay").describe() == "decay(shape=linear)"
    assert Method("decay", shape="1-sqrt").describe() == "decay(shape=1-sqrt)"


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_unequal_spacing_uses_the_steps(shape):
    steps = [100, 200, 400, 800, 900]
    u = [(s - 100) / 800 for s in steps]
    w = weights_for(Method("decay", shape=shape), 5, steps=steps)
    assert w == pytest.approx(expected_weights(shape, u), abs=1e-12)
    # only the relative placement matters; equal spacing without (or with unusable) steps
    assert weights_for(Method("decay", shape=shape), 5, steps=[10 * s + 7 for s in steps]) == \
        pytest.approx(w, abs=1e-14)
    equal = weights_for(Method("decay", shape=shape), 5)
    for steps_ in ([0, 1, 2, 3, 4], [5, 10, 15, 20, 25], [100, None, 300, 400, 500], None):
        assert weights_for(Method("decay", shape=shape), 5, steps=steps_) == pytest.approx(equal, abs=1e-14)
    if shape == "linear":  # u = 0, 1/8, 3/8, 7/8, 1; ᾱ_i = 1 - (u_i + u_(i+1))/2
        assert w == pytest.approx([1 / 16, 3 / 16, 6 / 16, 5 / 16, 1 / 16], abs=1e-15)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
@pytest.mark.parametrize("steps", [[0, 1, 2, 3, 4, 5], [0, 10, 30, 35, 80, 100]])
def test_a_decayed_walk_ends_at_the_weighted_average(shape, steps):
    """The claim: walk the checkpoints' piecewise-linear path with each step scaled by α(u);
    the end point (many small steps, midpoint rule) is Σ w_i θ_i."""
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(len(steps), 7, generator=g, dtype=torch.float64)
    pos = theta[0].clone()
    span, m = steps[-1] - steps[0], 2000  # m small steps per unit of training step
    for i in range(len(steps) - 1):
        velocity = (theta[i + 1] - theta[i]) / (steps[i + 1] - steps[i])
        k = m * (steps[i + 1] - steps[i])  # the steps taken along segment i, each scaled by α
        scale = math.fsum(ALPHA[shape]((steps[i] + (j + 0.5) / m - steps[0]) / span) for j in range(k))
        pos += velocity * scale / m
    w = torch.tensor(weights_for(Method("decay", shape=shape), len(steps), steps=steps), dtype=torch.float64)
    assert torch.allclose(pos, (w[:, None] * theta).sum(0), atol=1e-6)


def test_n_equals_1_and_bad_shapes_are_errors(tiny_run, tmp_path):
    root, _ = tiny_run
    out = tmp_path / "o"
    for args, message, hint in [
        (["-r", "step2000", "--method", "decay"], "--method decay needs at least 2 checkpoints",
         "--revisions step8000..step10000"),
        (["--method", "ema", "--decay", "0.5", "--shape", "cosine"], "--shape is only used with --method decay",
         "add --method decay"),
    ]:
        r = runner.invoke(app, ["average", str(root), *args, "-o", str(out)])
        assert r.exit_code == 1, r.output
        assert "Error:" in r.stderr and message in r.stderr and "hint:" in r.stderr and hint in r.stderr
        assert "Traceback" not in r.output and not out.exists()
    with pytest.raises(UsageError):
        weights_for(Method("decay"), 1)
    with pytest.raises(UsageError, match="unknown decay shape"):  # the CLI refuses it at parse time
        weights_for(Method("decay", shape="exp"), 3)


@pytest.mark.parametrize("shape, steps, dtype", [
    ("linear", (1000, 2000, 3000, 4000, 5000), torch.float16),
    ("cosine", (1000, 2000, 3000, 4000, 5000), torch.bfloat16),
    ("1-sqrt", (1000, 2000, 4000, 8000), torch.float32),  # unequal spacing
    ("cosine", (100, 300, 400, 1000), torch.float16),  # unequal spacing
])
def test_merge_through_the_cli_equals_the_reference(tmp_path, shape, steps, dtype):
    root, sds = make_run(tmp_path / "run", steps=steps, dtype=dtype)
    r = runner.invoke(app, ["average", str(root), "--method", "decay", "--shape", shape,
                            "-o", str(tmp_path / "out"), "--json"])
    assert r.exit_code == 0, r.output
    u = [(s - steps[0]) / (steps[-1] - steps[0]) for s in steps]
    w = expected_weights(shape, u)
    d = json.loads(r.stdout)
    assert d["plan"]["method"] == f"decay(shape={shape})"
    assert d["plan"]["weights"] == pytest.approx(w, abs=1e-12)
    check_against_reference(tmp_path / "out", sds, w)  # 1 ulp, as for every other method
    manifest = json.loads((tmp_path / "out" / "merger.json").read_text())
    assert manifest["method"] == f"decay(shape={shape})"
    assert manifest["weights"] == pytest.approx(w, abs=1e-12)


def test_dry_run_json_shows_the_weights(tiny_run, tmp_path):
    root, _ = tiny_run  # step1000, step2000, step3000
    r = runner.invoke(app, ["average", str(root), "--method", "decay", "--shape", "cosine",
                            "-o", str(tmp_path / "o"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    w = [0.5 - 1 / math.pi, 2 / math.pi, 0.5 - 1 / math.pi]
    assert d["method"] == "decay(shape=cosine)" and d["weights"] == pytest.approx(w, abs=1e-15)
    assert [i["weight"] for i in d["inputs"]] == pytest.approx(w, abs=1e-15)
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["average", str(root), "--method", "decay", "--dry-run"])  # the table
    assert r.exit_code == 0 and "decay(shape=linear)" in r.stdout and "0.500000" in r.stdout
    r = runner.invoke(app, ["average", "--help"])
    assert "1-sqrt" in r.stdout and "--shape" in r.stdout


def test_sweep_decay_state_matches_the_reference(tmp_path):
    """The sweep's decay point: the float64 sum of the window with the decay weights, within
    1 ulp of the reference (identical buffers bit for bit, integer masks exactly)."""
    steps = (1, 2, 4, 8)
    root, sds = make_run(tmp_path / "run", steps=steps)  # float16, Pythia's buffers
    sources = resolve_local([str(root)], None, None)
    from merger.formats import read_checkpoint as read_folder

    for shape in ("linear", "1-sqrt"):
        ours = decay_state(sources, [read_folder(s.path) for s in sources], shape)
        w = expected_weights(shape, [(s - 1) / 7 for s in steps])
        for k, r in reference(sds, w).items():
            if not sds[0][k].is_floating_point() or all(torch.equal(sd[k], sds[0][k]) for sd in sds):
                assert torch.equal(ours[k], sds[-1][k]), k
                continue

            def bound(k=k, w=w):
                return len(sds) * EPS[torch.float32] * sum(abs(x) * sd[k].double().abs() for x, sd in zip(w, sds))

            assert ours[k].dtype == sds[0][k].dtype
            assert_close_ulp(ours[k], r, ulps=1.0, name=k, acc_bound=bound)


# -- merger sweep -m ...,decay on a real tiny training trajectory -----------------------------
SWEEP_REPO = "local/tiny-sweep-decay"


@pytest.fixture(scope="module")
def trajectory():
    from helpers.sweepfixtures import train_trajectory

    return train_trajectory(repo_id=SWEEP_REPO, steps=30, save_every=5)


def _sweep_app():
    from merger.cli import app

    return app


@pytest.mark.slow  # a sweep and a merge of a trained run (~3 s)
def test_sweep_decay_point_equals_merger_average(trajectory, tmp_path, monkeypatch):
    """The decay point at step30 (K=3, cosine) is `merger average -r step20,step25,step30
    --method decay --shape cosine`: tensors within 1 ulp, metric to 1e-6."""
    from merger.api import average
    from merger.sources import resolve
    from merger.formats import read_checkpoint as read_folder
    from merger.plan import Options
    from merger.eval.scoring import HeldoutScorer
    from merger.eval.state import read_state_dict

    monkeypatch.setenv("COLUMNS", "200")
    args = ["sweep", SWEEP_REPO, "-r", "step15..step30", "--every", "5", "-k", "3", "--limit", "4",
            "--device", "cpu", "-m", "uniform,decay", "--shape", "cosine"]
    res = runner.invoke(_sweep_app(), [*args, "-o", str(tmp_path / "s"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["series"] == ["raw", "uniform", "decay"] and d["options"]["shape"] == "cosine"
    assert [p["scores"]["decay"] is None for p in d["points"]] == [True, True, False, False]
    assert d["points"][-1]["window"] == ["step20", "step25", "step30"]

    average([SWEEP_REPO], revisions="step20,step25,step30", output=tmp_path / "m",
            options=Options(method=Method("decay", shape="cosine")))
    merged = read_state_dict(tmp_path / "m")
    window = resolve([SWEEP_REPO], "step20,step25,step30", None)
    ours = decay_state(window, [read_folder(s.path) for s in window], "cosine")
    assert set(ours) == set(merged)
    for k, v in ours.items():
        assert v.dtype == merged[k].dtype == torch.float32
        assert_close_ulp(v, merged[k].double(), ulps=1.0, name=k)
    expected = HeldoutScorer(tmp_path / "m", limit=4).score(merged)["bits_per_byte"]
    assert math.isclose(d["points"][-1]["scores"]["decay"]["bits_per_byte"], expected, rel_tol=1e-6)

    res = runner.invoke(_sweep_app(), [*args, "-o", str(tmp_path / "t")])  # the table
    assert res.exit_code == 0, res.output
    assert "decay K=3 cosine" in res.stdout and "LAWA K=3" in res.stdout


@pytest.mark.parametrize("extra, message", [
    (["-k", "2", "--shape", "cosine"], "needs decay in --methods"),
    (["-k", "1", "-m", "decay"], "--method decay needs at least 2 checkpoints"),
])
def test_sweep_decay_errors_exit_1(trajectory, tmp_path, extra, message):
    out = tmp_path / "o"
    res = runner.invoke(_sweep_app(), ["sweep", SWEEP_REPO, "-r", "step5..step30", "--limit", "1",
                                       "-o", str(out), *extra])
    assert res.exit_code == 1, res.output
    assert "Error:" in res.stderr and message in res.stderr and "Traceback" not in res.output
    assert not out.exists()
