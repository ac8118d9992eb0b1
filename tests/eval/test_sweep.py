"""`merger sweep` on a real tiny training trajectory in the offline HF cache.

Outputs and point counts; the averaged points against `merger average` on the same window
(tensors within one ulp, metric to 1e-6); the sliding sum against the naive fp64 reference on
Pythia-shaped checkpoints (fp16, -inf and uint8 buffers, a tensor that starts moving late);
lm-eval agreeing with the in-process metric; errors exit 1 before any work.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import typer
from helpers import EPS, assert_close_ulp, make_run, reference
from helpers.sweepfixtures import REPO_ID, train_trajectory
from typer.testing import CliRunner

from merger.api import average

from merger.sources import resolve
from merger.errors import TensorError, UsageError
from merger.plan.methods import Method
from merger.plan import Options
from merger.sources.local import resolve_local
from merger.eval.scoring import HeldoutScorer
from merger.eval.state import read_state_dict
from merger.eval.sweep import SweepOptions, sliding_states, sweep
from merger.testing.synth import save_checkpoint

pytestmark = pytest.mark.slow  # trains and scores tiny models, lm-eval on the sweep (~15 s)

LIMIT = 8  # held-out passages: ~10k byte tokens, about 0.1 s per point for the tiny model
DECAY = 0.7
SPEC = "step5..step40"
STEPS = list(range(5, 45, 5))


@pytest.fixture(scope="module")
def trajectory():
    """step5 .. step40 of a tiny GPT-NeoX trained at a high LR, as revisions of local/tiny-sweep."""
    return train_trajectory()


@pytest.fixture(scope="module")
def result(trajectory, tmp_path_factory):
    opts = SweepOptions(window=3, methods=("uniform", "ema"), decay=DECAY, limit=LIMIT,
                        device="cpu")
    return sweep(REPO_ID, revisions=SPEC, every=5, options=opts,
                 output_dir=tmp_path_factory.mktemp("sweep"))


def _app() -> typer.Typer:
    from merger.cli import app

    return app


def test_outputs_and_points(result, trajectory):
    assert trajectory == [f"step{s}" for s in STEPS]
    pts = result.points
    assert [p.step for p in pts] == STEPS and result.metric == "bits_per_byte"
    # raw and EMA at every step; the LAWA average only where K=3 checkpoints end at the step
    assert [p.scores["uniform"] is None for p in pts] == [True, True] + [False] * 6
    assert all(p.scores["raw"] and p.scores["ema"] for p in pts)
    assert pts[2].window == ["step5", "step10", "step15"]
    assert pts[-1].window == ["step30", "step35", "step40"]
    assert pts[0].scores["ema"] == pts[0].scores["raw"]  # e_1 = x_1
    for s in (s for p in pts for s in p.scores.values() if s):
        assert 2.0 < s["bits_per_byte"] < 9.0
        assert math.isclose(s["byte_perplexity"], 2 ** s["bits_per_byte"], rel_tol=1e-9)
    first, last = pts[0].scores["raw"], pts[-1].scores["raw"]
    assert last["bits_per_byte"] < first["bits_per_byte"] - 0.3  # it learned

    files = {k: Path(v) for k, v in result.files.items()}
    rows = list(csv.DictReader(files["csv"].open()))
    assert len(rows) == 8 and rows[0]["uniform_bits_per_byte"] == ""
    assert rows[2]["window_start"] == "step5" and rows[2]["window_end"] == "step15"
    assert float(rows[-1]["uniform_bits_per_byte"]) == pts[-1].scores["uniform"]["bits_per_byte"]
    d = json.loads(files["json"].read_text())
    assert len(d["points"]) == 8 and d["options"]["window"] == 3
    assert d["series"] == ["raw", "uniform", "ema"] and d["higher_is_better"] is False
    assert d["points"][-1]["scores"]["ema"] == pts[-1].scores["ema"]
    assert d["evaluation"]["passages"] == LIMIT and d["evaluation"]["max_length"] == 128
    png = files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # each checkpoint read at most twice: entering and leaving the window
    sizes = [(Path(s.path) / "model.safetensors").stat().st_size
             for s in resolve([REPO_ID], SPEC, 5)]
    assert sum(sizes) < result.read_bytes <= 2 * sum(sizes)


def test_average_equals_merger_average(result, tmp_path):
    """The LAWA point at step30 is `merger average -r step20,step25,step30`: tensors within
    1 ulp, metric to 1e-6; the EMA point is `merger average --method ema` over step5..step30."""
    st = list(sliding_states(resolve([REPO_ID], "step5..step30", 5), 3, decay=DECAY))[-1]
    assert st.source.name == "step30"
    assert [s.name for s in st.window] == ["step20", "step25", "step30"]
    average([REPO_ID], revisions="step20,step25,step30", output=tmp_path / "lawa")
    average([REPO_ID], revisions="step5..step30", every=5, output=tmp_path / "ema",
            options=Options(method=Method("ema", decay=DECAY)))
    scorer = HeldoutScorer(tmp_path / "lawa", limit=LIMIT)
    point = next(p for p in result.points if p.step == 30)
    for series, folder in (("uniform", tmp_path / "lawa"), ("ema", tmp_path / "ema")):
        merged = read_state_dict(folder)
        ours = getattr(st, series)
        assert set(merged) == set(ours)
        for k, v in ours.items():
            assert v.dtype == merged[k].dtype == torch.float32
            assert_close_ulp(v, merged[k].double(), ulps=1.0, name=f"{series} {k}")
        expected = scorer.score(merged)["bits_per_byte"]
        assert math.isclose(point.scores[series]["bits_per_byte"], expected, rel_tol=1e-6), series


def test_sliding_sum_matches_reference(tmp_path):
    """Windows of Pythia-shaped fp16 checkpoints (uint8 masks, -inf masked_bias, inv_freq)
    against the naive fp64 weighted sum, with a tensor that first moves once the window is full."""
    steps = (1, 2, 3, 4, 5, 6)
    root, sds = make_run(tmp_path / "run", steps=steps)
    late = "gpt_neox.layers.0.attention.dense.bias"
    for i, s in enumerate(steps[1:4], 1):  # identical in steps 1..4, moves at step 5
        sds[i][late] = sds[0][late]
        save_checkpoint(root / f"step{s}", sds[i])
    sources = resolve_local([str(root)], None, None)
    n_read = []
    states = list(sliding_states(sources, 3, decay=0.5, counter=n_read.append))
    assert [s.uniform is None for s in states] == [True, True, False, False, False, False]
    total = sum((root / f"step{s}" / "model.safetensors").stat().st_size for s in steps)
    assert sum(n_read) <= 2 * total
    for i, st in enumerate(states):
        if st.uniform is not None:
            _close(st.uniform, sds[i - 2: i + 1], [1 / 3] * 3)
        w = [0.5 ** i] + [0.5 * 0.5 ** (i - j) for j in range(1, i + 1)]  # EMA weights over 0..i
        _close(st.ema, sds[: i + 1], w)
        assert all(torch.equal(st.raw[k], sds[i][k]) for k in sds[i])


def _close(ours, sds, weights):
    """Within 1 ulp of the fp64 reference (or the accumulation bound where the sum cancels);
    tensors identical in every input, bit for bit; integer tensors exactly."""
    for k, r in reference(sds, weights).items():
        if not sds[0][k].is_floating_point():
            assert torch.equal(ours[k], r), k
            continue
        if all(torch.equal(_bytes(sd[k]), _bytes(sds[0][k])) for sd in sds[1:]):
            assert torch.equal(_bytes(ours[k]), _bytes(sds[0][k])), k
            continue

        def bound(k=k):
            terms = (abs(w) * sd[k].double().abs() for w, sd in zip(weights, sds))
            return len(sds) * EPS[torch.float32] * sum(terms)

        assert_close_ulp(ours[k], r, ulps=1.0, name=k, acc_bound=bound)


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def test_differing_integer_buffer_is_an_error(tmp_path):
    root, sds = make_run(tmp_path / "run", steps=(1, 2))
    mask = "gpt_neox.layers.0.attention.bias"
    sds[1][mask] = 1 - sds[1][mask]
    save_checkpoint(root / "step2", sds[1])
    with pytest.raises(TensorError, match="not floating and differs"):
        list(sliding_states(resolve_local([str(root)], None, None), 2))


def test_cli_json_and_table(trajectory, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["sweep", REPO_ID, "-r", "step30..step40", "--every", "5", "-k", "2", "--limit", "4",
            "--device", "cpu"]
    res = CliRunner().invoke(_app(), [*args, "-o", str(tmp_path / "j"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert [p["step"] for p in d["points"]] == [30, 35, 40]
    assert d["points"][0]["scores"]["uniform"] is None and d["series"] == ["raw", "uniform"]
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == \
        ["sweep.csv", "sweep.json", "sweep.png"]
    res = CliRunner().invoke(_app(), [*args, "-o", str(tmp_path / "t"),
                                      "--methods", "uniform,ema", "--decay", "0.5"])
    assert res.exit_code == 0, res.output
    assert "LAWA K=2" in res.stdout and "EMA b=0.5" in res.stdout and "step40" in res.stdout
    assert "bits_per_byte" in res.stdout and "[3/3] step40" in res.stderr


@pytest.mark.parametrize("extra, message", [
    (["-k", "9"], "--window 9 is larger than the 8 revisions"),
    (["-k", "0"], "--window 0: must be at least 1"),
    (["-k", "2", "--methods", "ema"], "--method ema needs --decay"),
    (["-k", "2", "--decay", "0.9"], "needs ema in --methods"),
    (["-k", "2", "--metric", "acc"], "--metric acc: the held-out metrics are"),
])
def test_bad_input_exits_1(trajectory, tmp_path, extra, message):
    out = tmp_path / "o"
    args = ["sweep", REPO_ID, "-r", SPEC, "--every", "5", "--limit", "1", "-o", str(out), *extra]
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 1, res.output
    assert "Error:" in res.stderr and message in res.stderr and "Traceback" not in res.output
    assert not out.exists()  # refused before any work


def test_window_error_names_the_fix(trajectory, tmp_path):
    with pytest.raises(UsageError) as e:
        sweep(REPO_ID, revisions="step30..step40", every=5, output_dir=tmp_path,
              options=SweepOptions(window=4))
    assert "3 revisions selected by --revisions step30..step40 --every 5" in e.value.message
    assert "--window 3 or less" in e.value.hint


@pytest.mark.slow  # lm-eval at every sweep point (~5 s)
def test_lm_eval_tasks_agree_with_in_process_metric(trajectory, tmp_path):
    """--tasks merger_pydocs_ppl through lm-eval gives the in-process numbers (same windows)."""
    opts = dict(window=2, methods=("uniform", "ema"), decay=DECAY, limit=2, device="cpu")
    ours = sweep(REPO_ID, revisions="step35..step40", every=5, output_dir=tmp_path / "a",
                 options=SweepOptions(**opts))
    lm = sweep(REPO_ID, revisions="step35..step40", every=5, output_dir=tmp_path / "b",
               options=SweepOptions(**opts, tasks=("merger_pydocs_ppl",)))
    assert lm.metric == "merger_pydocs_ppl/bits_per_byte" and lm.higher_is_better is False
    for a, b in zip(ours.points, lm.points):
        for s in ("raw", "uniform", "ema"):
            if a.scores[s] is None:
                assert b.scores[s] is None
                continue
            for m in ("bits_per_byte", "word_perplexity"):
                lm_value = b.scores[s][f"merger_pydocs_ppl/{m}"]
                assert math.isclose(a.scores[s][m], lm_value, rel_tol=1e-6), (s, m, lm_value)
