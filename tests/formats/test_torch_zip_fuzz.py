"""Fuzzing torch zip pickles: for any tensor records a crafted ``pytorch_model.bin`` may hold
(storage dtype and size, offset, shape, strides: negative, huge, mismatched, size-1 dims with any
stride), merger either merges exactly what ``torch.load`` reads, or refuses with exit 1 and a
message naming the file — never "unexpected", never a traceback, never garbage. Where torch itself
can't read the file, merger must refuse it too."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers.crafted import Storage, Tensor, write_torch_zip
from helpers.fuzz import examples
from merger.cli import app

pytestmark = pytest.mark.fuzz
runner = CliRunner()
STORAGES = {"HalfStorage": (torch.HalfStorage, torch.float16), "FloatStorage": (torch.FloatStorage, torch.float32)}


dims = st.integers(min_value=-2, max_value=6)
record = st.fixed_dictionaries({
    "storage": st.sampled_from(sorted(STORAGES)),
    "numel": st.integers(min_value=0, max_value=40),
    "declared": st.one_of(st.none(), st.integers(min_value=-3, max_value=60)),  # the record's own numel
    "offset": st.integers(min_value=-3, max_value=45),
    "shape": st.lists(dims, min_size=0, max_size=3),
    "stride": st.lists(st.integers(min_value=-2, max_value=12), min_size=0, max_size=3),
})


def write(path: Path, recs: list[dict]) -> None:
    tensors, blobs = {}, {}
    for i, r in enumerate(recs):
        cls, dt = STORAGES[r["storage"]]
        numel = r["numel"] if r["declared"] is None else r["declared"]
        tensors[f"t{i}"] = Tensor(Storage(str(i), numel, cls), r["offset"], r["shape"], r["stride"])
        blobs[str(i)] = torch.arange(r["numel"], dtype=dt).numpy().tobytes()
    write_torch_zip(path, tensors, blobs)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
@given(recs=st.lists(record, min_size=1, max_size=3))
def test_merger_reads_what_torch_reads_or_refuses(tmp_path_factory, recs):
    tmp = tmp_path_factory.mktemp("fuzz")
    a, b = tmp / "a", tmp / "b"
    a.mkdir()
    write(a / "pytorch_model.bin", recs)
    shutil.copytree(a, b)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = torch.load(a / "pytorch_model.bin", weights_only=True)
        want = {k: v.contiguous() for k, v in want.items()}
    except Exception:  # noqa: BLE001 - torch can't read it: merger must refuse
        want = None
    r = runner.invoke(app, ["average", str(a), str(b), "-o", str(tmp / "out")])
    assert "Traceback" not in r.output and "Error: unexpected" not in r.output, r.output
    if r.exit_code == 0:
        assert want is not None, f"merger merged a file torch can't read: {recs}"
        got = load_file(str(tmp / "out" / "model.safetensors"))
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    else:
        assert r.exit_code == 1, r.output
        assert "a/pytorch_model.bin" in r.output or "b/pytorch_model.bin" in r.output, r.output
        assert not (tmp / "out").exists()
