"""torch.distributed.checkpoint saved as sharded safetensors (``HuggingFaceStorageWriter(path,
save_distributed=True)``, as NeMo AutoModel saves and torchtitan's ``sharded/``), written by torch's
own writer under torchrun (2-process gloo, FSDP2; a revision saved by 3 ranks; tensors cut along
dims 1 and 2), checked against torch's own ``HuggingFaceStorageReader``: the average within 1 ulp
of the float64 mean, the output loaded back into a 2-rank FSDP2 model, bad folders refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from helpers.checks import check_refused, tree_digest
from helpers import ulp
from merger.cli import app
from merger.formats import of, read_checkpoint

runner = CliRunner()
SCRIPT = Path(__file__).parents[1] / "dcp_train.py"
pytestmark = pytest.mark.slow  # three torchrun runs (about 40 s on 2 cores)


def _run(args: list[str], nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(SCRIPT), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``run/step-{2,4}`` (2 ranks), ``run/step-6`` (3 ranks: other cuts), ``tp/`` (cut along dims 1, 2)."""
    root = tmp_path_factory.mktemp("dcp-hf")
    _run(["train", str(root / "run"), "--steps", "4", "--every", "2", "--hf", "--tp", str(root / "tp")], 2)
    _run(["train", str(root / "three"), "--steps", "6", "--every", "6", "--hf", "--lr", "1e-2"], 3)
    (root / "three" / "step-6").rename(root / "run" / "step-6")
    for p in sorted((root / "run").rglob("*")):  # inputs are never written to
        p.chmod(p.stat().st_mode & ~0o222)
    return root


def torch_read(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor, as torch's HuggingFaceStorageReader reads the folder (one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    md = HuggingFaceStorageReader(str(folder)).read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=True)
    return sd


def assemble(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor from merger's extents alone."""
    out = {}
    for name, t in read_checkpoint(folder).items():
        buf = bytearray(t.nbytes)
        for e in t.extents:  # a strided extent: row i at offset + i * nbytes, landing at start + i * stride
            with open(e.path, "rb") as f:
                for i in range(e.rows):
                    f.seek(e.offset + i * e.nbytes)
                    buf[e.start + i * e.stride: e.start + i * e.stride + e.nbytes] = f.read(e.nbytes)
        out[name] = torch.frombuffer(buf, dtype=getattr(torch, t.dtype)).reshape(t.shape).clone()
    return out


def test_detected_and_read_as_torch_reads_it(runs):
    for step in (2, 4, 6):
        folder = runs / "run" / f"step-{step}"
        assert of(folder).NAME == "dcp_safetensors"
        ours, ref = assemble(folder), torch_read(folder)
        assert set(ours) == set(ref) and len(ref) > 10
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and torch.equal(ours[k], ref[k]), k
    assert len(list((runs / "run" / "step-6").glob("shard-*.safetensors"))) == 3  # another chunking
    ours, expected = assemble(runs / "tp"), torch.load(runs / "tp" / "expected.pt")
    assert set(ours) == set(expected) and all(torch.equal(ours[k], expected[k]) for k in expected)


def test_average_within_one_ulp_and_loads_into_fsdp2(runs, tmp_path):
    out = tmp_path / "merged"
    r = runner.invoke(app, ["average", str(runs / "run"), "-r", "step-2..step-6", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [s["name"] for s in res["plan"]["inputs"]] == ["step-2", "step-4", "step-6"]
    merged = load_file(out / "model.safetensors")
    refs = [torch_read(runs / "run" / f"step-{s}") for s in (2, 4, 6)]
    assert set(merged) == set(refs[0])
    for k, v in merged.items():
        ref = sum(r[k].double() for r in refs) / 3
        assert v.dtype == refs[0][k].dtype and ((v.double() - ref).abs() <= ulp(ref, v.dtype)).all(), k
    manifest = json.loads((out / "merger.json").read_text())
    assert manifest["sources"][-1]["files"][0]["file"].startswith("shard-00001-model-")
    _run(["load", str(out), str(tmp_path / "loaded.pt"), "--hf"], 2)  # dcp.load into a 2-rank FSDP2 model
    loaded = torch.load(tmp_path / "loaded.pt")
    assert set(loaded) == set(merged) and all(torch.equal(loaded[k], merged[k]) for k in merged)


def test_key_picks_prefixes(runs, tmp_path):
    out = tmp_path / "o"
    r = runner.invoke(app, ["average", str(runs / "run" / "step-2"), str(runs / "run" / "step-4"), "--key",
                            "gpt_neox.layers", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert set(load_file(out / "model.safetensors")) == {k for k in torch_read(runs / "run" / "step-2")
                                                          if k.startswith("gpt_neox.layers.")}
    r = runner.invoke(app, ["average", str(runs / "run" / "step-2"), str(runs / "run" / "step-4"), "--key",
                            "transformer", "-o", str(tmp_path / "o2")])
    assert r.exit_code == 1 and "--key transformer" in r.stderr and "gpt_neox" in r.stderr, r.output


def _resave(path: Path, change) -> None:
    """Rewrite a shard file with ``change(tensors, sharding_info)`` applied."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["DCP_SHARDING_INFO"])
    change(tensors, info)
    path.unlink()
    save_file(tensors, str(path), metadata={**meta, "DCP_SHARDING_INFO": json.dumps(info)})


def _first(info):
    return next(iter(info))


@pytest.mark.parametrize("kind,expected", [
    ("missing_first", ["no shard-00001-model-*.safetensors", "a rank's file is missing"]),
    ("missing_last", ["shape [96, 32] in step-2 but [48, 32] in step-4"]),
    ("overlap", ["overlapping"]),
    ("dtype", ["slices of different dtypes", "float32", "float64"]),
    ("no_offsets", ["gives no saved_offsets"]),
])
def test_bad_shards_are_refused(runs, tmp_path, kind, expected):
    run = tmp_path / "run"
    for s in (2, 4):
        shutil.copytree(runs / "run" / f"step-{s}", run / f"step-{s}")
    for p in run.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    shard = sorted((run / "step-4").glob("shard-*.safetensors"))[-1]
    if kind == "missing_first":
        sorted((run / "step-4").glob("shard-*.safetensors"))[0].unlink()
    elif kind == "missing_last":  # not visible in the folder itself: its shapes differ from step-2's
        shard.unlink()
    elif kind == "overlap":
        _resave(shard, lambda t, info: info[_first(info)].update(saved_offsets=[0] * len(
            info[_first(info)]["saved_offsets"])))
    elif kind == "dtype":
        _resave(shard, lambda t, info: t.update({_first(info): t[_first(info)].double()}))
    else:
        _resave(shard, lambda t, info: info.pop(_first(info)))
    before = tree_digest(run)
    out = tmp_path / "out"
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=run, before=before)


def test_explicit_sharded_folders_take_their_step_folders_names(runs, tmp_path):
    """torchtitan's ``step-N/sharded`` given by path: named and ordered as ``step-N``."""
    for src, step in (("step-2", 20), ("step-4", 10)):
        shutil.copytree(runs / "run" / src, tmp_path / f"step-{step}" / "sharded")
    r = runner.invoke(app, ["average", str(tmp_path / "step-20" / "sharded"), str(tmp_path / "step-10" / "sharded"),
                            "-o", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    inputs = json.loads(r.stdout)["plan"]["inputs"]
    assert [(i["name"], i["step"]) for i in inputs] == [("step-10", 10), ("step-20", 20)]
