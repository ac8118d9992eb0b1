"""Revisions ordered by step number, never by name, wherever the step comes from: torchtune's
``epoch_N/`` folders, Composer's ``epE-baB-rank0.pt`` (the batch count; ``latest-rank0.pt`` a symlink),
litgpt's ``step-00000060/lit_model.pth`` and DeepSpeed's ``global_step40/mp_rank_00_model_states.pt``
(the parent folder's step), and a file's own counters where no name has one. Selection with
``--revisions`` by these steps, the messages of a selection that finds nothing, and the warning
(an error with ``--strict``) when the order can't be established.

Every run is written with the real writers (``synth.save_checkpoint``: safetensors; ``torch.save``),
merged by the real CLI, and the outputs compared with an in-memory float64 reference (<= 1 ulp).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import assert_close_ulp, check_against_reference, make_run, reference, weights_of
from merger.cli import app
from merger.sources.local import resolve_local
from merger.testing import synth

runner = CliRunner()
SHAPE = synth.Shape(hidden=32, layers=1, heads=4, vocab=256, max_pos=32)


def average(*args: str, code: int = 0):
    r = runner.invoke(app, ["average", *args, "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout) if code == 0 else r


def inputs(d: dict) -> list[tuple[str, int | None]]:
    return [(i["name"], i["step"]) for i in d["plan"]["inputs"]]


def sd_of(step: int) -> dict[str, torch.Tensor]:
    return synth.pythia_state_dict(SHAPE, seed=0, step=step, dtype=torch.float32)


def check_pt(out_sd: dict[str, torch.Tensor], sds: list[dict], weights: list[float]) -> None:
    ref = reference(sds, weights)
    assert set(out_sd) == set(ref)
    for k, r in ref.items():
        if r.is_floating_point():
            assert out_sd[k].dtype == sds[-1][k].dtype, k
            assert_close_ulp(out_sd[k], r, name=k)
        else:  # the attention mask buffer: the same in every input
            assert torch.equal(out_sd[k], r), k


# -- torchtune: epoch_0 .. epoch_11 -----------------------------------------------------------------

@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    """12 HF safetensors folders epoch_0 .. epoch_11, each config.json marked with its epoch."""
    root, sds = make_run(tmp_path_factory.mktemp("tt") / "run", shape=SHAPE, steps=range(12), dtype=torch.float32,
                         name="epoch_{step}")
    for e in range(12):
        cfg = root / f"epoch_{e}" / "config.json"
        cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), merger_test_epoch=e)))
    return root, sds


def test_torchtune_epochs_linear_in_numeric_order(epochs, tmp_path):
    root, sds = epochs
    d = average(str(root), "--method", "linear", "-o", str(tmp_path / "o"))
    assert inputs(d) == [(f"epoch_{e}", e) for e in range(12)]  # not epoch_0, epoch_1, epoch_10, ...
    assert d["plan"]["warnings"] == []
    check_against_reference(tmp_path / "o", sds, weights_of("linear", 12))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["merger_test_epoch"] == 11


def test_epoch_range_selects_by_step(epochs, tmp_path):
    root, sds = epochs
    d = average(str(root), "--revisions", "epoch_3..epoch_11", "--method", "ema", "--decay", "0.5",
                "-o", str(tmp_path / "o"))
    assert inputs(d) == [(f"epoch_{e}", e) for e in range(3, 12)]
    check_against_reference(tmp_path / "o", sds[3:], weights_of("ema", 9, decay=0.5))
    d = average(str(root), "--revisions", "8..10", "--dry-run")
    assert [i["name"] for i in d["inputs"]] == ["epoch_8", "epoch_9", "epoch_10"]
    d = average(str(root), "--revisions", "epoch_10,epoch_2,epoch_9", "--dry-run")
    assert [i["name"] for i in d["inputs"]] == ["epoch_2", "epoch_9", "epoch_10"]


def test_empty_range_names_revisions_near_it_by_step(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE, steps=(3, 4, 5, 12), name="epoch_{step}")
    r = average(str(root), "--revisions", "0..2", "-o", str(tmp_path / "o"), code=1)
    assert "--revisions 0..2 selects no revision" in r.stderr, r.stderr
    assert "above it epoch_3, epoch_4" in r.stderr and "below it" not in r.stderr, r.stderr
    r = average(str(root), "--revisions", "epoch_6..epoch_11", code=1)
    assert "below it epoch_4, epoch_5; above it epoch_12" in r.stderr, r.stderr
    r = average(str(root), "--revisions", "epoch_4,epoch_7", code=1)
    assert "revision 'epoch_7' not found" in r.stderr and "nearest existing revisions: epoch_4, epoch_5, epoch_12" \
        in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


# -- Composer: ep{E}-ba{B}-rank0.pt, latest-rank0.pt --------------------------------------------------

COMPOSER = ((0, 20), (0, 40), (1, 60), (1, 100))  # by name ep1-ba100 would sort before ep1-ba60


@pytest.fixture(scope="module")
def composer(tmp_path_factory):
    root = tmp_path_factory.mktemp("composer") / "run"
    root.mkdir()
    sds = []
    for epoch, batch in COMPOSER:
        sds.append(sd_of(batch))
        torch.save({"state": {"model": sds[-1], "timestamp": {"epoch": epoch, "batch": batch},
                              "optimizers": {"DecoupledAdamW": {"state": {}}}}, "rng": [{"python": 1}]},
                   root / f"ep{epoch}-ba{batch}-rank0.pt")
    os.symlink("ep1-ba100-rank0.pt", root / "latest-rank0.pt")
    return root, sds


def test_composer_run_ordered_by_batch(composer, tmp_path):
    """Composer nests the model under state.model, which merger finds with --key (not by itself)."""
    root, sds = composer
    d = average(str(root), "--key", "state.model", "--method", "linear", "-o", str(tmp_path / "o"))
    assert inputs(d) == [("ep0-ba20-rank0", 20), ("ep0-ba40-rank0", 40), ("ep1-ba60-rank0", 60),
                         ("ep1-ba100-rank0", 100)]  # latest-rank0.pt, the symlink, is not a fifth
    out = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    check_pt(out["state"]["model"], sds, weights_of("linear", 4))


@pytest.mark.parametrize("spec,names", [
    ("20..40", ["ep0-ba20-rank0", "ep0-ba40-rank0"]),
    ("ep0-ba20-rank0", ["ep0-ba20-rank0"]),
    ("100,ep0-ba40,20", ["ep0-ba20-rank0", "ep0-ba40-rank0", "ep1-ba100-rank0"]),
    ("ep0-ba40-rank0..", ["ep0-ba40-rank0", "ep1-ba60-rank0", "ep1-ba100-rank0"]),
])
def test_composer_selection_by_step(composer, spec, names):
    root, _ = composer
    d = average(str(root), "--key", "state.model", "--revisions", spec, "--dry-run")
    assert [i["name"] for i in d["inputs"]] == names


def test_composer_selection_merges_the_selected(composer, tmp_path):
    root, sds = composer
    average(str(root), "--key", "state.model", "--revisions", "20..40", "--to", "safetensors",
            "-o", str(tmp_path / "o"))
    check_against_reference(tmp_path / "o", sds[:2], [0.5, 0.5])


def test_composer_missing_step_names_only_other_steps(composer):
    """Was: "step 20 not found ... nearest: ep0-ba20-rank0"."""
    root, _ = composer
    r = average(str(root), "--revisions", "30", code=1)
    assert "revision '30' not found" in r.stderr
    assert "nearest existing revisions: ep0-ba20-rank0, ep0-ba40-rank0, ep1-ba60-rank0" in r.stderr, r.stderr
    r = average(str(root), "--revisions", "20..100", "--every", "30", code=1)
    assert "revision for step 50 not found" in r.stderr and "ep0-ba40-rank0, ep1-ba60-rank0" in r.stderr, r.stderr


def test_two_revisions_of_one_step_are_refused(composer, tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    for f in composer[0].glob("ep*.pt"):
        (root / f.name).write_bytes(f.read_bytes())
    (root / "ep0-ba20-rank1.pt").write_bytes((root / "ep0-ba20-rank0.pt").read_bytes())
    r = average(str(root), "--key", "state.model", "-o", str(tmp_path / "o"), code=1)
    assert "step 20 is held by 2 revisions" in r.stderr and "ep0-ba20-rank0, ep0-ba20-rank1" in r.stderr, r.stderr
    assert "--revisions ep0-ba20-rank0" in r.stderr
    d = average(str(root), "--key", "state.model", "--revisions", "40..", "--dry-run")  # not in the range: fine
    assert [i["step"] for i in d["inputs"]] == [40, 60, 100]
    assert not (tmp_path / "o").exists()


# -- the step of the folder a checkpoint file lies in: litgpt, DeepSpeed -----------------------------

LITGPT = (60, 120, 180, 1000)  # step-00001000 sorts last by name too; 4x iter_num (grad accumulation)


@pytest.fixture(scope="module")
def litgpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("litgpt") / "out" / "pretrain"
    sds = []
    for step in LITGPT[::-1]:
        sds.insert(0, sd_of(step))
        folder = root / f"step-{step:08d}"
        folder.mkdir(parents=True)
        torch.save({"model": sds[0], "optimizer": {"state": {}}, "iter_num": 4 * step, "step_count": step},
                   folder / "lit_model.pth")
        (folder / "model_config.yaml").write_text("n_layer: 1\n")
    return root, sds


def test_litgpt_run_folder(litgpt, tmp_path):
    root, sds = litgpt
    d = average(str(root), "--method", "linear", "--to", "safetensors", "-o", str(tmp_path / "o"))
    assert inputs(d) == [(f"step-{s:08d}", s) for s in LITGPT]
    assert [Path(i["path"]).relative_to(root).as_posix() for i in d["plan"]["inputs"]] == \
        [f"step-{s:08d}/lit_model.pth" for s in LITGPT]
    check_against_reference(tmp_path / "o", sds, weights_of("linear", 4))
    d = average(str(root), "--revisions", "100..200", "--dry-run")
    assert [i["step"] for i in d["inputs"]] == [120, 180]


def test_litgpt_explicit_files_take_their_folders_step(litgpt, tmp_path):
    root, sds = litgpt
    d = average(str(root / "step-00000180" / "lit_model.pth"), str(root / "step-00000060" / "lit_model.pth"),
                str(root / "step-00000120"), "--method", "ema", "--decay", "0.5", "--to", "safetensors",
                "-o", str(tmp_path / "o"))
    assert inputs(d) == [("step-00000060", 60), ("step-00000120", 120), ("step-00000180", 180)]
    check_against_reference(tmp_path / "o", sds[:3], weights_of("ema", 3, decay=0.5))


def test_deepspeed_model_states_beside_optimizer_states(tmp_path):
    root = tmp_path / "ds"
    sds = []
    for step in (40, 80, 120):
        sds.append(sd_of(step))
        folder = root / f"global_step{step}"
        folder.mkdir(parents=True)
        torch.save({"module": sds[-1], "global_steps": step, "global_samples": 8 * step},
                   folder / "mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"state": {}}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (root / "latest").write_text("global_step120")
    srcs = resolve_local([str(root)], None, None)
    assert [(s.name, s.step, Path(s.path).name) for s in srcs] == \
        [(f"global_step{s}", s, "mp_rank_00_model_states.pt") for s in (40, 80, 120)]
    average(str(root), "--method", "linear", "--to", "safetensors", "-o", str(tmp_path / "o"))
    check_against_reference(tmp_path / "o", sds, weights_of("linear", 3))


# -- a file's own counters, where no name has a step --------------------------------------------------

def test_counters_order_revisions_without_step_names(tmp_path):
    root = tmp_path / "run"
    counters = {"a": ("step_count", 300), "b": ("global_step", 100), "c": ("iter_num", 200)}
    sds = {}
    for name, (key, step) in counters.items():
        sds[name] = sd_of(step)
        (root / name).mkdir(parents=True)
        torch.save({"model": sds[name], key: step, "epoch": 7}, root / name / "weights.pt")
    d = average(str(root), "--method", "linear", "--to", "safetensors", "-o", str(tmp_path / "o"))
    assert inputs(d) == [("b", 100), ("c", 200), ("a", 300)] and d["plan"]["warnings"] == []
    check_against_reference(tmp_path / "o", [sds["b"], sds["c"], sds["a"]], weights_of("linear", 3))
    d = average(str(root), "--revisions", "150..300", "--dry-run")
    assert [i["name"] for i in d["inputs"]] == ["c", "a"]


# -- order unknown: warned, refused with --strict ----------------------------------------------------

@pytest.fixture
def unnamed(tmp_path):
    """HF folders whose names carry no step (and HF folders record none)."""
    return make_run(tmp_path / "soup", shape=SHAPE, steps=(3, 1, 2), dtype=torch.float32, name="run{step}_final")


def test_unknown_order_is_warned(unnamed, tmp_path):
    root, sds = unnamed
    d = average(str(root), "--method", "linear", "-o", str(tmp_path / "o"))
    assert inputs(d) == [("run1_final", None), ("run2_final", None), ("run3_final", None)]
    [w] = d["plan"]["warnings"]
    assert "the order of the 3 checkpoints can't be established" in w and "--method linear" in w, w
    assert "config.json" in w, w
    check_against_reference(tmp_path / "o", [sds[1], sds[2], sds[0]], weights_of("linear", 3))
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "h")])  # the human output says it too
    assert r.exit_code == 0 and "can't be established" in r.stderr, r.output
    # uniform weights don't depend on the order, the config copied from the last one does
    [w] = average(str(root), "--dry-run")["warnings"]
    assert "--method" not in w and "files copied from the last one (config.json" in w, w


def test_unknown_order_is_refused_with_strict(unnamed, tmp_path):
    root, _ = unnamed
    r = average(str(root), "--method", "ema", "--decay", "0.9", "--strict", "-o", str(tmp_path / "o"), code=1)
    assert "Error: the order of the 3 checkpoints can't be established" in r.stderr, r.stderr
    assert "hint: name each revision by step" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
    r = average(str(root / "run2_final"), str(root / "run1_final"), "--strict", "-o", str(tmp_path / "o"), code=1)
    assert "no step for run2_final, run1_final" in r.stderr, r.stderr


def test_known_order_is_not_warned_and_ties_are(tmp_path):
    root, _ = make_run(tmp_path / "run", shape=SHAPE, steps=(1, 2))
    other, _ = make_run(tmp_path / "other", shape=SHAPE, steps=(2,), seed=1)
    assert average(str(root), "--method", "linear", "--strict", "--dry-run")["warnings"] == []
    d = average(str(root / "step2"), str(other / "step2"), "--method", "linear", "--dry-run")
    assert "step2 and step2 share step 2" in d["warnings"][0], d["warnings"]
    # uniform weights of two runs' step 2 (a soup) still copy the config of the one listed last
    d = average(str(root / "step2"), str(other / "step2"), "--dry-run")
    assert "config.json" in d["warnings"][0], d["warnings"]


# -- a folder merger finds no checkpoint in -------------------------------------------------------------

def test_run_folder_error_says_what_it_saw(tmp_path):
    root = tmp_path / "run"
    for s in (10, 20, 30):
        (root / f"step-{s:08d}").mkdir(parents=True)
        torch.save({"w": torch.zeros(2)}, root / f"step-{s:08d}" / "a.pt")
        torch.save({"w": torch.zeros(2)}, root / f"step-{s:08d}" / "b.pt")
    (root / "notes.txt").write_text("x")
    r = average(str(root), code=1)
    assert "found no checkpoint in it or in its subfolders: it holds 3 step-*/ folders holding a.pt, b.pt; " \
           "1 file (1 .txt)" in r.stderr, r.stderr
    assert "give the checkpoints themselves" in r.stderr and "point at the folder" not in r.stderr


def test_selection_in_a_run_without_steps_names_no_near_revision(unnamed):
    root, _ = unnamed
    for spec, msg in (("0..2", "--revisions 0..2 selects no revision"), ("20", "revision '20' not found")):
        r = average(str(root), "--revisions", spec, code=1)
        assert msg in r.stderr, r.stderr
        assert "none of the 3 revisions there has a step in its name or its files (run1_final, run2_final, " \
               "run3_final): select them by name" in r.stderr and "near" not in r.stderr, r.stderr
    d = average(str(root), "--revisions", "run3_final,run1_final", "--dry-run")
    assert [i["name"] for i in d["inputs"]] == ["run3_final", "run1_final"]  # as listed, and warned
    assert "can't be established" in d["warnings"][0]


@pytest.mark.parametrize("name,step", [
    ("epoch_11", 11), ("epoch-2", 2), ("ep3-ba120-rank0", 120), ("ep3-ba120", 120), ("step-00000060", 60),
    ("global_step40", 40), ("latest-rank0", None), ("lit_model", None), ("epoch=1-step=500", 500),
])
def test_parse_step(name, step):
    from merger.sources import parse_step

    assert parse_step(name) == step


def test_names_without_steps_sort_by_their_numbers():
    from merger.sources.spec import name_order

    assert sorted(["run10", "run2", "run1b", "run1"], key=name_order) == ["run1", "run1b", "run2", "run10"]
