"""The shard writer (merger/output/shards.py) against the libraries that read its files: bytes
as safetensors reads them, checksums as zlib computes them, in order or not, staged through
O_DIRECT or not."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from safetensors import safe_open

from merger.output.crc import crc32_combine, file_checksum
from merger.output.shards import ShardWriter, safetensors_header
from merger.units import SIZES


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 7), (5, 0), (1, 1), (4096, 3), (12345, 1 << 20)])
def test_crc32_combine_is_zlibs_crc_of_the_concatenation(len_a, len_b):
    rng = random.Random(len_a * 31 + len_b)
    a, b = rng.randbytes(len_a), rng.randbytes(len_b)
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _tensors():
    g = torch.Generator().manual_seed(0)
    # sizes that are no multiple of the O_DIRECT alignment, one bigger than a stage
    return {"a": torch.randn(3, 5, generator=g).half(), "b": torch.randn(SIZES.stage // 4 + 17, generator=g),
            "c": torch.arange(7, dtype=torch.int64)}


def _entries(ts):
    dtypes = {torch.float16: "float16", torch.float32: "float32", torch.int64: "int64"}
    return [(k, dtypes[t.dtype], tuple(t.shape), t.numel() * t.element_size()) for k, t in ts.items()]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("order", ["in order", "reversed"])
def test_a_shard_reads_back_as_written_and_its_checksum_is_zlibs(tmp_path, direct, order):
    ts = _tensors()
    entries = _entries(ts)
    header = safetensors_header(entries)
    offsets, off = {}, 0
    for name, _, _, nbytes in entries:
        offsets[name], off = off, off + nbytes
    path = tmp_path / "model.safetensors"
    w = ShardWriter(path, header, off, hash=True, direct=direct)
    names = list(ts) if order == "in order" else list(reversed(ts))
    for name in names:
        w.write(ts[name].contiguous().view(torch.uint8).numpy(), offsets[name])
    crc = w.finish()
    data = path.read_bytes()
    assert len(data) == len(header) + off
    assert crc == f"crc32:{zlib.crc32(data):08x}" == file_checksum(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"} and list(f.keys()) == sorted(ts)
        for name, t in ts.items():
            assert torch.equal(f.get_tensor(name), t), name
