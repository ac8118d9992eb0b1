"""A DCP tensor cut along columns (tensor parallelism) and merged whole (``--to safetensors``): one
strided extent per chunk, never one per row, and the rows read a slice at a time within
``--max-memory``.

The runs are written by torch's own DCP writer (``dcp.save`` of a legacy ``ShardedTensor`` whose
column chunks are all local to one gloo rank, in a subprocess); the merge is checked against the
float64 mean of what torch's DCP reader reads (<= 1 ulp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import ulp
from merger.cli import app
from merger.formats import read_checkpoint
from merger.units import SMALL, sizes

pytestmark = pytest.mark.slow  # runs written by torch's DCP writer in subprocesses; 2-byte rows (~20 s)

runner = CliRunner()

WRITER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import (Shard, ShardedTensor, ShardedTensorMetadata,
                                                         TensorProperties)
    folder, rows, cols, cuts, dtype, seed = sys.argv[1:7]
    rows, cols, cuts, seed = int(rows), int(cols), int(cuts), int(seed)
    dist.init_process_group("gloo", init_method=f"file://{folder}.store", rank=0, world_size=1)
    full = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(getattr(torch, dtype))
    w = cols // cuts
    pieces = [((0, i * w), (rows, w)) for i in range(cuts)]
    shards = [Shard.from_tensor_and_offsets(full[:, o[1]:o[1] + s[1]].contiguous(), list(o), 0) for o, s in pieces]
    props = TensorProperties(dtype=full.dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    meta = ShardedTensorMetadata([ShardMetadata(list(o), list(s), "rank:0/cpu") for o, s in pieces], full.shape, props)
    st = ShardedTensor._init_from_local_shards_and_global_metadata(shards, sharded_tensor_metadata=meta,
                                                                   process_group=None)
    dcp.save({"model": {"w": st, "b": torch.randn(3, generator=torch.Generator().manual_seed(seed))},
              "optim": {"lr": torch.tensor(0.1)}}, checkpoint_id=folder)
    dist.destroy_process_group()
""")


def write_run(root: Path, rows: int, cols: int, cuts: int, dtype: str, steps=(1, 2)) -> Path:
    """``root/step-N``: a [rows, cols] tensor cut into ``cuts`` column chunks, by torch's DCP writer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root.mkdir(parents=True, exist_ok=True)  # the gloo FileStore waits forever for a file it can't create
    for s in steps:
        folder = root / f"step-{s}"
        r = subprocess.run([sys.executable, "-c", WRITER, str(folder), str(rows), str(cols), str(cuts), dtype, str(s)],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        Path(f"{folder}.store").unlink(missing_ok=True)
    return root


def torch_reads(folder: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = _load_state_dict_from_keys({"model"}, checkpoint_id=str(folder))["model"]
    return {f"model.{k}": v for k, v in sd.items()}


def assert_mean(out: Path, run: Path, steps=(1, 2)) -> None:
    merged = load_file(out / "model.safetensors")
    refs = [torch_reads(run / f"step-{s}") for s in steps]
    assert set(merged) == set(refs[0])
    for k, v in merged.items():
        ref = sum(r[k].double() for r in refs) / len(refs)
        assert v.dtype == refs[0][k].dtype and ((v.double() - ref).abs() <= ulp(ref, v.dtype)).all(), k


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """[4096, 4096] float32 cut into 8 column chunks (64 MB a revision), two revisions."""
    return write_run(tmp_path_factory.mktemp("wide"), 4096, 4096, 8, "float32")


def test_a_column_cut_tensor_is_one_extent_per_chunk(wide):
    tracemalloc.start()
    try:
        layout = read_checkpoint(wide / "step-1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    t = layout["model.w"]
    assert len(t.extents) <= 2 * 8  # O(chunks): it was 4096 x 8 = 32768, one per row and chunk
    assert len(t.extents) == 8 and all(e.rows == 4096 and e.nbytes == 512 * 4 for e in t.extents)
    assert peak < 4 << 20, f"reading the layout allocated {peak} bytes"


def test_a_column_cut_tensor_merged_whole_is_what_torch_reads(wide, tmp_path):
    out = tmp_path / "avg"
    r = runner.invoke(app, ["average", str(wide), "--to", "safetensors", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["plan"]["tensors"] == 2  # whole: w and b
    assert_mean(out, wide)


def test_rows_of_one_element_stay_within_max_memory(tmp_path):
    """A [2^16, 2] bfloat16 tensor cut into its 2 columns: a row is 2 bytes, 2^16 rows a chunk. The
    layout is 2 extents; the merge reads the rows a slice at a time, and what Python allocates on
    the way (tracemalloc) stays below --max-memory (it held 2^17 extents per input before, ~25 MB)."""
    run = write_run(tmp_path / "run", 1 << 16, 2, 2, "bfloat16")
    assert [e.rows for e in read_checkpoint(run / "step-1")["model.w"].extents] == [1 << 16, 1 << 16]
    out = tmp_path / "avg"
    with sizes(**SMALL):
        plan = runner.invoke(app, ["average", str(run), "--to", "safetensors", "--max-memory", "8MB", "--dry-run",
                                   "--json"])
        assert plan.exit_code == 0, plan.output
        assert json.loads(plan.stdout)["estimated_memory"] <= 8_000_000
        small = runner.invoke(app, ["average", str(run), "--to", "safetensors", "--max-memory", "100KB", "-o",
                                    str(out)])
        assert small.exit_code == 1 and "--max-memory 100.00 KB is too small" in small.output, small.output
        tracemalloc.start()
        try:
            r = runner.invoke(app, ["average", str(run), "--to", "safetensors", "--max-memory", "8MB", "-o", str(out)])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert r.exit_code == 0, r.output
    assert peak < 8_000_000, f"the merge allocated {peak} bytes in Python"
    assert_mean(out, run)
