"""A run whose revisions differ in floating dtype (torchtitan's export writes the last step in
bf16): floating tensors are averaged upcast, each input read in its own dtype; the output is in
the latest revision's dtype unless ``--dtype``; the plan names the revisions that differ.
Non-floating dtypes must still agree; the stream schedule (checkpoint-major) refuses such a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import fakehub
from helpers import WIDE, assert_close_ulp, files_equal, load_dir, reference
from merger.cli import app
from merger.testing import synth

fake_hub = fakehub.fake_hub
runner = CliRunner()
STEPS = (1000, 2000, 3000)
DTYPES = (torch.float32, torch.float32, torch.bfloat16)  # the last one exported in bf16
NOTE = ("step3000 is bfloat16 (the others float32): 18 tensors averaged in float64, each input upcast from its "
        "own dtype, written as {out} ({why})")


def mixed_run(root: Path, *, dtypes=DTYPES, fmt="safetensors") -> list[dict[str, torch.Tensor]]:
    sds = []
    for s, dt in zip(STEPS, dtypes):
        sds.append(synth.pythia_state_dict(WIDE, seed=3, step=s, dtype=dt))
        synth.save_checkpoint(root / f"step{s}", sds[-1], fmt=fmt, config=WIDE.config(dt))
    return sds


def check_upcast_mean(out: dict[str, torch.Tensor], sds, out_dtype: torch.dtype) -> None:
    """Every floating tensor within 1 ulp (of ``out_dtype``) of the float64 mean of the upcast
    inputs (the accumulation is float64: its error is far below that); integers exact."""
    ref = reference(sds, [1 / 3] * 3)
    assert set(out) == set(ref)
    for k, r in ref.items():
        if not sds[0][k].is_floating_point():
            assert torch.equal(out[k], r), k
            continue
        assert out[k].dtype == out_dtype, k
        assert_close_ulp(out[k], r, ulps=1.0, name=k)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed") / "run"
    return root, mixed_run(root)


@pytest.mark.parametrize("budget", [[], ["--max-memory", "8MB"]])  # 8MB: the embedding in element ranges
def test_mixed_dtypes_averaged_upcast(run, tmp_path, monkeypatch, budget):
    root, sds = run
    outs = {}
    for kernel in ("native", "torch"):
        monkeypatch.setenv("MERGER_KERNEL", kernel)
        out = tmp_path / kernel
        r = runner.invoke(app, ["average", str(root), "-o", str(out), "--json", *budget])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["result"]["kernel"] == kernel
        assert NOTE.format(out="bfloat16", why="the latest's dtype; --dtype to choose") in d["plan"]["warnings"]
        assert d["plan"]["read_bytes"] == sum(t.numel() * t.element_size() for sd in sds for t in sd.values())
        if budget:
            assert d["plan"]["blocks"] > 1
        outs[kernel] = load_dir(out)
        check_upcast_mean(outs[kernel], sds, torch.bfloat16)
        # Pythia's masked_bias is -inf in every input: equal values, written as such (not averaged, refused)
        assert outs[kernel]["gpt_neox.layers.0.attention.masked_bias"].item() == float("-inf")
    assert files_equal(tmp_path / "native", tmp_path / "torch")  # the native pipeline hands these to torch


def test_dtype_option_and_the_note_printed(run, tmp_path):
    root, sds = run
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "o"), "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    assert NOTE.format(out="float32", why="--dtype") in " ".join(r.output.split())
    check_upcast_mean(load_dir(tmp_path / "o"), sds, torch.float32)


def test_common_case_unchanged(tmp_path):
    """One dtype everywhere: no note, and identical tensors still copied bit for bit."""
    root = tmp_path / "run"
    mixed_run(root, dtypes=(torch.bfloat16,) * 3)
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["plan"]["warnings"] == [] and "gpt_neox.layers.0.attention.masked_bias" in d["result"]["copied_tensors"]


def test_non_floating_dtypes_must_still_agree(tmp_path):
    root = tmp_path / "run"
    sds = mixed_run(root)
    sd = dict(sds[-1])
    mask = "gpt_neox.layers.0.attention.bias"
    sd[mask] = sd[mask].to(torch.bool)
    synth.save_checkpoint(root / "step3000", sd, config=WIDE.config(torch.bfloat16))
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert f"tensor {mask!r}: dtype uint8 in step1000 but bool in step3000" in r.stderr
    assert not (tmp_path / "o").exists()


def test_stream_refuses_mixed_dtypes_with_the_fix(fake_hub, tmp_path):
    src = tmp_path / "src"
    mixed_run(src)
    for s in STEPS:
        fake_hub.add_revision("org/mixed", f"step{s}", src / f"step{s}")
    r = runner.invoke(app, ["average", "org/mixed", "-r", "step1000..step3000", "-o", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert "dtype float32 in step1000 but bfloat16 in step3000" in r.stderr
    assert "download the revisions and merge the local folders" in r.stderr
    assert not (tmp_path / "o").exists()
