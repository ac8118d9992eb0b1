"""`merger sweep`, `merger eval` and `merger average --eval` on a nanoGPT / LAWA run of
``ckpt_<step>.pt`` files, with ``--tokenizer``.

`merger eval` of a ``.pt`` (a raw checkpoint, or the ``ckpt.pt`` a merge writes) gives exactly the
numbers of the `--to hf` folder of the same weights; `merger average --eval` the same again.

Each point's metric is checked against the `merger average --to hf` folder of the same window
(whose logits equal nanoGPT's own: tests/formats/test_nanogpt.py), scored by the held-out scorer
(rel 1e-6); lm-eval's merger_pydocs_ppl gives the in-process numbers; a Hugging Face run swept with
``--tokenizer`` (its own tokenizer, elsewhere) gives the numbers it gives without; bad inputs exit 1
before any output.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from merger.cli import app
from merger.eval.scoring import HeldoutScorer
from merger.eval.state import read_state_dict
from merger.eval.sweep import SweepOptions, sweep
from merger.sources.local import resolve_local
from merger.testing.nanogpt import nanogpt_run
from merger.testing.tokenizer import save_byte_tokenizer
from helpers.sweepfixtures import REPO_ID, train_trajectory

pytestmark = pytest.mark.slow  # nanoGPT runs scored as GPT-2, lm-eval (~8 s)

runner = CliRunner()
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=257, bias=True, dropout=0.0)
LIMIT = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """ckpt_100.pt .. ckpt_500.pt of a byte-vocabulary nanoGPT, and the byte tokenizer's folder."""
    root = tmp_path_factory.mktemp("nanogpt-sweep")
    save_byte_tokenizer(root / "tok")
    return nanogpt_run(root / "out", ARGS, lr=1e-2), root / "tok"


def _hf(run, tok, spec: str, out):
    """`merger average RUN -r SPEC --to hf` with the tokenizer beside it: the model the sweep scores."""
    r = runner.invoke(app, ["average", str(run), "-r", spec, "--to", "hf", "-o", str(out)])
    assert r.exit_code == 0, r.output
    save_byte_tokenizer(out)
    return out


def test_sweep_of_pt_run_scores_the_to_hf_models(run, tmp_path):
    run_dir, tok = run
    r = runner.invoke(app, ["sweep", str(run_dir), "-r", "300..500", "-k", "2", "-m", "uniform,ema", "--decay",
                            "0.5", "--tokenizer", str(tok), "--limit", str(LIMIT), "-o", str(tmp_path / "sw"),
                            "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [p["revision"] for p in res["points"]] == ["ckpt_300", "ckpt_400", "ckpt_500"]
    assert res["evaluation"]["kind"] == "in-process" and res["evaluation"]["texts"]
    last = res["points"][-1]
    assert last["window"] == ["ckpt_400", "ckpt_500"]
    raw = _hf(run_dir, tok, "500", tmp_path / "raw")
    lawa = _hf(run_dir, tok, "400..500", tmp_path / "lawa")
    scorer = HeldoutScorer(lawa, limit=LIMIT)
    for series, folder in (("raw", raw), ("uniform", lawa)):
        expected = scorer.score(read_state_dict(folder))
        for m in ("bits_per_byte", "word_perplexity"):
            assert math.isclose(last["scores"][series][m], expected[m], rel_tol=1e-6), (series, m)
    assert res["points"][0]["scores"]["uniform"] is None  # K=2: no window ends at the first step
    assert not list(tmp_path.glob("sw/.sweep-*")) and sorted(p.name for p in (tmp_path / "sw").iterdir()) == [
        "sweep.csv", "sweep.json", "sweep.png"]


@pytest.mark.slow  # lm-eval on every checkpoint of a run (~3 s)
def test_lm_eval_agrees_on_a_pt_run(run, tmp_path):
    """--tasks merger_pydocs_ppl (lm-eval, on temporary GPT-2 folders) gives the in-process numbers."""
    run_dir, tok = run
    sources = resolve_local([str(run_dir)], "400..500", None)
    opts = dict(window=2, limit=2, device="cpu", tokenizer=str(tok))
    ours = sweep(str(run_dir), sources=sources, output_dir=tmp_path / "a", options=SweepOptions(**opts))
    lm = sweep(str(run_dir), sources=sources, output_dir=tmp_path / "b",
               options=SweepOptions(**opts, tasks=("merger_pydocs_ppl",)))
    for a, b in zip(ours.points, lm.points):
        for s in ("raw", "uniform"):
            if a.scores[s] is None:
                assert b.scores[s] is None
                continue
            assert math.isclose(a.scores[s]["bits_per_byte"], b.scores[s]["merger_pydocs_ppl/bits_per_byte"],
                                rel_tol=1e-6), s


def test_tokenizer_option_on_a_hf_run_changes_nothing_but_where_it_comes_from(tmp_path):
    train_trajectory()
    from merger.sources import resolve

    sources = resolve([REPO_ID], "step35..step40", 5)
    save_byte_tokenizer(tmp_path / "tok")
    opts = dict(window=2, limit=2, device="cpu")
    own = sweep(REPO_ID, sources=sources, output_dir=tmp_path / "a", options=SweepOptions(**opts))
    given = sweep(REPO_ID, sources=sources, output_dir=tmp_path / "b",
                  options=SweepOptions(**opts, tokenizer=str(tmp_path / "tok")))
    assert [p.scores for p in own.points] == [p.scores for p in given.points]


def test_bad_inputs_exit_1_before_any_output(run, tmp_path):
    run_dir, tok = run
    out = tmp_path / "sw"
    r = runner.invoke(app, ["sweep", str(run_dir), "-k", "2", "-o", str(out)])
    assert r.exit_code == 1 and "carries no tokenizer" in r.stderr and "--tokenizer" in r.stderr, r.output
    assert "Traceback" not in r.output and not out.exists()
    r = runner.invoke(app, ["sweep", str(run_dir), "-k", "2", "-o", str(out), "--tokenizer", str(tmp_path / "no")])
    assert r.exit_code == 1 and "--tokenizer" in r.stderr and "can't load a tokenizer" in r.stderr, r.output
    assert not out.exists()
    other = tmp_path / "other"  # a .pt run of another model: no nanoGPT GPT-2 to build
    other.mkdir()
    for step in (1, 2):
        torch.save({"model": {"encoder.weight": torch.randn(4, 4)}, "model_args": {"n_layer": 1}},
                   other / f"ckpt_{step}.pt")
    r = runner.invoke(app, ["sweep", str(other), "-k", "2", "-o", str(out), "--tokenizer", str(tok)])
    assert r.exit_code == 1 and "nanoGPT" in r.stderr and "Traceback" not in r.output, r.output
    assert not out.exists()
    import torch.distributed.checkpoint as dcp

    for step in (1, 2):  # a DCP run: no model transformers can build from it
        dcp.save({"model": {"w": torch.randn(4, 4)}}, checkpoint_id=tmp_path / "dcp" / f"step-{step}", no_dist=True)
    r = runner.invoke(app, ["sweep", str(tmp_path / "dcp"), "-k", "2", "-o", str(out), "--tokenizer", str(tok)])
    assert r.exit_code == 1 and "a dcp checkpoint" in r.stderr and "Traceback" not in r.output, r.output
    assert not out.exists()


def _eval(args: list[str]) -> dict:
    r = runner.invoke(app, ["eval", *args, "--tasks", "merger_pydocs_ppl", "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    models = json.loads(r.stdout)["models"]
    return {m["model"]: m["scores"]["merger_pydocs_ppl"]["bits_per_byte"]["value"] for m in models}


@pytest.mark.slow  # lm-eval on .pt files and their --to hf folders (~5 s)
def test_eval_of_pt_files_equals_eval_of_their_hf_folders(run, tmp_path):
    run_dir, tok = run
    merged = tmp_path / "merged"  # the default output of a .pt merge: merged/ckpt.pt
    r = runner.invoke(app, ["average", str(run_dir), "-r", "400..500", "-o", str(merged)])
    assert r.exit_code == 0 and (merged / "ckpt.pt").is_file(), r.output
    raw_hf, lawa_hf = _hf(run_dir, tok, "500", tmp_path / "raw"), _hf(run_dir, tok, "400..500", tmp_path / "lawa")
    pt = _eval([str(run_dir / "ckpt_500.pt"), str(merged), "--tokenizer", str(tok)])
    hf = _eval([str(raw_hf), str(lawa_hf)])
    assert list(pt.values()) == list(hf.values()) and len(set(hf.values())) == 2, (pt, hf)
    out = tmp_path / "with-eval"
    r = runner.invoke(app, ["average", str(run_dir), "-r", "400..500", "-o", str(out), "--eval", "--tokenizer",
                            str(tok), "--tasks", "merger_pydocs_ppl", "--limit", "2", "--json"])
    assert r.exit_code == 0, r.output
    models = json.loads(r.stdout)["eval"]["models"]
    assert [m["scores"]["merger_pydocs_ppl"]["bits_per_byte"]["value"] for m in models] == list(hf.values())
    assert models[0]["path"] == str(run_dir / "ckpt_500.pt") and (out / "eval" / "summary.json").is_file()


def test_eval_of_a_pt_needs_a_tokenizer_and_a_gpt2(run, tmp_path):
    run_dir, tok = run
    r = runner.invoke(app, ["eval", str(run_dir / "ckpt_500.pt"), "--limit", "2"])
    assert r.exit_code == 1 and "carries no tokenizer" in r.stderr and "--tokenizer" in r.stderr, r.output
    out = tmp_path / "o"
    r = runner.invoke(app, ["average", str(run_dir), "-r", "400..500", "-o", str(out), "--eval"])
    assert r.exit_code == 1 and "carries no tokenizer" in r.stderr and not out.exists(), r.output
    torch.save({"model": {"encoder.weight": torch.randn(4, 4)}, "model_args": {"n_layer": 1}}, tmp_path / "x.pt")
    r = runner.invoke(app, ["eval", str(tmp_path / "x.pt"), "--tokenizer", str(tok), "--limit", "2"])
    assert r.exit_code == 1 and "nanoGPT" in r.stderr and "Traceback" not in r.output, r.output
