"""Every loop crossed: each path run with ``merger.units.SIZES`` made small (``SMALL``), so that
test-sized tensors span many chunks, stream pieces, native units, blocks, preads, O_DIRECT stages,
output parts, ``.pt`` copy pieces and torch.save record heads, each checked against the in-memory
float64 reference (``conftest.check_against_reference``: 1 ulp of the output dtype, or the
accumulation bound where the sum cancels; tensors identical in every input bit for bit).

The paths: blocks with the native and with the torch kernel (safetensors, ``.bin``, ``--to dcp``,
``--to safetensors``), a nanoGPT run (``--to nanogpt``), the stream schedule (fake Hub), torchrun
with 2 and 3 ranks, ``merger sweep``'s sliding sums, ``merger grow``, and ``--resume`` on the blocks
and the stream schedules. ``crossed`` asserts that the sizes really are crossed, so these tests can't
quietly stop covering what they are for. The tests at the real default sizes, with tensors bigger
than every default, are at the end (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from helpers import fakehub
from helpers.checks import Interrupt, partial_of
from helpers import assert_close_ulp, check_against_reference, files_equal, load_dir, make_run, reference
from merger.api import average
from merger.cli import app
from merger.plan import Method, Options
from merger.testing import synth
from merger.units import SIZES, SMALL, sizes

REPO = Path(__file__).resolve().parents[2]
fake_hub = fakehub.fake_hub
runner = CliRunner()
SHAPE = synth.Shape(hidden=64, layers=2, heads=4, vocab=1000, max_pos=64)  # embeddings: 64000 elements
STEPS = (1000, 2000, 3000, 4000)
EMA = Method("ema", decay=0.7)


@pytest.fixture
def small():
    with sizes(**SMALL) as s:
        assert os.environ["MERGER_SIZES"]  # the processes a test starts (torchrun ranks) get them too
        yield s
    assert SIZES.chunk == 1 << 18 and "MERGER_SIZES" not in os.environ


def crossed(plan) -> None:
    """Every size this plan's loops run over is crossed more than once by its largest tensor."""
    s = SIZES
    big = max(plan.tensors, key=lambda t: t.numel)
    assert big.numel > 2 * s.piece and big.numel > 2 * s.unit and big.numel > 2 * s.chunk
    nbytes = big.numel * big.itemsize
    assert nbytes > 2 * max(s.read_piece, s.stage, s.copy_piece, s.record_head + s.record_tail)
    assert len(plan.blocks) > 2 and any(sl.start > 0 for b in plan.blocks for sl in b), "no tensor cut into ranges"


def torch_dcp_read(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder, read by torch's own reader."""
    import warnings

    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _load_state_dict_from_keys(checkpoint_id=str(folder))


def check_tensors(got: dict[str, torch.Tensor], sds, w) -> None:
    """``got`` within 1 ulp of the float64 reference; integer tensors exactly."""
    ref = reference(sds, w)
    assert set(got) == set(ref)
    for k, r in ref.items():
        if r.is_floating_point():
            assert_close_ulp(got[k], r, name=k)
        else:
            assert torch.equal(got[k], r), k


def run_of(tmp_path, fmt="safetensors", dtype=torch.float16):
    return make_run(tmp_path / "run", shape=SHAPE, steps=STEPS, fmt=fmt, dtype=dtype, seed=3)


def weights() -> list[float]:
    from merger.plan.methods import weights_for

    return list(weights_for(EMA, len(STEPS)))


# -- blocks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,fmt,to", [("native", "safetensors", None), ("torch", "bin", None),
                                           ("native", "bin", "safetensors"), ("torch", "safetensors", "dcp"),
                                           ("native", "safetensors", "dcp")])
def test_blocks(small, tmp_path, monkeypatch, kernel, fmt, to):
    root, sds = run_of(tmp_path, fmt)
    monkeypatch.setenv("MERGER_KERNEL", kernel)
    out = tmp_path / "out"
    plan, res = average([str(root)], output=out, options=Options(method=EMA, to=to, max_shard_size=30_000))
    assert res.kernel == kernel and plan.schedule == "blocks" and len(plan.shards) > 2
    crossed(plan)
    if to == "dcp":
        check_tensors(torch_dcp_read(out), sds, weights())
    else:
        check_against_reference(out, sds, weights())


def test_both_kernels_give_the_same_bits(small, tmp_path, monkeypatch):
    root, _ = run_of(tmp_path)
    for kernel in ("native", "torch"):
        monkeypatch.setenv("MERGER_KERNEL", kernel)
        average([str(root)], output=tmp_path / kernel, options=Options(method=EMA, max_shard_size=30_000))
    assert files_equal(tmp_path / "native", tmp_path / "torch")


def test_nanogpt_run_to_nanogpt(small, tmp_path):
    from merger.testing.nanogpt import nanogpt_run

    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=1000, bias=True, dropout=0.0)
    run = nanogpt_run(tmp_path / "out", args, steps=(100, 200, 300))
    r = runner.invoke(app, ["average", str(run), "-o", str(tmp_path / "avg"), "--max-shard-size", "20KB", "--json"])
    assert r.exit_code == 0, r.output
    ckpt = torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)
    ins = [torch.load(run / f"ckpt_{s}.pt", weights_only=True)["model"] for s in (100, 200, 300)]
    assert ins[0]["transformer.wte.weight"].numel() * 4 > 2 * SIZES.copy_piece
    ref = reference(ins, [1 / 3] * 3)
    assert list(ckpt["model"]) == list(ins[-1])
    for k, v in ckpt["model"].items():
        assert_close_ulp(v, ref[k], name=k)


# -- stream ----------------------------------------------------------------------------------------

def publish(hub, tmp_path, repo="org/small"):
    sds = []
    for s in STEPS:
        sds.append(synth.pythia_state_dict(SHAPE, seed=4, step=s))
        hub.add_revision(repo, f"step{s}", synth.save_checkpoint(tmp_path / "src" / f"step{s}", sds[-1], fmt="bin",
                                                                 config=SHAPE.config()))
    return sds


def test_stream(small, fake_hub, tmp_path):
    sds = publish(fake_hub, tmp_path)
    opts = Options(method=EMA, keep=False, max_shard_size=30_000)
    plan, res = average(["org/small"], revisions="step1000..step4000", options=opts, output=tmp_path / "stream")
    assert plan.schedule == "stream" and [s.name for s in plan.sources] == [f"step{s}" for s in STEPS]
    assert max(t.numel for t in plan.tensors) > 2 * SIZES.piece
    check_against_reference(tmp_path / "stream", sds, weights())
    # the same merge from the local folders (blocks): the same bits
    average([str(tmp_path / "src")], output=tmp_path / "blocks", options=opts)
    assert files_equal(tmp_path / "stream", tmp_path / "blocks")


def test_stream_resume_after_ctrl_c(small, fake_hub, tmp_path):
    sds = publish(fake_hub, tmp_path)
    opts = Options(method=EMA, max_shard_size=30_000, keep=False)  # nothing stays cached: each run streams
    whole = tmp_path / "whole"
    plan, _ = average(["org/small"], revisions="step1000..step4000", options=opts, output=whole)
    out = tmp_path / "out" / "merged"
    n = len(plan.tensors)
    with pytest.raises(KeyboardInterrupt):  # in the third revision: two are folded and saved
        average(["org/small"], revisions="step1000..step4000", options=opts, output=out,
                progress=Interrupt(2 * n + 3))
    state = json.loads((partial_of(out) / "progress.json").read_text())["stream"]
    assert state["folded"] == 2
    _, res = average(["org/small"], revisions="step1000..step4000", output=out,
                     options=Options(method=EMA, max_shard_size=30_000, keep=False, resume=True))
    assert res.warnings == ["--resume: 2 revisions already folded by the interrupted run"]
    assert files_equal(out, whole) and res.kernel == "stream"
    check_against_reference(out, sds, weights())


# -- resume on blocks ------------------------------------------------------------------------------

def test_blocks_resume_after_ctrl_c(small, tmp_path):
    root, sds = run_of(tmp_path)
    opts = Options(method=EMA, max_shard_size=30_000)
    plan, _ = average([str(root)], output=tmp_path / "whole", options=opts)
    out = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        average([str(root)], output=out, options=opts, progress=Interrupt(len(plan.blocks) // 2))
    finished = sorted(json.loads((partial_of(out) / "progress.json").read_text())["shards"])
    assert finished
    _, res = average([str(root)], output=out, options=Options(method=EMA, max_shard_size=30_000, resume=True))
    assert res.resumed_shards == finished and files_equal(out, tmp_path / "whole")
    check_against_reference(out, sds, weights())


# -- ranks -----------------------------------------------------------------------------------------

@pytest.mark.slow  # torchrun launches (~5 s each)
@pytest.mark.parametrize("nproc,shards", [(2, "30KB"), (3, None)])  # None: one file, cut into parts
def test_ranks(small, tmp_path, nproc, shards):
    root, sds = run_of(tmp_path)
    flags = ["--method", "ema", "--decay", "0.7", *(["--max-shard-size", shards] if shards else [])]
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "one"), *flags])
    assert r.exit_code == 0, r.output
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), MERGER_RANK_TIMEOUT="10", OMP_NUM_THREADS="1")
    assert env["MERGER_SIZES"] == SIZES.spec()
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", str(nproc), "-m", "merger", "average",
                        str(root), "-o", str(tmp_path / "ranks"), *flags, "--json"],
                       env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "ranks" / "merger.json").read_text())
    assert m["world_size"] == nproc and all(r["shards"] for r in m["ranks"])
    if shards is None:
        assert [f.name for f in (tmp_path / "ranks").glob("*.safetensors")] == ["model.safetensors"]
    assert files_equal(tmp_path / "one", tmp_path / "ranks")
    check_against_reference(tmp_path / "ranks", sds, weights())


# -- sweep and grow ----------------------------------------------------------------------------------

def test_sweep_sliding_sums(small, tmp_path):
    from merger.eval.sweep import sliding_states
    from merger.sources import resolve

    root, sds = run_of(tmp_path)
    states = list(sliding_states(resolve([str(root)], None, None), 2, decay=0.7))
    assert [st.uniform is None for st in states] == [True, False, False, False]
    for i in range(1, len(STEPS)):
        check_tensors(states[i].uniform, sds[i - 1: i + 1], [0.5, 0.5])


def test_grow_exact_zero_pad(small, tmp_path):
    folder = synth.save_checkpoint(tmp_path / "small", synth.pythia_state_dict(SHAPE, seed=1, dtype=torch.float32),
                                   config=SHAPE.config(torch.float32))
    from merger.testing.tokenizer import save_byte_tokenizer

    save_byte_tokenizer(folder)
    r = runner.invoke(app, ["grow", str(folder), "-o", str(tmp_path / "big"), "--width", "2", "--shrink", "1",
                            "--perturb", "0"])
    assert r.exit_code == 0, r.output
    big, smallsd = load_dir(tmp_path / "big"), load_file(folder / "model.safetensors")
    w = smallsd["gpt_neox.embed_in.weight"]
    assert w.numel() * 4 > 2 * max(SIZES.read_piece, SIZES.stage)
    b = big["gpt_neox.embed_in.weight"]
    assert b.shape == (SHAPE.vocab, 2 * SHAPE.hidden)
    assert torch.equal(b[:, : SHAPE.hidden].view(torch.int32), w.view(torch.int32))
    assert (b[:, SHAPE.hidden:] == 0).all()


# -- the real default sizes, with a tensor bigger than every default (slow) -----------------------------

BIG = (70_000, 1024)  # 71.7M float32 elements, 287 MB: more than a multi-rank output's part (256 MiB)
MID = (23_000, 1024)  # 23.6M float32 elements, 94 MB: more than every size of the single-process paths


def defaults_crossed(numel: int, itemsize: int, *, parts: bool = False) -> None:
    """``numel`` elements cross every real default size (``parts``: the output part's too)."""
    s = SIZES
    assert s.chunk == 1 << 18  # the real defaults
    assert numel > s.piece and numel > s.unit
    nbytes = numel * itemsize
    assert nbytes > max(s.read_piece, s.stage, s.copy_piece, s.record_head + s.record_tail, s.min_block)
    assert nbytes * (2 * 2 + 2) > s.max_block_cpu  # two inputs and the output, double-buffered: cut into ranges
    assert not parts or nbytes > s.part_bytes


def write_big(root: Path, shape, *, pt: bool) -> list[dict[str, torch.Tensor]]:
    """Two revisions of {a big matrix, a small bias, an identical int buffer}: HF folders (and .pt)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sds = []
    for step in (100, 200):
        sd = {"a.weight": torch.randn(shape, generator=g), "b.bias": torch.randn(3000, generator=g),
              "c.mask": torch.arange(5000, dtype=torch.int64)}  # the big one first in the file: two parts
        sds.append(sd)
        (root / "hf" / f"step{step}").mkdir(parents=True)
        save_file(sd, str(root / "hf" / f"step{step}" / "model.safetensors"), metadata={"format": "pt"})
        if pt:
            (root / "pt").mkdir(exist_ok=True)
            torch.save({"model": sd, "iter_num": step}, root / "pt" / f"ckpt_{step}.pt")
    return sds


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mid")
    sds = write_big(root, MID, pt=True)
    defaults_crossed(sds[0]["a.weight"].numel(), 4)
    return root, sds


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    sds = write_big(root, BIG, pt=False)
    defaults_crossed(sds[0]["a.weight"].numel(), 4, parts=True)
    return root, sds


@pytest.mark.slow
@pytest.mark.parametrize("kernel,to", [("native", None), ("torch", None), ("native", "dcp")])
def test_big_tensor_blocks(mid_run, tmp_path, monkeypatch, kernel, to):
    root, sds = mid_run
    monkeypatch.setenv("MERGER_KERNEL", kernel)
    plan, res = average([str(root / "hf")], output=tmp_path / "out", options=Options(to=to))
    assert res.kernel == kernel and any(sl.start > 0 for b in plan.blocks for sl in b)  # cut into ranges
    if to == "dcp":
        check_tensors(torch_dcp_read(tmp_path / "out"), sds, [0.5, 0.5])
    else:
        check_against_reference(tmp_path / "out", sds, [0.5, 0.5])


@pytest.mark.slow
def test_big_tensor_pt_own_format(mid_run, tmp_path):
    root, sds = mid_run
    r = runner.invoke(app, ["average", str(root / "pt"), "-o", str(tmp_path / "avg")])
    assert r.exit_code == 0, r.output
    check_tensors(torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)["model"], sds, [0.5, 0.5])


@pytest.mark.slow
def test_big_tensor_two_ranks_single_file_in_parts(big_run, tmp_path):
    root, sds = big_run
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "MERGER_SIZES")}
    env.update(PYTHONPATH=str(REPO), MERGER_RANK_TIMEOUT="30", OMP_NUM_THREADS="1")
    torchrun = Path(sys.executable).with_name("torchrun")
    p = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "merger", "average",
                        str(root / "hf"), "-o", str(tmp_path / "ranks")],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "ranks" / "merger.json").read_text())
    assert m["world_size"] == 2 and all(r["shards"] for r in m["ranks"])  # both ranks had a part to fold
    check_against_reference(tmp_path / "ranks", sds, [0.5, 0.5])


@pytest.mark.slow
def test_big_tensor_sweep_and_grow(tmp_path):
    """sweep and grow loop over preads and O_DIRECT stages: an embedding of 25.7 MB (grown: 51 MB)."""
    from merger.eval.sweep import sliding_states
    from merger.sources import resolve
    from merger.testing.tokenizer import save_byte_tokenizer

    shape = synth.Shape(hidden=128, layers=1, heads=4, vocab=50304, max_pos=64)
    root, sds = make_run(tmp_path / "run", shape=shape, steps=(1, 2, 3), dtype=torch.float32)
    assert sds[0]["embed_out.weight"].numel() * 4 > max(SIZES.read_piece, SIZES.stage)
    states = list(sliding_states(resolve([str(root)], None, None), 2))
    check_tensors(states[2].uniform, sds[1:], [0.5, 0.5])
    save_byte_tokenizer(root / "step3")
    r = runner.invoke(app, ["grow", str(root / "step3"), "-o", str(tmp_path / "big"), "--width", "2",
                            "--shrink", "1", "--perturb", "0"])
    assert r.exit_code == 0, r.output
    b, w = load_dir(tmp_path / "big")["embed_out.weight"], sds[2]["embed_out.weight"]
    assert b.numel() * 4 > 2 * SIZES.stage
    assert torch.equal(b[:, :128].view(torch.int32), w.view(torch.int32)) and (b[:, 128:] == 0).all()


@pytest.mark.slow
def test_big_tensor_blocks_resume(mid_run, tmp_path):
    """--resume on the blocks schedule at the real defaults: the 94 MB tensor is its own shard
    (--max-shard-size 50MB), cut into ranges; Ctrl-C in its last block, then resume."""
    root, sds = mid_run
    opts = Options(max_shard_size=50 * 10**6)
    plan, _ = average([str(root / "hf")], output=tmp_path / "whole", options=opts)
    assert len(plan.shards) == 3 and len(plan.blocks) > 2  # c.mask, a.weight, b.bias: file order
    out = tmp_path / "out" / "merged"
    with pytest.raises(KeyboardInterrupt):
        average([str(root / "hf")], output=out, options=opts, progress=Interrupt(len(plan.blocks) - 1))
    finished = sorted(json.loads((partial_of(out) / "progress.json").read_text())["shards"])
    assert finished
    _, res = average([str(root / "hf")], output=out, options=Options(max_shard_size=50 * 10**6, resume=True))
    assert res.resumed_shards == finished and files_equal(out, tmp_path / "whole")
    check_against_reference(out, sds, [0.5, 0.5])
