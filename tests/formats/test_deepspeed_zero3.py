"""DeepSpeed ZeRO-3 model-states files hold (0,)-shaped placeholders: refused with the fix, never
merged into a model of 0 parameters.

The files are written by ``torch.save`` of the dict DeepSpeed's ``engine._save_checkpoint`` saves
(``module``, ``param_shapes`` as a list of ``OrderedDict[name, torch.Size]``, ``ds_config``,
``sparse_tensor_module_names`` as a set, ...): deepspeed itself is not installed here.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers.checks import check_refused, tree_digest
from merger.cli import app

runner = CliRunner()
SHAPES = {"transformer.wte.weight": (64, 32), "transformer.h.0.attn.c_attn.weight": (96, 32),
          "transformer.h.0.ln_1.bias": (32,)}


def zero3_state(step: int, *, param_shapes: bool = True, dtype=torch.bfloat16) -> dict:
    """One rank's ``zero_pp_rank_R_mp_rank_00_model_states.pt`` as DeepSpeed writes it under ZeRO-3."""
    module = OrderedDict((n, torch.empty(0, dtype=dtype)) for n in SHAPES)  # ds placeholders
    module["transformer.h.0.attn.bias"] = torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8)  # a buffer: whole
    return dict(
        module=module, buffer_names=["transformer.h.0.attn.bias"], optimizer=None,
        param_shapes=[OrderedDict((n, torch.Size(s)) for n, s in SHAPES.items())] if param_shapes else None,
        frozen_param_shapes=None, shared_params={}, frozen_param_fragments=None, lr_scheduler=None,
        data_sampler=None, random_ltd=None, sparse_tensor_module_names=set(), skipped_steps=0,
        global_steps=step, global_samples=8 * step, dp_world_size=2, mp_world_size=1,
        ds_config={"train_batch_size": 8, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}},
        ds_version="0.14.4")


def zero3_run(root: Path, *, steps=(10, 20, 30), **kw) -> Path:
    """A DeepSpeed run folder: ``global_stepN/`` with two ranks' model and optimizer states, ``latest``."""
    for step in steps:
        d = root / f"global_step{step}"
        d.mkdir(parents=True)
        for rank in range(2):
            torch.save(zero3_state(step, **kw), d / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
            torch.save({"optimizer_state_dict": {"fp32_flat_groups": [torch.randn(1100)]}},
                       d / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        (root / "latest").write_text(f"global_step{step}")
    return root


@pytest.mark.parametrize("param_shapes", [True, False])
def test_zero3_run_folder_refused_with_the_fix(tmp_path, param_shapes):
    run = zero3_run(tmp_path / "run", param_shapes=param_shapes)
    before = tree_digest(run)
    out = tmp_path / "merged"
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    real = "its real shape is [64, 32] (param_shapes)" if param_shapes else "it holds no element"
    err = check_refused(r.exit_code, r.stderr, r.output,
                        ["zero_pp_rank_0_mp_rank_00_model_states.pt", "DeepSpeed ZeRO-3",
                         "'transformer.wte.weight' is stored as [0]", real, "zero_to_fp32.py CHECKPOINT_DIR OUTPUT"],
                        out=out, inputs=run, before=before)
    assert "global_step10" in err


def test_zero3_files_given_explicitly_refused(tmp_path):
    run = zero3_run(tmp_path / "run", steps=(10, 20))
    files = [str(run / f"global_step{s}" / "zero_pp_rank_1_mp_rank_00_model_states.pt") for s in (10, 20)]
    before = tree_digest(run)
    out = tmp_path / "merged"
    r = runner.invoke(app, ["average", *files, "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, ["zero_pp_rank_1_mp_rank_00_model_states.pt",
                                                    "'transformer.wte.weight' is stored as [0]", "zero_to_fp32.py"],
                  out=out, inputs=run, before=before)


def test_shape_disagreeing_with_param_shapes_refused(tmp_path):
    """Not a placeholder, but not the recorded shape either (a truncated or hand-edited save)."""
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2):
        state = zero3_state(s)
        state["module"] = OrderedDict((n, torch.randn(*d)) for n, d in SHAPES.items())
        state["module"]["transformer.h.0.ln_1.bias"] = torch.randn(16)
        torch.save(state, run / f"ckpt_{s}.pt")
    before = tree_digest(run)
    out = tmp_path / "merged"
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, ["disagree in size with the checkpoint's own param_shapes",
                                                    "'transformer.h.0.ln_1.bias' is stored as [16]", "[32]"],
                  out=out, inputs=run, before=before)


def test_all_floating_tensors_empty_is_never_a_merge(tmp_path):
    """Without any metadata to tell why: a checkpoint of 0 parameters is refused, not merged."""
    run = tmp_path / "run"
    run.mkdir()
    for s in (1, 2):
        model = {n: torch.empty(0) for n in SHAPES} | {"mask": torch.ones(4, dtype=torch.bool)}
        torch.save({"model": model}, run / f"ckpt_{s}.pt")
    before = tree_digest(run)
    out = tmp_path / "merged"
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, ["every floating tensor of the checkpoint is empty",
                                                    "0 parameters", "zero_to_fp32.py"],
                  out=out, inputs=run, before=before)
