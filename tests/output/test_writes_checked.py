"""Every output byte is written, or the run fails (issue: a disk that filled while ``ckpt.pt`` was
written gave exit 0 and a published ``ckpt.pt`` with holes).

The faults are injected into the real ``os.pwrite`` for the one file they aim at (``ckpt.pt`` of a
nanoGPT merge, or a safetensors shard), found through ``/proc/self/fd``: short writes (what a
filling disk does first) must be retried and give the exact average; a write that makes no
progress must fail the run; and a write the filesystem claims but loses must be caught by the
read-back check before publishing. A failed run leaves no output and no partial folder.
"""

from __future__ import annotations

import os

import pytest
import torch
from typer.testing import CliRunner

from helpers import assert_close_ulp, make_run, reference
from helpers.checks import leftovers
from merger.cli import app
from merger.testing.nanogpt import nanogpt_run

runner = CliRunner()
ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, bias=True, dropout=0.0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return nanogpt_run(tmp_path_factory.mktemp("nano") / "out", ARGS, steps=(100, 200, 300))


def faulty(monkeypatch, suffix: str, mode: str):
    """Patch os.pwrite for files ending in ``suffix``: ``short`` writes half (and says so), ``stuck``
    writes nothing, ``lost`` says it wrote everything but drops the second half of one write."""
    real, seen = os.pwrite, {"lost": 0}

    def pwrite(fd, data, offset):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}").endswith(suffix)
        except OSError:
            target = False
        if not target or len(data) < 2:
            return real(fd, data, offset)
        if mode == "short":
            return real(fd, memoryview(data)[: len(data) // 2], offset)
        if mode == "stuck":
            return 0
        if seen["lost"] == 0:
            seen["lost"] = 1
            real(fd, memoryview(data)[: len(data) // 2], offset)
            return len(data)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)


def average_of(run, out):
    return runner.invoke(app, ["average", str(run), "-o", str(out)])


def test_short_writes_are_retried(run, tmp_path, monkeypatch):
    faulty(monkeypatch, "ckpt.pt", "short")
    r = average_of(run, tmp_path / "avg")
    monkeypatch.undo()
    assert r.exit_code == 0, r.output
    ins = [torch.load(run / f"ckpt_{s}.pt", weights_only=True)["model"] for s in (100, 200, 300)]
    ref = reference(ins, [1 / 3] * 3)
    for k, v in torch.load(tmp_path / "avg" / "ckpt.pt", weights_only=True)["model"].items():
        assert_close_ulp(v, ref[k], name=k)


@pytest.mark.parametrize("mode,message", [("stuck", "no space left"), ("lost", "reads back other bytes")])
def test_a_lost_write_fails_the_run(run, tmp_path, monkeypatch, mode, message):
    faulty(monkeypatch, "ckpt.pt", mode)
    r = average_of(run, tmp_path / "avg")
    monkeypatch.undo()
    assert r.exit_code == 1 and message in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "avg").exists() and leftovers(tmp_path / "avg") == []


def test_a_stuck_shard_write_fails_the_run(tmp_path, monkeypatch):
    root, _ = make_run(tmp_path / "run")
    faulty(monkeypatch, ".safetensors", "stuck")
    r = runner.invoke(app, ["average", str(root), "-o", str(tmp_path / "out")])
    monkeypatch.undo()
    assert r.exit_code == 1 and "no space left" in r.stderr.lower() and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path / "out") == []


@pytest.mark.parametrize("direct", [True, False])
def test_a_shard_whose_end_was_never_written_is_refused(tmp_path, direct):
    """The shard writer used to extend a short file to its size at close (zeros where the last
    tensor should be); now that is an error: the end was never written."""
    from merger.errors import OutputError
    from merger.output.shards import ShardWriter, safetensors_header

    a, b = torch.randn(3000), torch.randn(5000)
    header = safetensors_header([("a", "float32", (3000,), 12000), ("b", "float32", (5000,), 20000)])
    w = ShardWriter(tmp_path / "model.safetensors", header, 32000, hash=True, direct=direct)
    w.write(a.view(torch.uint8).numpy(), 0)  # b never comes
    with pytest.raises(OutputError, match="holds .* of its .* bytes"):
        w.finish()
    w.abandon()
    w = ShardWriter(tmp_path / "ok.safetensors", header, 32000, hash=True, direct=direct)
    w.write(a.view(torch.uint8).numpy(), 0)
    w.write(b.view(torch.uint8).numpy(), 12000)
    assert w.finish().startswith("crc32:")
