"""Write a merge as a torch.distributed.checkpoint (DCP) folder, so that training restarts from it.

An output format written in place (``output/convert.py``): the engine writes ``__0_<i>.distcp``
files laid out as torch's own ``FileSystemWriter`` lays them out, every tensor one whole chunk (or,
for a tensor the inputs cut along an inner dim into the same chunks, those chunks: ``plan/build.py``
``shared_chunks``), a ``torch.save`` record at its offset in the file. The plan leaves room for each record's zip
headers (:func:`span`), the shard writer puts them around the tensor's bytes as they are folded
(:func:`frames`; the record's CRC-32 is taken on the way), and :func:`write` adds ``.metadata``
(a pickle of torch's ``Metadata`` classes) after the last shard. Keys are the input's
(``model.…``), and ``planner_data`` is copied from the latest input so that ``dcp.load`` rebuilds
the same nesting; ``dcp.load`` reads the folder into any sharding (FSDP2 over N ranks, or one
process).

Why our own writer and not ``dcp.save``: ``dcp.save`` takes one state dict with every tensor in
memory. Here memory is the fold's buffers whatever the model's size, the data is written once
(no second pass), and the CPU path still imports no torch (``dcp_records.py`` writes the records'
zip and pickles by hand; the tests load them with ``torch.load`` and ``dcp.load``).
"""

from __future__ import annotations

import os
from pathlib import Path

from merger.errors import OutputError
from merger.output.dcp_records import STORAGES, metadata_pickle, record_head, record_tail, tail_length
from merger.output.shards import Frames


def _check(name: str, dtype: str) -> None:
    if dtype not in STORAGES:
        raise OutputError(f"tensor {name!r} is {dtype}, which merger can't write as DCP",
                          hint="write the output with --to safetensors")


def span(dtype: str, shape: tuple[int, ...], nbytes: int, *, name: str = "") -> tuple[int, int]:
    """Bytes of a tensor's record before and after its data.

    Raises:
        OutputError: a dtype torch's zip records can't name.
    """
    _check(name, dtype)
    head = len(record_head(dtype, shape, nbytes))
    return head, tail_length(dtype, shape, nbytes, head=head)


def filename(i: int, k: int) -> str:
    """Shard ``i`` of ``k``: rank 0's ``i``-th file, as torch names a writer's files."""
    return f"__0_{i}.distcp"


def frames(plan, k: int) -> Frames:
    """The records' heads and tails around the tensors of shard ``k`` (``plan``: a
    :class:`merger.plan.Plan`)."""
    ts = [plan.tensors[i] for i in plan.shards[k].tensors]
    heads = tuple(record_head(t.out_dtype, t.shape, t.numel * t.out_itemsize) for t in ts)

    def tail(i: int, crc: int) -> bytes:
        t = ts[i]
        return record_tail(t.out_dtype, t.shape, t.numel * t.out_itemsize, crc, head=len(heads[i]))

    return Frames(tuple(t.out_offset for t in ts), tuple(t.numel * t.out_itemsize for t in ts), heads, tail)


def write(tmp: Path, plan) -> list[str]:
    """Add ``.metadata`` to the ``.distcp`` files the engine wrote in ``tmp``, and the latest
    input's carried objects (``formats.dcp.carried_objects``: Megatron's ``_extra_state`` and
    common state, copied byte for byte into one more ``.distcp`` file).

    Returns:
        The output's files: ``.metadata`` and the ``.distcp`` files.
    """
    from merger.formats.dcp import carried_objects
    from merger.formats.dcp_metadata import read_metadata
    from merger.formats.inputs import contained, open_input

    latest = plan.sources[-1].path
    md = read_metadata(latest) if latest and (Path(latest) / ".metadata").is_file() else None
    records: dict[str, tuple[str, tuple[int, ...], list[tuple]]] = {}  # fqn -> (dtype, shape, chunks)
    for t in plan.tensors:
        nbytes = t.numel * t.out_itemsize
        head, tail = span(t.out_dtype, t.shape, nbytes, name=t.name)
        fqn, offsets, shape = t.chunk or (t.name, (0,) * len(t.shape), t.shape)  # a chunk keeps its place
        records.setdefault(fqn, (t.out_dtype, shape, []))[2].append(
            (offsets, t.shape, plan.shards[t.shard].filename, t.out_offset - head, head + nbytes + tail))
    files = [sp.filename for sp in plan.shards]
    objects = []
    carried = carried_objects(md, plan.options.key, latest) if md else []
    if carried:
        name = filename(len(plan.shards), len(plan.shards) + 1)
        fds: dict[str, tuple[int, Path]] = {}  # each input file opened once
        try:
            with open(tmp / name, "wb") as f:
                for e in carried:
                    c = e.chunks[0]
                    if c.file not in fds:
                        src = contained(latest, c.file, what="storage file")
                        fds[c.file] = (open_input(src, what="storage file"), src)
                    fd, src = fds[c.file]
                    data = os.pread(fd, c.length, c.offset)
                    if len(data) != c.length:
                        raise OutputError(f"{src}: the object {e.fqn!r} runs past the end of the file",
                                          hint="copy the checkpoint again, or re-save it")
                    objects.append((e.fqn, name, f.tell(), c.length, c.transforms))
                    f.write(data)
        finally:
            for fd, _ in fds.values():
                os.close(fd)
        files.append(name)
    tensors = [(fqn, dtype, shape, chunks) for fqn, (dtype, shape, chunks) in records.items()]
    (tmp / ".metadata").write_bytes(metadata_pickle(tensors, md.planner_data if md else {}, objects))
    return [".metadata", *files]
