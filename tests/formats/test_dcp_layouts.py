"""Megatron-Core ``torch_dist`` and Accelerate FSDP ``SHARDED_STATE_DICT`` runs: DCP too, laid out their way.

The runs are written once per session under a 2-rank gloo torchrun by ``tests/dcp_layouts.py``:
Megatron's ``iter_0000010/`` and ``iter_0000020/`` (TP=2: column-parallel weights cut along dim 1
of the layer-stacked tensor, row-parallel ones along dim 2, the embedding and output layer along
dim 0; ``common.pt``) and ``iter_0000030/`` (PP=2: each rank a half of the layers; ``common_state``
inside the DCP), with the optimizer's ``optimizer.state.*``, ``rng_state`` and ``_extra_state``
objects, ``metadata.json`` and ``latest_checkpointed_iteration.txt``; HF Trainer's ``checkpoint-N/``
holding ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` written by Accelerate's own
``save_fsdp_model``/``save_fsdp_optimizer`` from an FSDP2 model. Every number is checked against
torch's DCP reader (float64 reference, <= 1 ulp); records outside the model part are overwritten
with garbage to prove they are never read; the output is loaded back into TP=2 shards (Megatron's
way) and by Accelerate's ``load_fsdp_model`` into a 2-rank FSDP2 model.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from typer.testing import CliRunner

from helpers.checks import check_refused, tree_digest
from helpers import EPS, acc_dtype, assert_close_ulp, reference
from dcp_layouts import gpt_params
from merger.cli import app

runner = CliRunner()
SCRIPT = Path(__file__).parents[1] / "dcp_layouts.py"
pytestmark = pytest.mark.slow  # two torchrun fixtures (about 20 s on 2 cores)
MODEL = [k for k, *_ in gpt_params()]  # Megatron's model part, in its saved order
ITERS = ("iter_0000010", "iter_0000020", "iter_0000030")


def _run(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(SCRIPT), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _read_only(root: Path) -> Path:
    for p in sorted(root.rglob("*")):  # the inputs are never written to: make that a hard fact
        p.chmod(p.stat().st_mode & ~0o222)
    return root


@pytest.fixture(scope="session")
def megatron(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("megatron") / "run"
    _run("megatron", str(root))
    return _read_only(root)


@pytest.fixture(scope="session")
def accelerate(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("accelerate") / "run"
    _run("accelerate", str(root))
    return _read_only(root)


def torch_read(folder: Path, keys=None) -> dict[str, torch.Tensor]:
    """Tensors (all, or ``keys``) as torch's own DCP reader reads them in one process, by their DCP names
    (Megatron's metadata has no planner_data: loaded flat, as Megatron-Core's loader does)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = pickle.loads((folder / ".metadata").read_bytes()).state_dict_metadata
    keys = keys or [k for k, v in md.items() if isinstance(v, TensorStorageMetadata)]
    sd = {k: torch.empty(tuple(md[k].size), dtype=md[k].properties.dtype) for k in keys}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(folder), no_dist=True, planner=DefaultLoadPlanner(flatten_state_dict=False))
    return sd


def saved_keys(folder: Path) -> list[str]:
    """The entries of a DCP folder in saved order (torch's own classes; a trusted fixture)."""
    return list(pickle.loads((folder / ".metadata").read_bytes()).state_dict_metadata)


def objects(folder: Path) -> dict[str, bytes]:
    """The pickled-bytes entries Megatron's loader asks for (modules' ``_extra_state``, ``common_state``)
    and their bytes, read where the metadata says (torch's own classes; a trusted fixture)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = pickle.loads((folder / ".metadata").read_bytes())
    out = {}
    for k, v in md.storage_data.items():
        item = md.state_dict_metadata[k.fqn]
        if isinstance(item, BytesStorageMetadata) and (k.fqn.startswith("common_state")
                                                       or "._extra_state" in k.fqn):
            with open(folder / v.relative_path, "rb") as f:
                f.seek(v.offset)
                out[k.fqn] = f.read(v.length)
    return dict(sorted(out.items()))


def average(args: list[str], out: Path) -> dict:
    r = runner.invoke(app, ["average", *args, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads((out / "merger.json").read_text())


def assert_mean(out: dict[str, torch.Tensor], inputs: list[Path], keys: list[str], weights=None) -> None:
    """``out`` is the float64 weighted mean of ``keys`` read by torch from ``inputs``: <= 1 ulp (or the
    accumulation's error bound where the sum cancels to near zero), dtypes kept."""
    sds = [torch_read(p, keys) for p in inputs]
    weights = weights or [1 / len(inputs)] * len(inputs)
    assert sorted(out) == sorted(keys), "the output's keys are the model part, exactly"
    for k, r in reference(sds, weights).items():
        xs = [sd[k] for sd in sds]
        assert out[k].dtype == xs[-1].dtype, k

        def bound(xs=xs, scale=len(xs) * EPS[acc_dtype(xs[0].dtype, out[k].dtype, "auto")]):
            return scale * sum(abs(w) * x.double().abs() for w, x in zip(weights, xs))

        assert_close_ulp(out[k], r, ulps=1.0, name=k, acc_bound=bound)


def garble(folder: Path, keep) -> int:
    """Overwrite the record of every entry ``keep`` rejects with 0xff bytes; returns the bytes garbled."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    n = 0
    for idx, info in md.storage_data.items():
        if not keep(idx.fqn):
            with open(folder / info.relative_path, "r+b") as f:
                f.seek(info.offset)
                f.write(b"\xff" * info.length)
            n += info.length
    return n


def writable_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    return dst


# -- Megatron-Core torch_dist -----------------------------------------------------------------------

def test_megatron_run_averages_the_model_part(megatron, tmp_path):
    out = tmp_path / "avg"
    res = average([str(megatron), "--revisions", "iter_0000010..iter_0000030"], out)
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "README.md", "__0_0.distcp", "__0_1.distcp",
                                                     "merger.json", "metadata.json"]
    assert [(s["name"], s["step"]) for s in res["sources"]] == [(n, int(n[5:])) for n in ITERS]
    assert [f["file"] for f in res["sources"][0]["files"]] == [
        ".metadata", "__0_0.distcp", "__0_1.distcp", "__1_0.distcp", "__1_1.distcp"]
    model = torch_read(megatron / ITERS[0], MODEL)
    assert res["read_bytes"] == 3 * sum(t.numel() * 2 for t in model.values())  # bf16 weights, nothing else
    carried = objects(megatron / ITERS[-1])  # _extra_state and common_state, Megatron's loader needs them
    assert carried and sorted(saved_keys(out)) == sorted(MODEL + list(carried))  # keys exactly as in the input
    assert objects(out) == carried  # byte for byte the latest input's
    merged = torch_read(out)
    assert_mean(merged, [megatron / n for n in ITERS], MODEL)
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert merged["decoder.layers.self_attention.linear_qkv.weight"].shape == (4, 96, 32)  # layers stay stacked


def test_megatron_records_outside_the_model_are_never_read(megatron, tmp_path):
    """The optimizer's tensors, rng_state, common_state and the _extra_state objects overwritten with
    garbage, common.pt too: the same average, and torch's reader shows the damage is real."""
    run = writable_copy(megatron, tmp_path / "run")
    for n in ITERS:
        assert garble(run / n, lambda fqn: fqn in MODEL) > 3 * sum(
            t.numel() * 2 for t in torch_read(megatron / n, MODEL).values())  # the optimizer: fp32 x 3
        if (run / n / "common.pt").exists():
            (run / n / "common.pt").write_bytes(b"\xff" * 100)
    with pytest.raises(CheckpointException, match="Weights only load failed"):  # DCP's error is a BaseException
        torch_read(run / ITERS[0], ["optimizer.state.exp_avg.output_layer.weight"])
    a, b = tmp_path / "a", tmp_path / "b"
    average([str(megatron), "--revisions", "iter_0000010..iter_0000030"], a)
    average([str(run), "--revisions", "iter_0000010..iter_0000030"], b)
    assert (a / "__0_0.distcp").read_bytes() == (b / "__0_0.distcp").read_bytes()


def test_megatron_output_loads_into_tensor_parallel_shards(megatron, tmp_path):
    """dcp.load of the merge into TP=2 ShardedTensors (Megatron's way of loading): each rank's chunks
    are the slices of the merged tensors (the stacked layers cut along dims 1 and 2, as saved)."""
    out = tmp_path / "avg"
    average([str(megatron), "--revisions", "iter_0000020..iter_0000030", "--method", "ema", "--decay", "0.5"], out)
    _run("megatron-load", str(out), str(tmp_path / "shards"))
    merged = torch_read(out)
    assert_mean(merged, [megatron / n for n in ITERS[1:]], MODEL, [0.5, 0.5])
    seen = 0
    for rank in (0, 1):
        for key, chunks in torch.load(tmp_path / f"shards.{rank}.pt").items():
            for offsets, t in chunks:
                want = merged[key][tuple(slice(o, o + s) for o, s in zip(offsets, t.shape))]
                assert torch.equal(t, want), (rank, key, offsets)
                seen += t.numel()
    assert seen >= sum(t.numel() for t in merged.values())  # every element reached some rank


def test_key_selects_the_model_where_the_default_cannot(tmp_path):
    """A custom loop's training state under a group merger doesn't know (``loss_scaler``,
    ``data_sampler``) is taken for model by default; ``--key embedding,decoder,output_layer``
    picks Megatron's model part, ``--key decoder`` one group of it."""
    import torch.distributed.checkpoint as dcp

    run = tmp_path / "run"
    for it in (100, 200):
        g = torch.Generator().manual_seed(it)
        sd = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s, *_ in gpt_params()}
        sd |= {"loss_scaler.scale": torch.tensor(2.0 ** 16), "data_sampler.consumed_samples": torch.tensor(it * 8.0),
               "optimizer.state.exp_avg.output_layer.weight": torch.randn(96, 32, generator=g)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(run / f"iter_{it:07d}"), no_dist=True)
    inputs = [run / "iter_0000100", run / "iter_0000200"]
    average([str(run)], tmp_path / "default")
    assert {"loss_scaler.scale", "data_sampler.consumed_samples"} <= set(torch_read(tmp_path / "default"))
    average([str(run), "--key", "embedding,decoder,output_layer"], tmp_path / "keyed")
    assert sorted(saved_keys(tmp_path / "keyed")) == sorted(MODEL)
    assert_mean(torch_read(tmp_path / "keyed"), inputs, MODEL)
    average([str(run), "--key", "decoder"], tmp_path / "decoder")
    assert_mean(torch_read(tmp_path / "decoder"), inputs, [k for k in MODEL if k.startswith("decoder.")])


def refused(args: list[str], inputs: Path, tmp_path: Path, *expected: str) -> str:
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir(exist_ok=True)
    before = tree_digest(inputs)
    r = runner.invoke(app, ["average", *args, "-o", str(out)])
    return check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=inputs, before=before)


@pytest.mark.parametrize("args, expected", [
    (["--key", "rng_state"], ("iter_0000010/.metadata: entry 'rng_state/shard_0.0_1.2' of the model part is a "
                              "pickled object", "groups: embedding, optimizer, decoder, output_layer, rng_state")),
    (["--key", "decoder.layers.mlp.linear_fc1._extra_state"], ("iter_0000010/.metadata: holds no model tensors",)),
    (["--key", "embedding,nope"], ("--key embedding,nope: no entry of", "starts with 'nope.'",
                                   "its top-level groups are: embedding, optimizer, decoder")),
    (["--revisions", "iter_0000030", "--key", "common_state"], ("entry 'common_state/shard_0_1' of the model part "
                                                                "is a pickled object",)),
])
def test_megatron_non_tensor_parts_are_clear_errors(megatron, tmp_path, args, expected):
    refused([str(megatron), *args], megatron, tmp_path, *expected)


def test_megatron_common_pt_is_not_a_checkpoint(megatron, tmp_path):
    refused([str(megatron / "iter_0000010/common.pt")], megatron, tmp_path,
            "iter_0000010/common.pt: its pickle needs the class or function argparse.Namespace")


def test_megatron_save_plans_in_metadata_are_read_without_running_code(megatron, tmp_path):
    """Megatron-Core keeps the ranks' save plans in ``.metadata`` (``all_local_plans``): read as inert
    records; code hidden in them is still refused before it runs."""
    run = writable_copy(megatron, tmp_path / "run")
    marker = tmp_path / "pwned"

    class System:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    md = pickle.loads((run / ITERS[2] / ".metadata").read_bytes())
    assert len(md.all_local_plans) == 2 and md.all_local_plans[0].items
    md.all_local_plans[1].items[0] = System()
    (run / ITERS[2] / ".metadata").write_bytes(pickle.dumps(md))
    refused([str(run)], run, tmp_path, "iter_0000030/.metadata: names posix.system",
            "refuses it without running anything")
    assert not marker.exists()


# -- Accelerate FSDP SHARDED_STATE_DICT (HF Trainer's checkpoint-N/) ----------------------------------

def accelerate_model(run: Path, step: int) -> Path:
    return run / f"checkpoint-{step}" / "pytorch_model_fsdp_0"


def test_accelerate_trainer_run_averages_the_model_folder(accelerate, tmp_path):
    out = tmp_path / "avg"
    res = average([str(accelerate), "--revisions", "checkpoint-10..checkpoint-30"], out)
    inputs = [accelerate_model(accelerate, s) for s in (10, 20, 30)]
    assert [(s["name"], s["path"]) for s in res["sources"]] == [
        (f"checkpoint-{s}", str(p)) for s, p in zip((10, 20, 30), inputs)]
    keys = saved_keys(inputs[0])
    assert keys[0] == "model.gpt_neox.embed_in.weight" and all(k.startswith("model.") for k in keys)
    assert res["read_bytes"] == 3 * sum(t.numel() * 4 for t in torch_read(inputs[0]).values())
    assert sorted(saved_keys(out)) == sorted(keys)
    assert_mean(torch_read(out), inputs, keys)


def test_accelerate_optimizer_and_trainer_files_are_never_read(accelerate, tmp_path):
    run = writable_copy(accelerate, tmp_path / "run")
    for s in (10, 20, 30):
        ck = run / f"checkpoint-{s}"
        assert garble(ck / "optimizer_0", lambda fqn: False) > 0
        with pytest.raises(CheckpointException, match="Weights only load failed"):
            torch_read(ck / "optimizer_0", ["optimizer.state.gpt_neox.embed_in.weight.exp_avg"])
        for f in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"):
            (ck / f).write_bytes(b"\xff" * 64)
    a, b = tmp_path / "a", tmp_path / "b"
    average([str(accelerate)], a)
    average([str(run)], b)
    assert (a / "__0_0.distcp").read_bytes() == (b / "__0_0.distcp").read_bytes()


def test_accelerate_output_restarts_training(accelerate, tmp_path):
    """The merge, written as a ``pytorch_model_fsdp_0`` folder, loads with Accelerate's own
    ``load_fsdp_model`` into a 2-rank FSDP2 model (what ``Trainer(resume_from_checkpoint=...)`` calls)."""
    out = tmp_path / "restart" / "pytorch_model_fsdp_0"
    average([str(accelerate), "--revisions", "checkpoint-20..checkpoint-30"], out)
    _run("accelerate-load", str(out), str(tmp_path / "full.pt"))
    full, merged = torch.load(tmp_path / "full.pt"), torch_read(out)
    assert sorted(f"model.{k}" for k in full) == sorted(merged)
    for k, v in full.items():
        assert torch.equal(v, merged[f"model.{k}"]), k


def test_trainer_checkpoint_folders_given_one_by_one(accelerate, tmp_path):
    res = average([str(accelerate / "checkpoint-30"), str(accelerate / "checkpoint-10")], tmp_path / "two")
    assert [(s["name"], s["step"], Path(s["path"]).name) for s in res["sources"]] == [
        ("checkpoint-10", 10, "pytorch_model_fsdp_0"), ("checkpoint-30", 30, "pytorch_model_fsdp_0")]
    inputs = [accelerate_model(accelerate, s) for s in (10, 30)]
    assert_mean(torch_read(tmp_path / "two"), inputs, saved_keys(inputs[0]))
    average([str(accelerate / "checkpoint-20")], tmp_path / "one")  # one revision folder: its model, as is
    one, want = torch_read(tmp_path / "one"), torch_read(accelerate_model(accelerate, 20))
    assert one.keys() == want.keys() and all(torch.equal(one[k], want[k]) for k in want)


# -- megatron-core's own writer and loader (megatron-core is a test dependency) -------------------------

def test_a_run_written_by_megatron_core_itself_restarts_in_megatron_core(tmp_path):
    """megatron-core 0.16's GPTModel and ``dist_checkpointing.save`` write the run (TP=2, AdamW
    state, rng_state, ``_extra_state``); merger averages its model part, and megatron-core's own
    ``dist_checkpointing.load`` (strict: every key the model asks for) reads the average into a
    fresh TP=2 model: each rank's shards are the merged tensors' slices."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install megatron-core)")
    run = tmp_path / "run"
    _run("megatron-core", str(run))
    out = tmp_path / "avg"
    res = average([str(run), "--revisions", "iter_0000010..iter_0000030"], out)
    keys = [k for k in saved_keys(out) if "._extra_state" not in k]
    assert set(keys) == set(MODEL)  # the same GPT keys as the fixture's, nothing of the optimizer
    model = torch_read(run / "iter_0000010", keys)
    assert res["read_bytes"] == 3 * sum(t.numel() * 4 for t in model.values())
    merged = torch_read(out)
    assert_mean(merged, [run / n for n in ITERS], keys)
    assert (out / "common.pt").read_bytes() == (run / ITERS[-1] / "common.pt").read_bytes()
    _run("megatron-core-load", str(out), str(tmp_path / "loaded"))
    seen = 0
    for rank in (0, 1):
        for key, pieces in torch.load(tmp_path / f"loaded.{rank}.pt").items():
            for offset, lead, t in pieces:
                full = merged[key][tuple(lead)] if lead else merged[key]
                want = full[tuple(slice(o, o + n) for o, n in zip(offset[len(lead):], t.shape))]
                assert torch.equal(t, want), (rank, key, offset)
                seen += t.numel()
    assert seen >= sum(t.numel() for t in merged.values())  # every element reached some rank


def test_megatron_files_only_beside_a_dcp_output(megatron, tmp_path):
    """``--to safetensors`` of a Megatron run: the same tensors, without Megatron's ``metadata.json``
    (which would call the folder a torch_dist checkpoint) or ``common.pt``."""
    out = tmp_path / "st"
    average([str(megatron), "--revisions", "iter_0000010..iter_0000020", "--to", "safetensors"], out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "merger.json", "model.safetensors"]
