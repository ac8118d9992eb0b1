"""A single-file output folded by several ranks: its tensors cut into parts, joined at the end.

With one output shard (``model.safetensors``, ``__0_0.distcp``) there is nothing to deal out
between ranks, so for a multi-rank run (``ranked.py``) the shard's tensors, in data order, are cut
into contiguous *parts* of about ``SIZES.part_bytes`` each. Each part is planned as a shard of its own
(a hidden ``.part-0000i-of-0000k.safetensors`` in the partial folder, a valid safetensors file of
its tensors; for DCP a ``.distcp`` part, a run of whole records), so ranks fold, record and resume
parts exactly like shards. The number of parts depends only on the output's size, never on the
world size: a resume with another number of ranks finds the same parts. At the end rank 0 writes
the file: the single-shard header (none for DCP), then each part's data section in order
(``copy_file_range``: the kernel copies, no user-space buffers). The tensors' bytes are the same
bytes in the same order, so the file is the single-process one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from merger.output.convert import in_place
from merger.output.shards import pwrite_all, shard_header
from merger.plan import Plan
from merger.plan.plan import ShardPlan
from merger.units import SIZES

PART = ".part-{:05d}-of-{:05d}"  # + the shard's extension


def split_single(plan: Plan, *, part_bytes: int | None = None) -> Plan:
    """``plan`` with its one output shard cut into parts (each a shard); other plans unchanged.

    A format that frames each tensor (a DCP record, output/convert.py) is cut between records: a
    part is a byte range of the final file, its records unchanged (they don't depend on where
    they lie)."""
    if len(plan.shards) != 1:
        return plan
    sp = plan.shards[0]
    framed = in_place(plan.output_format)
    size, frame = {}, {}
    for i in sp.tensors:
        t = plan.tensors[i]
        size[i] = t.numel * t.out_itemsize
        frame[i] = framed.span(t.out_dtype, t.shape, size[i], name=t.name) if framed else (0, 0)
    part_bytes = part_bytes or SIZES.part_bytes  # output bytes per part
    k = max(1, min(len(sp.tensors), -(-sp.data_bytes // part_bytes)))
    groups: list[list[int]] = [[]]
    acc = 0
    for i in sp.tensors:
        if groups[-1] and acc >= sp.data_bytes * len(groups) / k and len(groups) < k:
            groups.append([])
        groups[-1].append(i)
        acc += size[i]
    tensors = list(plan.tensors)
    shards = []
    ext = Path(sp.filename).suffix
    for g, idx in enumerate(groups):
        off = framing = 0
        for i in idx:
            head, tail = frame[i]
            tensors[i] = replace(tensors[i], shard=g, out_offset=off + framing + head)
            off += size[i]
            framing += head + tail
        shards.append(ShardPlan(PART.format(g + 1, len(groups)) + ext, tuple(idx), off, framing))
    return replace(plan, tensors=tuple(tensors), shards=tuple(shards))


def join_parts(plan: Plan, split: Plan, folder: Path) -> None:
    """Write ``plan``'s single shard into ``folder`` from the parts of ``split`` there, then
    remove the parts."""
    dest = folder / plan.shards[0].filename
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        header = shard_header(plan, 0)
        pwrite_all(fd, header, len(header), 0)
        pos = len(header)
        for k, sp in enumerate(split.shards):
            skip = len(shard_header(split, k))
            with open(folder / sp.filename, "rb") as src:
                left, off = sp.data_bytes + sp.framing, skip
                while left:
                    try:
                        n = os.copy_file_range(src.fileno(), fd, left, off, pos)
                    except OSError:  # a filesystem without it: copy through a buffer
                        src.seek(off)
                        n = os.pwrite(fd, src.read(min(left, SIZES.copy_piece)), pos)
                    if n == 0:
                        raise OSError(f"{sp.filename} is shorter than planned")
                    left, off, pos = left - n, off + n, pos + n
    finally:
        os.close(fd)
    for sp in split.shards:
        (folder / sp.filename).unlink()
