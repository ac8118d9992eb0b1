"""`merger average ... --eval`: the merged model against the latest input revision, as LAWA does."""

from __future__ import annotations

import json

import pytest
from helpers.sweepfixtures import train_trajectory
from typer.testing import CliRunner

from merger.cli import app

pytestmark = pytest.mark.slow  # a merge, then lm-eval on it and on its baseline (~8 s)

runner = CliRunner()
REPO = "local/tiny-average-eval"


@pytest.fixture(scope="module")
def revisions():
    return train_trajectory(repo_id=REPO, steps=20, save_every=5)


def test_average_then_eval(revisions, tmp_path):
    r = runner.invoke(app, ["average", REPO, "--revisions", f"{revisions[0]}..{revisions[-1]}", "-o",
                            str(tmp_path / "lawa"), "--eval", "--tasks", "merger_pydocs_ppl", "--limit", "4",
                            "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    models = d["eval"]["models"]
    assert len(models) == 2 and d["eval"]["baseline"] == models[0]["model"]
    assert models[0]["revision"] == revisions[-1]  # the latest input, at the commit that was merged
    assert models[0]["commit"] == d["plan"]["inputs"][-1]["commit"]
    assert models[1]["path"] == str(tmp_path / "lawa")
    for m in models:
        v = m["scores"]["merger_pydocs_ppl"]["bits_per_byte"]["value"]
        assert 0 < v < 10
    assert (tmp_path / "lawa" / "eval" / "summary.json").exists()
    # and the human table
    r = runner.invoke(app, ["average", REPO, "--revisions", f"{revisions[-2]},{revisions[-1]}", "-o",
                            str(tmp_path / "two"), "--eval", "--tasks", "merger_pydocs_ppl", "--limit", "2"])
    assert r.exit_code == 0, r.output
    assert "bits_per_byte" in r.stdout and "merged 2 checkpoints" in r.stdout
