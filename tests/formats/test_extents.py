"""A tensor is a list of byte extents: reading any byte range through them gives the tensor's
bytes, the torch pipeline's reads cover a block exactly, and a tiling with a gap or an overlap is
refused with the tensor and the file named."""

from __future__ import annotations

import os

import pytest

from merger.engine.torch_pipeline import _block_layout, _runs
from merger.errors import CheckpointFormatError
from merger.formats import Extent, TensorInfo, check_extents, clip
from merger.formats.reading import read_extents
from merger.plan import Slice, TensorPlan


def split(tmp_path, data: bytes, cuts: list[int], name: str) -> tuple[Extent, ...]:
    """``data`` cut at byte offsets ``cuts``, each piece in its own file after a header of odd size."""
    bounds = [0, *cuts, len(data)]
    out = []
    for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
        p = tmp_path / f"{name}-{j}.bin"
        p.write_bytes(b"x" * (7 + j) + data[a:b])
        out.append(Extent(str(p), 7 + j, a, b - a))
    return tuple(out)


@pytest.mark.fuzz
def test_read_extents_gives_every_byte_range(tmp_path, rng):
    data = bytes(rng.randrange(256) for _ in range(10_000))
    exts = split(tmp_path, data, [1, 999, 1000, 6001], "t")
    check_extents(TensorInfo("t", "uint8", (len(data),), exts), "here")
    fds = {e.path: os.open(e.path, os.O_RDONLY) for e in exts}
    try:
        for _ in range(200):
            a = rng.randrange(len(data))
            b = rng.randrange(a, len(data) + 1)
            buf = bytearray(b - a)
            seen = []
            read_extents(fds, exts, a, memoryview(buf), feed=lambda p, off, d, s=seen: s.append((p, off, len(d))))
            assert bytes(buf) == data[a:b]
            assert sum(n for _, _, n in seen) == b - a
            assert [(e.path, e.offset, e.nbytes) for e in clip(exts, a, b)] == seen
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.fuzz
def test_torch_pipeline_reads_cover_a_block(tmp_path, rng):
    """Two tensors, each chunked differently in two inputs: the reads of every input land exactly
    on the block buffer's slice offsets, in order, and coalesce where file and buffer are contiguous."""
    a, b = bytes(rng.randrange(256) for _ in range(4000)), bytes(rng.randrange(256) for _ in range(2000))
    locs_a = (split(tmp_path, a, [1000], "a0"), split(tmp_path, a, [10, 3990], "a1"))
    locs_b = (split(tmp_path, b, [], "b0"), split(tmp_path, b, [1024], "b1"))
    ta = TensorPlan("a", "float16", "float16", (2000,), True, locs_a, 0, 0)
    tb = TensorPlan("b", "float32", "float32", (500,), True, locs_b, 0, 4000)

    class P:  # what _block_layout and _runs read of a plan
        tensors = (ta, tb)

    block = (Slice(0, 100, 2000), Slice(1, 0, 500))
    layout = _block_layout(P, block)
    for i in range(2):
        buf = bytearray(layout[-1][1] + 2000)
        fds = {}
        for path, off, boff, n in _runs(P, layout, i):
            fds.setdefault(path, os.open(path, os.O_RDONLY))
            buf[boff: boff + n] = os.pread(fds[path], n, off)
        for fd in fds.values():
            os.close(fd)
        assert bytes(buf[:3800]) == a[200:]
        assert bytes(buf[layout[1][1]: layout[1][1] + 2000]) == b


@pytest.mark.parametrize("exts,what", [
    ((Extent("f", 0, 0, 10), Extent("f", 10, 12, 8)), "missing"),
    ((Extent("f", 0, 0, 10), Extent("g", 0, 8, 12)), "overlapping"),
    ((Extent("f", 0, 0, 10),), "hold 10 bytes, its shape needs 20"),
])
def test_bad_tilings_are_refused(exts, what):
    with pytest.raises(CheckpointFormatError, match=f"ckpt/.metadata: tensor 'w'.*{what}"):
        check_extents(TensorInfo("w", "float16", (10,), exts), "ckpt/.metadata")
