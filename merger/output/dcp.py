"""Write a merge as a torch.distributed.checkpoint (DCP) folder, so that training restarts from it.

The engine's safetensors shards in the partial folder become ``__0_<i>.distcp`` files (one per
shard) and a ``.metadata``, laid out as torch's own ``FileSystemWriter`` lays them out: every tensor
is one whole chunk, a ``torch.save`` record at its offset in the ``.distcp`` stream, and
``.metadata`` a pickle of torch's ``Metadata`` classes. Keys are the input's (``model.…``), and
``planner_data`` is copied from the latest input so that ``dcp.load`` rebuilds the same nesting.
``dcp.load`` reads the folder into any sharding (FSDP2 over N ranks, or one process).

Why our own writer and not ``dcp.save``: ``dcp.save`` takes one state dict with every tensor in
memory. Here each tensor's bytes are streamed from its shard into its record in 4 MB pieces
(``dcp_records.py`` writes the records' zip and pickles by hand, byte-compatible with torch's), so
memory is one piece whatever the model's size, and the CPU path still imports no torch.
"""

from __future__ import annotations

import os
from pathlib import Path

from merger.errors import OutputError
from merger.formats.reading import READ_PIECE, read_extents
from merger.output.dcp_records import STORAGES, metadata_pickle, write_record


def write(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` (``plan``: a :class:`merger.plan.Plan`) as a DCP folder.

    Returns:
        The files written: ``.metadata`` and the ``.distcp`` files.

    Raises:
        OutputError: a dtype torch's zip records can't name.
    """
    from merger.formats import get
    from merger.formats.dcp_metadata import read_metadata

    hf = get("hf")
    kind, shard_files = hf.weights_files(tmp)
    layout = hf.read(tmp)
    for t in layout.values():
        if t.dtype not in STORAGES:
            raise OutputError(f"tensor {t.name!r} is {t.dtype}, which merger can't write as DCP",
                              hint="write the output with --to safetensors")
    latest = plan.sources[-1].path
    planner = read_metadata(latest).planner_data if latest and (Path(latest) / ".metadata").is_file() else {}
    records, written = [], []
    fds = {str(tmp / f): os.open(tmp / f, os.O_RDONLY) for f in shard_files}
    buf = memoryview(bytearray(READ_PIECE))
    try:
        for i, sp in enumerate(plan.shards):
            fname = f"__0_{i}.distcp"
            with open(tmp / fname, "wb") as f:
                for j in sp.tensors:
                    info = layout[plan.tensors[j].name]

                    def fill(write, info=info):
                        for at in range(0, info.nbytes, READ_PIECE):
                            piece = buf[: min(READ_PIECE, info.nbytes - at)]
                            read_extents(fds, info.extents, at, piece)
                            write(piece)

                    offset = f.tell()
                    write_record(f, info.dtype, info.shape, info.nbytes, fill)
                    records.append((info.name, info.dtype, info.shape, fname, offset, f.tell() - offset))
            written.append(fname)
    finally:
        for fd in fds.values():
            os.close(fd)
    (tmp / ".metadata").write_bytes(metadata_pickle(records, planner))
    for name in shard_files + ([kind] if kind.endswith(".index.json") else []):
        (tmp / name).unlink()
    return [".metadata", *written]
