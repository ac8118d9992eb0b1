"""Synthetic Pythia-shaped trajectories for the benchmarks, written once and reused.

A trajectory is ``ROOT/stepN/`` checkpoint folders (config.json + model.safetensors or
pytorch_model.bin, Pythia's real tensor names and buffers) made by ``merger.synth``. A finished
trajectory carries a ``.complete`` marker holding its parameters; a folder with a matching
marker is reused as is, anything else under ROOT is rewritten.

    python bench/make_trajectory.py --shape 410m --revisions 9            # -> bench/out/data/410m-safetensors-fp16-n9
    python bench/make_trajectory.py --shape 70m --revisions 20 --format bin

Sizes (fp16): 70m ~ 0.16 GB, 410m ~ 0.91 GB, 1b ~ 2.1 GB per revision.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from merger.synth import write_trajectory

BENCH = Path(__file__).resolve().parent
DATA = BENCH / "out" / "data"
MARKER = ".complete"


def default_root(shape: str, n: int, fmt: str, dtype: str) -> Path:
    """Where ``trajectory`` puts a trajectory when no root is given."""
    short = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
    return DATA / f"{shape}-{fmt}-{short}-n{n}"


def steps_for(n: int, *, start: int = 1000, every: int = 1000) -> list[int]:
    """``n`` evenly spaced steps: start, start+every, ..."""
    return [start + i * every for i in range(n)]


def trajectory(shape: str = "70m", n: int = 9, *, fmt: str = "safetensors",
               dtype: str = "float16", root: str | Path | None = None,
               max_shard_size: int | None = None, log=print) -> tuple[Path, list[str]]:
    """Make (or reuse) a trajectory of ``n`` revisions; returns (root, revision names oldest first)."""
    root = Path(root) if root is not None else default_root(shape, n, fmt, dtype)
    steps = steps_for(n)
    params = {"shape": shape, "steps": steps, "format": fmt, "dtype": dtype,
              "max_shard_size": max_shard_size}
    names = [f"step{s}" for s in steps]
    marker = root / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                log(f"reusing trajectory {root}")
                return root, names
        except json.JSONDecodeError:
            pass
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log(f"writing trajectory {root} ({shape}, {n} x {fmt} {dtype}) ...")
    write_trajectory(root, shape=shape, steps=steps, fmt=fmt, dtype=getattr(torch, dtype),
                     max_shard_size=max_shard_size)
    marker.write_text(json.dumps(params) + "\n")
    return root, names


def weight_files(root: Path) -> list[Path]:
    """Every weight file (the bytes an average must read) under ``root``, in revision order."""
    files = [p for p in root.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return sorted(files, key=lambda p: (int(p.parent.name.removeprefix("step")), p.name))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="70m", choices=["tiny", "70m", "160m", "410m", "1b"])
    ap.add_argument("--revisions", type=int, default=9)
    ap.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--max-shard-size", type=int, default=None, help="bytes per shard")
    ap.add_argument("--root", default=None, help="output folder (default under bench/out/data)")
    a = ap.parse_args()
    root, _ = trajectory(a.shape, a.revisions, fmt=a.format, dtype=a.dtype, root=a.root,
                         max_shard_size=a.max_shard_size, log=lambda m: print(m, file=sys.stderr))
    print(root)


if __name__ == "__main__":
    main()
