"""Synthetic Pythia-shaped trajectories for the benchmarks, written once and reused.

A trajectory is ``ROOT/stepN/`` checkpoint folders (config.json + model.safetensors or
pytorch_model.bin, Pythia's real tensor names and buffers) made by ``merger.testing.synth``. A finished
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

from merger.testing.synth import write_trajectory

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


def _complete(root: Path) -> dict | None:
    """The parameters a finished trajectory at ``root`` was made with, or None."""
    try:
        params = json.loads((root / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = all((root / f"step{s}" / "config.json").is_file() for s in params.get("steps", []))
    return params if ok else None


def _donors(params: dict, root: Path) -> dict[int, Path]:
    """step -> a real folder of that step in another finished trajectory of the same kind."""
    found: dict[int, Path] = {}
    same = ("shape", "format", "dtype", "max_shard_size")
    for other in sorted(DATA.glob("*")) if DATA.is_dir() else []:
        if other.resolve() == root.resolve() or not (p := _complete(other)):
            continue
        if all(p.get(k) == params[k] for k in same):
            for s in p["steps"]:
                found.setdefault(s, (other / f"step{s}").resolve())
    return found


def trajectory(shape: str = "70m", n: int = 9, *, fmt: str = "safetensors",
               dtype: str = "float16", root: str | Path | None = None,
               max_shard_size: int | None = None, log=print) -> tuple[Path, list[str]]:
    """Make (or reuse) a trajectory of ``n`` revisions; returns (root, revision names oldest first).

    Steps that another finished trajectory of the same shape, format and dtype already holds
    (every trajectory uses the steps 1000, 2000, ...: the same step has the same bytes) are
    symlinked from it instead of written again, so 410m x 5, 9 and 20 cost the disk of 20.
    Deleting a trajectory others link to breaks them (they are then rewritten on next use).
    """
    root = Path(root) if root is not None else default_root(shape, n, fmt, dtype)
    steps = steps_for(n)
    params = {"shape": shape, "steps": steps, "format": fmt, "dtype": dtype,
              "max_shard_size": max_shard_size}
    names = [f"step{s}" for s in steps]
    if _complete(root) == params:
        log(f"reusing trajectory {root}")
        return root, names
    if root.is_symlink() or root.is_file():
        root.unlink()
    elif root.exists():
        shutil.rmtree(root)  # does not follow symlinks: linked donors are left alone
    root.mkdir(parents=True)
    donors = _donors(params, root)
    linked = [s for s in steps if s in donors]
    for s in linked:
        (root / f"step{s}").symlink_to(donors[s], target_is_directory=True)
    todo = [s for s in steps if s not in donors]
    log(f"trajectory {root} ({shape}, {n} x {fmt} {dtype}): {len(linked)} linked, "
        f"writing {len(todo)} ...")
    if todo:
        write_trajectory(root, shape=shape, steps=todo, fmt=fmt, dtype=getattr(torch, dtype),
                         max_shard_size=max_shard_size)
    (root / MARKER).write_text(json.dumps(params) + "\n")
    return root, names


def weight_files(root: Path) -> list[Path]:
    """Every weight file (the bytes an average must read) under ``root``, in revision order."""
    dirs = sorted((d for d in root.iterdir() if d.name.startswith("step") and d.is_dir()),
                  key=lambda d: int(d.name.removeprefix("step")))
    return [f for d in dirs for f in sorted(d.iterdir())
            if f.suffix in (".safetensors", ".bin") and f.is_file()]


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
