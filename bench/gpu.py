"""GPU check and fold-rate benchmark, for a machine with CUDA (needs only torch and numpy there).

    PYTHONPATH=. python3 bench/gpu.py --shape 410m --revisions 9

Writes a Pythia-shaped fp16 trajectory (pytorch_model.bin, so safetensors isn't needed), reads it
once to warm the page cache, then merges it with --device cuda and --device cpu, reporting wall
time and GB/s of input, checks that both outputs are bit-identical, and times `cat` (the floor).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merger.testing import synth  # noqa: E402
from merger.api import average  # noqa: E402
from merger.plan import Options  # noqa: E402
from merger.units import parse_size  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="410m")
    ap.add_argument("--revisions", type=int, default=9)
    ap.add_argument("--root", default="/tmp/merger-gpu-bench")
    ap.add_argument("--max-memory", default="8GB")
    ap.add_argument("--devices", default="cuda,cpu")
    a = ap.parse_args()
    root = Path(a.root) / f"{a.shape}-n{a.revisions}"
    steps = [1000 * (i + 1) for i in range(a.revisions)]
    t = time.perf_counter()
    if not (root / "done").exists():
        synth.write_trajectory(root, shape=a.shape, steps=steps, fmt="bin")
        (root / "done").write_text("ok")
    files = sorted(str(p) for p in root.glob("step*/pytorch_model.bin"))
    total = sum(os.path.getsize(f) for f in files)
    print(f"trajectory {root}: {len(files)} files, {total / 1e9:.2f} GB (made in {time.perf_counter() - t:.1f} s)")
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    t = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    cat = time.perf_counter() - t
    print(f"cat floor: {cat:.2f} s, {total / cat / 1e9:.1f} GB/s")
    outs = {}
    for dev in a.devices.split(","):
        for rep in range(2):
            out = Path(a.root) / f"out-{dev}"
            t = time.perf_counter()
            plan, res = average([str(root)], options=Options(device=dev, max_memory=parse_size(a.max_memory)),
                                output=out, force=True)
            wall = time.perf_counter() - t
            print(f"{dev} run {rep}: {wall:.2f} s in-process ({res.seconds:.2f} s merge), "
                  f"{total / res.seconds / 1e9:.1f} GB/s of input, {len(plan.blocks)} blocks, "
                  f"busy {res.timings}, peak RSS {res.peak_rss / 1e9:.2f} GB")
        outs[dev] = out
    if len(outs) == 2:
        a_, b_ = (sorted(p.glob("*.safetensors")) for p in outs.values())
        same = [x.read_bytes() == y.read_bytes() for x, y in zip(a_, b_)]
        print("cuda and cpu outputs bit-identical:", all(same) and len(a_) == len(b_))
    if torch.cuda.is_available():
        print("device:", torch.cuda.get_device_name(), "torch", torch.__version__)


if __name__ == "__main__":
    main()
