"""``merger eval``: the real lm-eval-harness on tiny GPT-NeoX models, offline, no mocks.

A model trained for a few hundred steps on the Python-docs train split must beat the same
architecture with random weights on the held-out perplexity task; files, table, ``--json``,
``REPO_ID@REVISION`` from an offline hub cache and the error paths are checked on the way.
"""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
import torch
import typer
from helpers.evalfixtures import random_model, trained_model
from rich.console import Console
from typer.testing import CliRunner

from merger.errors import EvalError, UsageError
from merger.eval.harness import Score, evaluate, parse_scores
from merger.cli.eval import eval_table
from merger.testing.hubcache import write_cache_revision
from merger.eval.tasks import DEFAULT_TASKS, MC_TASK, PPL_TASK, build_data, task_pack_dir
from merger.eval.textdata import split_docs

pytestmark = pytest.mark.slow  # lm-eval-harness on trained models (a module fixture trains them: ~40 s in all)

LIMIT = 8  # documents per task: enough to separate trained from random perplexity, fast
PPL_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network, merger's cache in a temp folder, one torch thread (the CI box has 2 shared
    cores: 2 OpenMP threads under contention run tiny models 30x slower than 1)."""
    mp = pytest.MonkeyPatch()
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "MERGER_CACHE": str(tmp_path_factory.mktemp("merger-cache"))}.items():
        mp.setenv(k, v)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"random": random_model(root / "random"), "trained": trained_model(root / "trained")}


@pytest.fixture(scope="module")
def report(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    return evaluate([str(models["random"]), str(models["trained"])], limit=LIMIT, output_dir=out)


def test_task_pack_is_deterministic_heldout_and_self_contained(tmp_path):
    assert build_data() == build_data()
    folder = task_pack_dir(tmp_path)
    assert task_pack_dir(tmp_path) == folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{t}.{ext}" for t in DEFAULT_TASKS for ext in ("jsonl", "yaml")])
    for task in DEFAULT_TASKS:
        yaml_text = (folder / f"{task}.yaml").read_text()
        assert f"task: {task}" in yaml_text
        assert json.dumps(str(folder / f"{task}.jsonl")) in yaml_text  # absolute data path
    train, held = split_docs()
    ppl = [json.loads(x) for x in (folder / f"{PPL_TASK}.jsonl").read_text().splitlines()]
    mc = [json.loads(x) for x in (folder / f"{MC_TASK}.jsonl").read_text().splitlines()]
    assert len(ppl) > 100 and len(mc) > 300
    assert {r["title"] for r in ppl + mc} <= set(held) and not set(held) & set(train)
    flat = {t: " ".join(v.split()) for t, v in held.items()}
    for r in mc:
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["gold"] < 4
        assert r["context"] + r["choices"][r["gold"]] in flat[r["title"]]  # the true continuation
        assert all(c.startswith(" ") and len(c) <= 96 for c in r["choices"])
    assert {r["gold"] for r in mc} == {0, 1, 2, 3}


def test_trained_model_beats_random_on_heldout_perplexity(report):
    random_row, trained_row = report.rows
    assert report.n_samples == {PPL_TASK: LIMIT, MC_TASK: LIMIT}
    for row in report.rows:
        for s in row.scores:
            assert math.isfinite(s.value), s
    for metric in PPL_METRICS:
        r, t = random_row.score(PPL_TASK, metric), trained_row.score(PPL_TASK, metric)
        assert t.value < r.value, metric
        assert report.delta(trained_row, PPL_TASK, metric) == pytest.approx(t.value - r.value)
        assert report.higher_is_better[PPL_TASK][metric] is False
    # random weights: near-uniform over the 512-way softmax, so ~9 bits per byte
    assert 8.5 < random_row.score(PPL_TASK, "bits_per_byte").value < 9.5
    assert trained_row.score(PPL_TASK, "bits_per_byte").value < 5.0  # measured: ~3.6


def test_multiple_choice_scores_are_valid_accuracies(report):
    # A 2-layer byte model barely uses the context across the cut: on all 420 items both models
    # sit at chance (measured 0.25 vs 0.25). So only validity is asserted, plus "not worse than
    # random beyond noise" (3 standard errors) as a guard against a broken task.
    random_row, trained_row = report.rows
    for row in report.rows:
        for metric in ("acc", "acc_norm"):
            s = row.score(MC_TASK, metric)
            assert s.value * LIMIT == pytest.approx(round(s.value * LIMIT))  # k correct of LIMIT
            p = s.value
            assert s.stderr == pytest.approx(math.sqrt(p * (1 - p) / (LIMIT - 1)))
    r, t = random_row.score(MC_TASK, "acc_norm"), trained_row.score(MC_TASK, "acc_norm")
    assert t.value >= r.value - 3 * max(r.stderr, t.stderr, 1 / LIMIT)


def test_results_files_and_summary(report, models):
    out = report.output_dir
    files = {r.results_file for r in report.rows}
    assert files == {f"{out}/random.json", f"{out}/trained.json"}
    full = json.loads(open(f"{out}/trained.json").read())
    assert set(DEFAULT_TASKS) <= set(full["results"])
    assert full["results"][PPL_TASK]["byte_perplexity,none"] == pytest.approx(
        report.rows[1].score(PPL_TASK, "byte_perplexity").value)
    assert full["config"]["limit"] == LIMIT
    assert full["merger"]["source"]["path"] == str(models["trained"])
    summary = json.loads(open(f"{out}/summary.json").read())
    assert summary == json.loads(json.dumps(report.to_dict()))
    assert summary["baseline"] == str(models["random"])
    assert summary["models"][0]["scores"][PPL_TASK]["byte_perplexity"]["delta"] == 0.0
    on_gpu = torch.cuda.is_available()  # device="auto"; dtype None: float32 on CPU, "auto" on GPU
    assert summary["config"]["device"] == ("cuda" if on_gpu else "cpu")
    assert summary["config"]["dtype"] == ("auto" if on_gpu else "float32")


def test_parse_scores_reads_metric_filter_keys():
    results = {"results": {"gsm": {"alias": "gsm", "exact_match,strict-match": 0.5,
                                   "exact_match_stderr,strict-match": 0.1, "acc,none": 0.25,
                                   "acc_stderr,none": "N/A", "sample_len": 4}},
               "groups": {"grp": {"acc,none": 1.0, "acc_stderr,none": 0.0}}}
    scores = parse_scores(results)
    assert scores == [Score("gsm", "exact_match", "strict-match", 0.5, 0.1),
                      Score("gsm", "acc", "none", 0.25, None),
                      Score("grp", "acc", "none", 1.0, 0.0)]
    assert [s.name for s in scores] == ["exact_match,strict-match", "acc", "acc"]


def test_eval_table_shows_values_stderr_and_deltas(report):
    console = Console(width=250, record=True, color_system=None)
    console.print(eval_table(report))
    text = console.export_text()
    assert "baseline" in text and "random" in text and "trained" in text
    for metric in (*PPL_METRICS, "acc", "acc_norm"):
        assert metric in text
    assert "±" in text  # the accuracies have a standard error
    bpb = report.delta(report.rows[1], PPL_TASK, "bits_per_byte")
    assert f"{bpb:.4f}" in text and bpb < 0  # deltas as ui.number writes them


def _app() -> typer.Typer:
    from merger.cli import app

    return app


def test_cli_table_and_json(models, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    runner = CliRunner()
    args = ["eval", str(models["random"]), str(models["trained"]), "--tasks", PPL_TASK,
            "--limit", "2", "--batch-size", "4", "--device", "cpu"]
    res = runner.invoke(_app(), [*args, "--output-dir", str(tmp_path / "t")])
    assert res.exit_code == 0, res.output
    assert "bits_per_byte" in res.stdout and "baseline" in res.stdout and "trained" in res.stdout
    assert "full lm-eval results" in res.stderr and "full lm-eval results" not in res.stdout

    res = runner.invoke(_app(), [*args, "--json", "--output-dir", str(tmp_path / "j")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # stdout is pure JSON: lm-eval's prints and bars went to stderr
    assert [m["model"] for m in doc["models"]] == [str(models["random"]), str(models["trained"])]
    assert doc["config"]["limit"] == 2 and doc["config"]["tasks"] == [PPL_TASK]
    ppl = [m["scores"][PPL_TASK]["byte_perplexity"] for m in doc["models"]]
    assert ppl[0]["delta"] == 0 and ppl[1]["delta"] < 0
    assert (tmp_path / "j" / "summary.json").is_file()


def test_cli_help_has_an_example():
    res = CliRunner().invoke(_app(), ["eval", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for flag in ("--tasks", "--limit", "--num-fewshot", "--batch-size", "--device", "--dtype",
                 "--output-dir", "--include-path", "--json"):
        assert flag in res.stdout
    assert "merger eval EleutherAI/pythia-70m@step143000" in res.stdout


def test_hub_revision_from_offline_cache(models, report, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    commit = write_cache_revision(cache, "local/tiny-neox", "step300", models["trained"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # merger reads it at call time
    hub = evaluate(["local/tiny-neox@step300"], tasks=[PPL_TASK], limit=LIMIT)
    src = hub.rows[0].source
    assert (src.repo_id, src.revision, src.commit) == ("local/tiny-neox", "step300", commit)
    assert src.path.endswith(f"snapshots/{commit}")
    # the same weights on the same documents: the same number as from the local folder
    assert hub.rows[0].score(PPL_TASK, "byte_perplexity").value == pytest.approx(
        report.rows[1].score(PPL_TASK, "byte_perplexity").value, rel=1e-6)
    with pytest.raises(EvalError, match="step999"):
        evaluate(["local/tiny-neox@step999"], tasks=[PPL_TASK], limit=1)


def test_not_a_model_folder(tmp_path, models):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalError, match="no config.json") as e:
        evaluate([str(models["trained"]), str(empty)], limit=1)
    assert e.value.hint
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="no weights"):
        evaluate([str(tmp_path / "noweights")], limit=1)
    with pytest.raises(EvalError, match="no such folder"):
        evaluate([str(tmp_path / "missing")], limit=1)
    res = CliRunner().invoke(_app(), ["eval", str(empty), "--limit", "1"])
    assert res.exit_code == 1 and "Error:" in res.stderr and "no config.json" in res.stderr
    assert "Traceback" not in res.output


def test_unknown_task_names_the_default_pack(models):
    with pytest.raises(EvalError, match="unknown task: merger_pydocs_pll") as e:
        evaluate([str(models["trained"])], tasks=["merger_pydocs_pll"], limit=1)
    assert all(t in e.value.hint for t in DEFAULT_TASKS)
    assert "did you mean" in e.value.message and PPL_TASK in e.value.message


def test_bad_options_and_missing_lm_eval(models, monkeypatch):
    with pytest.raises(UsageError, match="--limit"):
        evaluate([str(models["trained"])], limit=0)
    with pytest.raises(UsageError, match="--batch-size"):
        evaluate([str(models["trained"])], batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="cuda:7"):
            evaluate([str(models["trained"])], device="cuda:7")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(EvalError, match="lm-eval") as e:
        evaluate([str(models["trained"])], limit=1)
    assert re.search(r"pip install .lm-eval\[hf\]", e.value.hint)


def test_a_model_whose_context_is_shorter_than_an_answer_is_a_clear_error(tmp_path):
    """lm-eval asserts that an answer fits the model's context; a 64-token model on the built-in
    pack gets merger's error (what, which tasks, how to fix), exit 1, no traceback."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from helpers.evalfixtures import save, tiny_neox
    from merger.cli import app

    cfg = tiny_neox(0).config.to_dict()
    cfg["max_position_embeddings"] = 64
    save(GPTNeoXForCausalLM(GPTNeoXConfig(**cfg)), tmp_path / "m64")
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "m64"), "--limit", "3"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert "is longer than the model's context of 64 tokens" in r.stderr and "hint: " in r.stderr, r.stderr
