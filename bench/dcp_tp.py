"""Benchmark: a tensor-parallel DCP run (Megatron's row-parallel weights: [layers, hidden, hidden]
cut along the last dim by TP ranks, one chunk per layer and rank), merged chunk by chunk into a DCP
folder (the default: one extent per chunk) against the whole-tensor path that ``--to safetensors``
must take (a run of bytes per row of every chunk). Not a test.

The chunks' storage bytes are holes (a sparse file: the right sizes and layout, zeros), so this
measures planning and the I/O path, not the disk. Each merge runs in its own process (wall, peak
RSS from ``/usr/bin/time``); both outputs are removed.

    python bench/dcp_tp.py --layers 32 --hidden 4096 --tp 8 --revisions 2    # 8.6 GB read
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("decoder.layers.self_attention.linear_proj.weight", "decoder.layers.mlp.linear_fc2.weight")


def make_run(root: Path, layers: int, hidden: int, tp: int, revisions: int) -> None:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    sys.path.insert(0, str(HERE))
    from dcp import _Sparse

    for step in range(1, revisions + 1):
        folder = root / f"step-{step}"
        folder.mkdir(parents=True)
        files = [open(folder / f"__{r}_0.distcp", "wb") for r in range(tp)]
        entries, storage, planner = {}, {}, {}
        for name in NAMES:
            chunks = []
            for layer in range(layers):
                for r in range(tp):
                    offs, size = torch.Size([layer, 0, r * hidden // tp]), torch.Size([1, hidden, hidden // tp])
                    f = files[r]
                    at = f.tell()
                    torch.save(torch.zeros(size), _Sparse(f))
                    storage[MetadataIndex(name, offs, len(chunks))] = _StorageInfo(f"__{r}_0.distcp", at, f.tell() - at)
                    chunks.append(ChunkStorageMetadata(offs, size))
            entries[name] = TensorStorageMetadata(TensorProperties(dtype=torch.float32),
                                                  torch.Size([layers, hidden, hidden]), chunks)
            planner[name] = (name,)
        for f in files:
            f.truncate(f.tell())
            f.close()
        md = Metadata(entries, planner_data=planner, storage_data=storage, storage_meta=StorageMeta(), version="1.0.0")
        (folder / ".metadata").write_bytes(pickle.dumps(md))


def timed(cmd: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    wall, rss = r.stderr.strip().splitlines()[-1].split()
    return {"rc": r.returncode, "wall_s": float(wall), "peak_rss_gb": round(int(rss) / 2**20, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--revisions", type=int, default=2)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="merger-bench-tp-"))
    try:
        make_run(tmp / "run", a.layers, a.hidden, a.tp, a.revisions)
        merger = [sys.executable, "-m", "merger", "average", str(tmp / "run"), "--json"]
        rows = {}
        for label, to in (("chunk by chunk (--to dcp)", "dcp"), ("whole tensors (--to safetensors)", "safetensors")):
            out = tmp / f"out-{to}"
            plan = json.loads(subprocess.run([*merger, "--to", to, "--dry-run"], capture_output=True, text=True,
                                             check=True).stdout)
            rows[label] = {"tensors_planned": plan["tensors"], "read_gb": round(plan["read_bytes"] / 1e9, 2),
                           **timed([*merger, "--to", to, "-o", str(out)])}
            shutil.rmtree(out, ignore_errors=True)
            print(label, rows[label], file=sys.stderr)
        a_, b_ = rows.values()
        print(json.dumps({"layers": a.layers, "hidden": a.hidden, "tp": a.tp, "revisions": a.revisions, "runs": rows,
                          "whole_over_chunked": round(b_["wall_s"] / a_["wall_s"], 1)}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
