"""An output never becomes an input by accident: ``-o run/avg`` inside a run folder is named in a
warning, and the next ``merger average run`` doesn't take the merge (a folder holding
``merger.json``, or one still being written, ``.NAME.merger-partial``) as the run's latest revision.
Real files: a nanoGPT run written by torch.save (the merge's ``ckpt.pt`` carries ``iter_num``, which
would otherwise give it the last step) and Hugging Face folders."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from helpers import make_run
from merger.cli import app
from merger.testing.nanogpt import nanogpt_run

runner = CliRunner()
ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, bias=True, dropout=0.0)


def inputs(run) -> list[str]:
    r = runner.invoke(app, ["average", str(run), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    return [i["revision"] if "revision" in i else i["name"] for i in json.loads(r.stdout)["inputs"]]


def test_a_pt_merge_inside_its_run_is_never_a_revision(tmp_path):
    run = nanogpt_run(tmp_path / "out", ARGS, steps=(100, 200, 300))
    before = inputs(run)
    assert before == ["ckpt_100", "ckpt_200", "ckpt_300"]
    r = runner.invoke(app, ["average", str(run), "-o", str(run / "avg")])
    assert r.exit_code == 0, r.output
    assert "lies inside the run folder" in r.stderr + r.stdout
    assert torch.load(run / "avg" / "ckpt.pt", weights_only=True)["iter_num"] == 300  # it would sort last
    assert inputs(run) == before
    m = json.loads((run / "avg" / "merger.json").read_text())
    assert any("lies inside the run folder" in w for w in m["warnings"])


def test_hf_merge_and_a_partial_folder_inside_a_run_are_skipped(tmp_path):
    root, _ = make_run(tmp_path / "run", steps=(1000, 2000, 3000))
    r = runner.invoke(app, ["average", str(root), "-o", str(root / "step9000")])
    assert r.exit_code == 1 and "would sit among the revisions" in r.stderr  # a step's name: refused
    r = runner.invoke(app, ["average", str(root), "-o", str(root / "merged-lawa")])
    assert r.exit_code == 0, r.output
    partial = root / ".step9999.merger-partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes((root / "step3000" / "model.safetensors").read_bytes())
    assert inputs(root) == ["step1000", "step2000", "step3000"]
    r = runner.invoke(app, ["average", str(root), "--revisions", "step1000,merged-lawa"])
    assert r.exit_code == 1 and "merged-lawa" in r.stderr  # not a revision, even by name
