"""Write a merge as a torch.distributed.checkpoint (DCP) folder, so that training restarts from it.

The engine's safetensors shards in the partial folder become ``__0_<i>.distcp`` files (one per
shard) and a ``.metadata``, laid out as torch's own ``FileSystemWriter`` lays them out: every tensor
is one whole chunk, written by ``torch.save`` into the ``.distcp`` stream at its offset, and
``.metadata`` is a pickle of torch's own ``Metadata`` classes. Keys are the input's (``model.…``),
and ``planner_data`` is copied from the latest input so that ``dcp.load`` rebuilds the same nesting.
``dcp.load`` reads the folder into any sharding (FSDP2 over N ranks, or one process).

Why our own writer and not ``dcp.save``: ``dcp.save`` takes one state dict with every tensor in
memory; here one tensor at a time is read from its shard into a buffer, ``torch.save``\\ d and freed,
so memory is the largest tensor (the engine's own working set is gone by then), whatever the model
size. The records are torch's own (``torch.save``), so the bytes are the ones ``dcp.save`` writes.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from merger.formats.base import TensorInfo
from merger.formats.reading import pread_into


def _tensor(info: TensorInfo, fds: dict[str, int]):
    """The tensor ``info`` read from the engine's shard into a fresh buffer."""
    import torch

    t = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
    if info.nbytes:
        view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        for e in info.extents:
            pread_into(fds[e.path], view[e.start: e.start + e.nbytes], e.offset, path=e.path)
    return t


def write(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` (``plan``: a :class:`merger.plan.Plan`) as a DCP folder.

    Returns:
        The files written: ``.metadata`` and the ``.distcp`` files.
    """
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                       StorageMeta, TensorProperties, TensorStorageMetadata)

    from merger.formats import get
    from merger.formats.dcp_metadata import read_metadata

    hf = get("hf")
    kind, shard_files = hf.weights_files(tmp)
    layout = hf.read(tmp)
    latest = plan.sources[-1].path
    planner = read_metadata(latest).planner_data if latest and (Path(latest) / ".metadata").is_file() else {}
    entries, storage, planner_data, written = {}, {}, {}, []
    fds = {str(tmp / f): os.open(tmp / f, os.O_RDONLY) for f in shard_files}
    try:
        for i, sp in enumerate(plan.shards):
            fname = f"__0_{i}.distcp"
            with open(tmp / fname, "wb") as f:
                for j in sp.tensors:
                    name = plan.tensors[j].name
                    t = _tensor(layout[name], fds)
                    zeros = torch.Size([0] * t.dim())
                    offset = f.tell()
                    torch.save(t, f)
                    storage[MetadataIndex(name, zeros, 0)] = _StorageInfo(fname, offset, f.tell() - offset)
                    entries[name] = TensorStorageMetadata(
                        TensorProperties(dtype=t.dtype), t.size(), [ChunkStorageMetadata(zeros, t.size())])
                    planner_data[name] = planner.get(name, (name,))
                    del t
            written.append(fname)
    finally:
        for fd in fds.values():
            os.close(fd)
    from torch.distributed.checkpoint import filesystem

    md = Metadata(state_dict_metadata=entries, planner_data=planner_data, storage_data=storage,
                  storage_meta=StorageMeta(), version=getattr(filesystem, "CURRENT_DCP_VERSION", None))
    with open(tmp / ".metadata", "wb") as f:
        pickle.dump(md, f)
    for name in shard_files + ([kind] if kind.endswith(".index.json") else []):
        (tmp / name).unlink()
    return [".metadata", *written]
