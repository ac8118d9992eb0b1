"""torch.distributed.checkpoint (DCP) runs: read where the chunks lie, averaged, written back as DCP.

The runs are written once per session by torch's own writer (``tests/dcp_train.py``): a tiny
GPT-NeoX sharded with FSDP2 ``fully_shard`` over 2 gloo ranks with AdamW, ``{"model", "optim"}``
saved with ``dcp.save`` at steps 2, 4, 6 (``step-N/``, torchtitan's names), resumed on 3 ranks for
steps 8 and 10 (other chunkings, uneven); a single-process (``no_dist``) run in OLMo-core's
``stepN/model_and_optim/``; tensors cut along dims 1 and 2 as tensor parallelism cuts them.
Every number is checked against torch's own DCP reader (float64 reference, <= 1 ulp), the output
is loaded back with ``dcp.load`` in one process and into a 2-rank FSDP2 model, and every bad input
goes through the real CLI (exit 1, ``Error:`` + hint, nothing written, inputs unchanged).
"""

from __future__ import annotations

import io
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
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import ulp
from merger.cli import app
from merger.formats import Extent, TensorInfo, of, read_checkpoint
from merger.formats.dcp import chunk_extents
from merger.formats.dcp_metadata import Chunk
from helpers.checks import check_refused, tree_digest

runner = CliRunner()
SCRIPT = Path(__file__).parents[1] / "dcp_train.py"  # a fixture script, run by torchrun
pytestmark = pytest.mark.slow  # one session fixture runs torchrun twice (about a minute on 2 cores)


def _run(args: list[str], *, nproc: int | None) -> None:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
           if nproc else [sys.executable]) + [str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Path:
    """``titan/step-{2,4,6}`` (2 ranks) + ``titan/step-{8,10}`` (3 ranks), ``olmo/step{2,4}/model_and_optim``
    (one process), ``tp/`` (chunks cut along dims 1 and 2), ``tp-run/step-2`` (the same cuts, other
    values) and ``tp-run/step-3`` (3 ranks: other cuts)."""
    root = tmp_path_factory.mktemp("dcp")
    _run(["train", str(root / "titan"), "--steps", "6", "--every", "2", "--tp", str(root / "tp")], nproc=2)
    _run(["train", str(root / "titan"), "--steps", "4", "--every", "2", "--resume", str(root / "titan/step-6"),
          "--tp", str(root / "tp-run/step-3"), "--tp-seed", "9"], nproc=3)
    _run(["train", str(root / "tp-run"), "--steps", "0", "--tp", str(root / "tp-run/step-2"), "--tp-seed", "8"],
         nproc=2)
    _run(["train", str(root / "olmo"), "--steps", "4", "--every", "2", "--layout", "olmo", "--no-dist"], nproc=None)
    for p in sorted(root.rglob("*")):  # the inputs are never written to: make that a hard fact
        p.chmod(p.stat().st_mode & ~0o222)
    return root


def torch_model_part(folder: Path) -> dict[str, torch.Tensor]:
    """The model part as torch's own DCP reader reads it (one process), keys as merger names them."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = _load_state_dict_from_keys({"model"}, checkpoint_id=str(folder))["model"]
    return {f"model.{k}": v for k, v in sd.items()}


def read_extents(t: TensorInfo) -> torch.Tensor:
    """A tensor assembled from merger's extents alone."""
    buf = bytearray(t.nbytes)
    for e in t.extents:  # a strided extent: row i at offset + i * nbytes, landing at start + i * stride
        with open(e.path, "rb") as f:
            for i in range(e.rows):
                f.seek(e.offset + i * e.nbytes)
                buf[e.start + i * e.stride: e.start + i * e.stride + e.nbytes] = f.read(e.nbytes)
    return torch.frombuffer(buf, dtype=getattr(torch, t.dtype)).reshape(t.shape) if buf else torch.empty(t.shape)


def average(args: list[str], out: Path) -> dict:
    r = runner.invoke(app, ["average", *args, "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def assert_mean(out: dict[str, torch.Tensor], inputs: list[Path], weights: list[float]) -> None:
    refs = [torch_model_part(p) for p in inputs]
    assert set(out) == set(refs[0]), "the output's keys are the model part, exactly"
    for k, v in out.items():
        ref = sum(w * r[k].double() for w, r in zip(weights, refs))
        assert v.dtype == refs[-1][k].dtype
        assert ((v.double() - ref).abs() <= ulp(ref, v.dtype)).all(), k


def load_dcp(folder: Path) -> dict[str, torch.Tensor]:
    """Every entry of a DCP folder, read by torch's reader."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = _load_state_dict_from_keys(checkpoint_id=str(folder))
    return {f"{g}.{k}": v for g, part in sd.items() for k, v in part.items()}


# -- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ckpt, ranks", [("titan/step-2", 2), ("titan/step-10", 3),
                                         ("olmo/step4/model_and_optim", 1), ("tp", 2)])
def test_extents_hold_the_bytes_torch_reads(runs, ckpt, ranks):
    folder = runs / ckpt
    assert of(folder).NAME == "dcp"
    layout = read_checkpoint(folder)
    ref = torch_model_part(folder) if ckpt != "tp" else {
        f"model.{k}": v for k, v in torch.load(folder / "expected.pt").items()}
    assert set(layout) == set(ref)  # the model part only: no optim.* entry
    for name, t in layout.items():
        assert torch.equal(read_extents(t), ref[name]), name
        assert len(t.files) == min(ranks, t.shape[0] if t.shape else 1) or ckpt == "tp"
    if ckpt == "tp":  # one extent per rank: strided (its rows) for the column chunks, plain for dim-0 chunks
        assert [len(layout[n].extents) for n in ("model.w_col", "model.w_3d", "model.w_row")] == [2, 2, 2]
        assert [e.rows for n in ("model.w_col", "model.w_3d") for e in layout[n].extents] == [6, 6, 6, 6]


def test_chunk_extents_coalesce_whole_trailing_dims():
    # a (4, 6, 5) tensor, chunk rows 1..3, columns 2..5, every element of the last dim: 2 runs of 3 x 5,
    # one strided extent (rows 6 x 5 x 4 bytes apart)
    ex = chunk_extents("f", 100, (4, 6, 5), Chunk((1, 2, 0), (2, 3, 5), "f"), 4)
    assert ex == [Extent("f", 100, (30 + 2 * 5) * 4, 60, rows=2, stride=120)]
    # cut along dims 1 and 2 of a 3-d tensor: a strided extent per index of dim 0
    ex = chunk_extents("f", 0, (3, 4, 5), Chunk((1, 1, 2), (2, 2, 3), "f"), 1)
    assert ex == [Extent("f", 6 * i, 20 * (1 + i) + 5 + 2, 3, rows=2, stride=5) for i in range(2)]
    assert chunk_extents("f", 8, (4, 6), Chunk((2, 0), (2, 6), "f"), 2) == [Extent("f", 8, 24, 24)]


RECORD_TENSORS = [torch.randn(1100, 1000), torch.tensor(1.5, dtype=torch.bfloat16), torch.arange(7),
                  torch.zeros(0, 3), torch.randn(3, 5, dtype=torch.float16)]


def _raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def test_records_are_what_torch_load_reads():
    """merger's torch-free record frames (head + the tensor's bytes + tail with their CRC-32): a
    tensor larger than one 4 MB piece, a bf16 scalar, int64, an empty tensor, fp16; torch.load reads
    each back, zipfile verifies every member's CRC, and the storage is 64-byte aligned as torch.save
    aligns it."""
    import zipfile
    import zlib

    from merger.output.dcp_records import record_head, record_tail

    for t in RECORD_TENSORS:
        raw = _raw(t)
        head = record_head(_dt(t), tuple(t.shape), len(raw))
        tail = record_tail(_dt(t), tuple(t.shape), len(raw), zlib.crc32(raw))
        assert len(head) % 64 == 0 and len(tail) == len(record_tail(_dt(t), tuple(t.shape), len(raw), 0))
        back = torch.load(io.BytesIO(head + raw + tail), weights_only=True)
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)
        with zipfile.ZipFile(io.BytesIO(head + raw + tail)) as zf:
            assert zf.testzip() is None and zf.read("archive/data/0") == raw
        bad = head + raw + record_tail(_dt(t), tuple(t.shape), len(raw), zlib.crc32(raw) ^ 1)
        with zipfile.ZipFile(io.BytesIO(bad)) as zf:  # the CRC is real: a wrong one is caught
            assert zf.testzip() == "archive/data/0"


def test_a_record_of_more_than_4_gib_is_zip64(tmp_path):
    """A storage of 2**32 + 64 bytes (a sparse file: no disk): sizes and offsets past 4 GiB go
    into zip64 fields, and zipfile finds the member, its size and where its bytes start."""
    import zipfile
    import zlib

    from merger.output.dcp_records import record_head, record_tail

    n = (1 << 32) + 64
    crc, zero = 0, bytes(1 << 26)
    for at in range(0, n, len(zero)):
        crc = zlib.crc32(zero[: min(len(zero), n - at)], crc)
    head = record_head("float32", (n // 4,), n)
    with open(tmp_path / "big.distcp", "wb") as f:
        f.write(head)
        f.seek(len(head) + n)
        f.write(record_tail("float32", (n // 4,), n, crc))
    with zipfile.ZipFile(tmp_path / "big.distcp") as zf:
        info = zf.getinfo("archive/data/0")
        assert info.file_size == n and info.CRC == crc and info.header_offset < len(head)
        assert zf.read("archive/version") == b"3\n"
        with zf.open(info) as m:
            assert m.read(16) == bytes(16) and zf.fp.tell() > 0


def test_a_chunk_whose_size_1_dim_has_any_stride_is_contiguous(tmp_path):
    """``x[i:i+1]`` or ``y.t()`` of a column keeps a stride on its size-1 dim that torch ignores
    (``is_contiguous()``); such chunks, saved by torch's own DCP writer, average like any other."""
    import torch.distributed.checkpoint as dcp

    run, ins = tmp_path / "run", []
    for s in (1, 2):
        g = torch.Generator().manual_seed(s)
        sd = {"a": torch.randn(5, 1, generator=g).t(), "b": torch.randn(3, 4, 6, generator=g)[1:2]}
        assert sd["a"].stride() == (1, 1) and sd["a"].is_contiguous()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": sd}, checkpoint_id=str(run / f"step-{s}"), no_dist=True)
        ins.append(sd)
    out = tmp_path / "avg"
    average([str(run)], out)
    got = load_dcp(out)
    for k in ("a", "b"):
        want = ((ins[0][k].double() + ins[1][k].double()) / 2).float()
        assert torch.equal(got[f"model.{k}"], want), k


@pytest.mark.fuzz
def test_crc32_combine_is_zlibs(rng):
    import zlib

    from merger.output.crc import crc32_combine

    for n1, n2 in [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 123457), (3, 1 << 20), (77, 4095)]:
        a, b = rng.randbytes(n1), rng.randbytes(n2)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), n2) == zlib.crc32(a + b), (n1, n2)


@pytest.mark.fuzz
def test_frames_are_the_same_bytes_whatever_order_the_data_comes_in(tmp_path, rng):
    """The shard writer puts each record's head before the tensor and its tail (with the CRC it
    took on the way) after: in order, in reverse, or cut into pieces in any order, the file is
    the same, and torch.load reads every record at its place."""
    import zlib

    from merger.output.dcp_records import record_head, record_tail
    from merger.output.shards import Frames, ShardWriter

    heads, starts, sizes, at = [], [], [], 0
    for t in RECORD_TENSORS:
        heads.append(record_head(_dt(t), tuple(t.shape), len(_raw(t))))
        starts.append(at + len(heads[-1]))
        sizes.append(len(_raw(t)))
        at = starts[-1] + sizes[-1] + len(record_tail(_dt(t), tuple(t.shape), sizes[-1], 0))

    def tail(i: int, crc: int) -> bytes:
        t = RECORD_TENSORS[i]
        return record_tail(_dt(t), tuple(t.shape), sizes[i], crc)

    frames = Frames(tuple(starts), tuple(sizes), tuple(heads), tail)
    pieces = [(starts[i] + a, _raw(t)[a: a + 1 << 20]) for i, t in enumerate(RECORD_TENSORS)
              for a in range(0, max(sizes[i], 1), 1 << 20)]
    orders = {"in order": pieces, "reversed": pieces[::-1], "shuffled": rng.sample(pieces, len(pieces))}
    files = {}
    for name, order in orders.items():
        w = ShardWriter(tmp_path / name, b"", at, hash=True, frames=frames)
        for pos, data in order:
            w.write(data, pos)
        checksum = w.finish()
        files[name] = (tmp_path / name).read_bytes()
        assert checksum == f"crc32:{zlib.crc32(files[name]):08x}"
    assert files["in order"] == files["reversed"] == files["shuffled"] and len(files["in order"]) == at
    for i, t in enumerate(RECORD_TENSORS):
        rec = files["in order"][starts[i] - len(heads[i]): starts[i] + sizes[i] + len(tail(i, 0))]
        assert torch.equal(torch.load(io.BytesIO(rec), weights_only=True), t)


# -- averaging ------------------------------------------------------------------------------------

def test_average_a_torchtitan_run(runs, tmp_path):
    out = tmp_path / "avg"
    average([str(runs / "titan"), "--revisions", "step2..step6", "--every", "2"], out)
    assert sorted(p.name for p in out.iterdir()) == [".metadata", "README.md", "__0_0.distcp", "merger.json"]
    res = json.loads((out / "merger.json").read_text())
    assert [s["name"] for s in res["sources"]] == ["step-2", "step-4", "step-6"]
    assert [f["file"] for f in res["sources"][0]["files"]] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert res["output"]["format"] == "dcp" and res["output"]["shards"] == [".metadata", "__0_0.distcp"]
    model = sum(t.numel() * 4 for t in torch_model_part(runs / "titan/step-2").values())
    assert res["read_bytes"] == 3 * model  # the optimizer's bytes (twice the model's) are never read
    assert_mean(load_dcp(out), [runs / f"titan/step-{s}" for s in (2, 4, 6)], [1 / 3] * 3)


def test_average_across_a_change_of_world_size(runs, tmp_path):
    """Steps 4 and 6 saved by 2 ranks, 8 and 10 by 3 (uneven chunks): EMA over the four."""
    out = tmp_path / "ema"
    average([str(runs / "titan"), "--revisions", "step-4..step-10", "--method", "ema", "--decay", "0.5"], out)
    w = [0.5 ** 3, 0.5 * 0.5 ** 2, 0.5 * 0.5, 0.5]
    assert_mean(load_dcp(out), [runs / f"titan/step-{s}" for s in (4, 6, 8, 10)], w)


def _tp_run(runs: Path, tmp_path: Path, steps=(1, 2)) -> Path:
    """``tp/`` as step-1, ``tp-run/step-2`` (same cuts) and ``tp-run/step-3`` (3 ranks) as they are."""
    run = tmp_path / "run"
    for s in steps:
        shutil.copytree(runs / "tp" if s == 1 else runs / f"tp-run/step-{s}", run / f"step-{s}")
    for p in run.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    return run


def _expected(runs: Path, steps) -> list[dict[str, torch.Tensor]]:
    return [{f"model.{k}": v for k, v in torch.load((runs / "tp" if s == 1 else runs / f"tp-run/step-{s}")
                                                     / "expected.pt").items()} for s in steps]


def test_tensor_parallel_chunks_merge_chunk_by_chunk(runs, tmp_path):
    """Tensors cut along dims 1 and 2 into the same chunks in every revision are merged chunk by chunk
    (one extent per chunk, not a run per row) and the output keeps those chunks: torch reads it back
    to the float64 mean within 1 ulp."""
    from torch.distributed.checkpoint import FileSystemReader

    run, out = _tp_run(runs, tmp_path), tmp_path / "avg"
    res = average([str(run)], out)
    assert res["plan"]["tensors"] == 5  # w_col and w_3d as 2 chunks each, w_row (cut along dim 0) whole
    md = FileSystemReader(str(out)).read_metadata()
    src = FileSystemReader(str(run / "step-1")).read_metadata()
    for name in ("model.w_col", "model.w_3d"):
        assert [(list(c.offsets), list(c.sizes)) for c in md.state_dict_metadata[name].chunks] == \
            [(list(c.offsets), list(c.sizes)) for c in src.state_dict_metadata[name].chunks]
    assert len(md.state_dict_metadata["model.w_row"].chunks) == 1
    merged, refs = load_dcp(out), _expected(runs, (1, 2))
    assert set(merged) == set(refs[0])
    for k, v in merged.items():
        ref = (refs[0][k].double() + refs[1][k].double()) / 2
        assert v.dtype == refs[0][k].dtype and ((v.double() - ref).abs() <= ulp(ref, v.dtype)).all(), k
    r = runner.invoke(app, ["average", str(run), "--dry-run", "--json"])
    plan = json.loads(r.stdout)
    assert r.exit_code == 0 and plan["tensors"] == 5


def test_tensor_parallel_chunks_that_differ_merge_whole(runs, tmp_path):
    """A revision saved by 3 ranks cuts w_col and w_3d otherwise: those merge as whole tensors."""
    run, out = _tp_run(runs, tmp_path, steps=(1, 3)), tmp_path / "avg"
    res = average([str(run)], out)
    assert res["plan"]["tensors"] == 3
    merged, refs = load_dcp(out), _expected(runs, (1, 3))
    for k, v in merged.items():
        ref = (refs[0][k].double() + refs[1][k].double()) / 2
        assert ((v.double() - ref).abs() <= ulp(ref, v.dtype)).all(), k


@pytest.mark.parametrize("damage, expected", [("drop", "are missing (chunks don't tile the tensor)"),
                                              ("twice", "overlaps another (chunks don't tile the tensor)")])
def test_chunks_merged_one_by_one_must_tile_the_tensor(runs, tmp_path, damage, expected):
    run = _tp_run(runs, tmp_path)

    def change(md):
        t = md.state_dict_metadata["model.w_col"]
        t.chunks = t.chunks[1:] if damage == "drop" else [t.chunks[0], t.chunks[0], *t.chunks[1:]]

    for s in (1, 2):  # the same damage in both: the chunks still agree, and are merged one by one
        edit_metadata(run / f"step-{s}", change)
    refused(run, tmp_path, "model.w_col", expected)


def test_average_an_olmo_core_run_to_safetensors(runs, tmp_path):
    out = tmp_path / "st"
    average([str(runs / "olmo"), "--to", "safetensors"], out)
    assert (out / "model.safetensors").is_file() and not (out / ".metadata").exists()
    assert_mean(load_file(out / "model.safetensors"), [runs / f"olmo/step{s}/model_and_optim" for s in (2, 4)],
                [0.5, 0.5])


def test_key_selects_the_model_part(runs, tmp_path):
    out = tmp_path / "keyed"
    average([str(runs / "titan"), "--revisions", "step-6,step-8", "--key", "model"], out)
    assert_mean(load_dcp(out), [runs / "titan/step-6", runs / "titan/step-8"], [0.5, 0.5])
    r = runner.invoke(app, ["average", str(runs / "titan"), "--key", "weights", "-o", str(tmp_path / "x")])
    assert r.exit_code == 1 and "no entry" in r.stderr and "model, optim" in r.stderr, r.output


# -- the output restarts training: dcp.load, one process and 2-rank FSDP2 --------------------------

@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("merged") / "avg"
    average([str(runs / "titan"), "--revisions", "step-6..step-10"], out)
    return out


def test_output_loads_into_the_model_in_one_process(merged):
    sys.path.insert(0, str(SCRIPT.parent))
    from dcp_train import build_model
    import torch.distributed.checkpoint as dcp

    model = build_model()
    sd = {"model": model.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, checkpoint_id=str(merged), no_dist=True)
    model.load_state_dict(sd["model"])
    want = load_dcp(merged)
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[f"model.{k}"]), k


def test_output_loads_into_a_2_rank_fsdp2_model(merged, tmp_path):
    _run(["load", str(merged), str(tmp_path / "full.pt")], nproc=2)
    full = torch.load(tmp_path / "full.pt")
    want = load_dcp(merged)
    assert set(f"model.{k}" for k in full) == set(want)
    for k, v in full.items():
        assert torch.equal(v, want[f"model.{k}"]), k


# -- bad inputs: the real CLI, nothing written, nothing changed ------------------------------------

class _System:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def broken_run(runs: Path, tmp_path: Path) -> Path:
    """A writable copy of ``titan/step-4`` and ``titan/step-6``."""
    run = tmp_path / "run"
    for s in (4, 6):
        shutil.copytree(runs / f"titan/step-{s}", run / f"step-{s}")
    for p in run.rglob("*"):
        p.chmod(p.stat().st_mode | 0o200)
    return run


def refused(run: Path, tmp_path: Path, *expected: str) -> str:
    out = tmp_path / "outs" / "merged"
    out.parent.mkdir(exist_ok=True)
    before = tree_digest(run)
    r = runner.invoke(app, ["average", str(run), "-o", str(out)])
    return check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=run, before=before)


def edit_metadata(folder: Path, change) -> None:
    """Rewrite ``.metadata`` (torch's own classes, unpickled by trust here) after ``change(md)``."""
    md = pickle.loads((folder / ".metadata").read_bytes())
    change(md)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def _model_chunk(md):
    """A model chunk stored in rank 1's file, and its storage record."""
    return next((k, v) for k, v in md.storage_data.items()
                if k.fqn.startswith("model.") and v.relative_path == "__1_0.distcp")


@pytest.mark.parametrize("where", ["whole file", "inside Metadata"])
def test_metadata_with_code_is_refused_and_never_runs(runs, tmp_path, where):
    run = broken_run(runs, tmp_path)
    marker = tmp_path / "pwned"
    evil = _System(f"touch {marker}")
    if where == "whole file":
        (run / "step-6/.metadata").write_bytes(pickle.dumps(evil))
    else:
        edit_metadata(run / "step-6", lambda md: setattr(md, "planner_data", {"x": evil}))
    refused(run, tmp_path, "step-6/.metadata", "posix.system", "refuses it without running anything")
    assert not marker.exists(), "the pickle's payload ran"
    pickle.loads((run / "step-6/.metadata").read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_truncated_distcp(runs, tmp_path):
    run = broken_run(runs, tmp_path)
    f = run / "step-6/__1_0.distcp"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(run, tmp_path, "step-6/__1_0.distcp: is shorter than the metadata says: it has", "(tensor 'model.")


def test_missing_rank_file(runs, tmp_path):
    run = broken_run(runs, tmp_path)
    (run / "step-4/__1_0.distcp").unlink()
    refused(run, tmp_path, "step-4/__1_0.distcp: is missing: tensor 'model.", "every __<rank>_<i>.distcp")


def test_metadata_points_past_the_end_of_a_file(runs, tmp_path):
    run = broken_run(runs, tmp_path)
    size = (run / "step-6/__1_0.distcp").stat().st_size
    name = []

    def past_end(md):
        k, v = _model_chunk(md)
        v.offset = size - v.length // 2
        name.append(k.fqn)

    edit_metadata(run / "step-6", past_end)
    refused(run, tmp_path, f"step-6/__1_0.distcp: is shorter than the metadata says: tensor {name[0]!r}")


@pytest.mark.parametrize("where, expected", [
    ("../outside.distcp", "storage file '../outside.distcp' is not a file name inside the checkpoint"),
    ("link.distcp", "is a link to"),
    ("fifo.distcp", "not a regular file"),
    ("__1_0\x00.distcp", "storage file '__1_0\\x00.distcp' holds a NUL byte"),
])
def test_metadata_naming_a_file_outside_the_checkpoint(runs, tmp_path, where, expected):
    """A .distcp the metadata names must be a regular file inside the checkpoint: never read
    elsewhere on the machine (a name with .., a link out), never waited on (a FIFO); a name with a
    NUL byte is refused as such (it was "unexpected ValueError")."""
    run = broken_run(runs, tmp_path)
    outside = tmp_path / "secret.distcp"
    shutil.copyfile(run / "step-6/__1_0.distcp", outside)  # the same bytes, so only the place is wrong
    if where == "../outside.distcp":
        shutil.copyfile(outside, run / "outside.distcp")
    elif where == "link.distcp":
        (run / "step-6" / where).symlink_to(outside)
    elif where == "fifo.distcp":
        os.mkfifo(run / "step-6" / where)

    def elsewhere(md):
        for v in md.storage_data.values():
            if v.relative_path == "__1_0.distcp":
                v.relative_path = where

    edit_metadata(run / "step-6", elsewhere)
    refused(run, tmp_path, expected)


@pytest.mark.parametrize("damage, expected", [
    ("drop a chunk", "its chunks hold"),
    ("chunk twice", "are overlapping (chunks don't tile the tensor)"),
    ("compressed", "is stored with DCP transforms (stream.zstd/1"),
    ("garbage record", "the chunk's record is unreadable"),
])
def test_chunks_that_cannot_be_read_where_they_lie(runs, tmp_path, damage, expected):
    run = broken_run(runs, tmp_path)

    def change(md):
        k, v = _model_chunk(md)
        t = md.state_dict_metadata[k.fqn]
        if damage == "drop a chunk":
            t.chunks = [c for c in t.chunks if list(c.offsets) != list(k.offset)]
        elif damage == "chunk twice":
            t.chunks = t.chunks + [t.chunks[0]]
        elif damage == "compressed":
            v.transform_descriptors = ["stream.zstd/1"]
        else:
            v.offset += 7

    edit_metadata(run / "step-6", change)
    refused(run, tmp_path, "step-6", expected)
