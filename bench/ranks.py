"""Benchmark: one merge on 1, 2, ... ranks (torchrun on this node), against the I/O floor.

Per world size N, on the same synthetic trajectory (``make_trajectory.py``) with a warm page cache:

  N = 1   ``merger average ROOT --revisions A..B -o OUT --force --max-shard-size S [--device D]``
  N > 1   ``torchrun --standalone --nproc-per-node N -m merger average ...`` (same arguments)
  io      ``cat`` of every input weight file while ``dd`` writes the output's bytes with O_DIRECT:
          the I/O a merge cannot avoid (``run.py``'s floor)

Reported: wall seconds of the whole launch, the merge's own seconds (``merger.json``), aggregate
GB/s of input (input bytes / wall), wall / io floor, per-rank bytes read, seconds and peak RSS
(``merger.json``'s ``ranks``), and whether every output file but ``merger.json`` and README.md
is identical to the one-process output.

    PYTHONPATH=. .venv/bin/python bench/ranks.py --shape 410m --revisions 5 --ranks 1,2
    PYTHONPATH=. python bench/ranks.py --shape 1b --revisions 9 --ranks 1,2,4,8 --device cuda   # GPU node

``--device cuda``: every rank folds on ``cuda:LOCAL_RANK`` (the N > 1 runs need N GPUs).
Results: a table on stdout and ``bench/out/ranks-<shape>-<n>-<device>.json``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from make_trajectory import trajectory, weight_files  # noqa: E402
from run import OFFLINE_ENV, timed, warm  # noqa: E402


def merger_argv(a, n: int, root: Path, names: list[str], out: Path) -> list[str]:
    args = ["average", str(root), "--revisions", f"{names[0]}..{names[-1]}", "-o", str(out), "--force",
            "--max-shard-size", a.max_shard_size, "--max-memory", a.max_memory, "--device", a.device]
    if n == 1:
        return [sys.executable, "-m", "merger", *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--standalone", "--nproc-per-node", str(n), "-m", "merger", *args]


def io_floor(files: list[Path], out_bytes: int, tmp: Path) -> float:
    """Seconds to read every input (cat) while writing ``out_bytes`` with O_DIRECT (dd)."""
    tmp.mkdir(parents=True, exist_ok=True)
    mb = max(1, out_bytes >> 20)
    subprocess.run(["sh", "-c", f"dd if=/dev/urandom of={shlex.quote(str(tmp / 'src.bin'))} bs=1M count={mb} "
                    "status=none"], check=True)  # real bytes to copy (a virtual disk may skip zeros)
    warm(files)
    cmd = (f"cat {' '.join(shlex.quote(str(f)) for f in files)} > /dev/null & "
           f"dd if={shlex.quote(str(tmp / 'src.bin'))} of={shlex.quote(str(tmp / 'floor.bin'))} bs=8M "
           f"oflag=direct status=none; wait")
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", cmd], check=True)
    return time.perf_counter() - t0


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name not in ("merger.json", "README.md"))
    if names != sorted(p.name for p in b.iterdir() if p.name not in ("merger.json", "README.md")):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def predict(params: float, *, n: int = 10, itemsize: int = 4, nodes=(1, 2, 4, 8, 16, 32, 64), per_node: int = 8,
            rank_gbps: float = 1.1, node_gbps: float = 5.0, fs_gbps: float = 100.0, shard_gb: float = 5.0,
            start_s: float = 10.0) -> list[dict]:
    """The scaling model of bench/README.md: predicted wall seconds of averaging ``n`` checkpoints of
    ``params`` parameters, per node count.

    Output shards (``shard_gb`` each) are dealt to ranks as ``engine/ranked.partition`` does (equal
    shards: round robin); a rank folds its shards' input at ``rank_gbps``; a node moves its ranks'
    reads and writes at ``node_gbps`` (its network / filesystem client); the filesystem serves at
    most ``fs_gbps`` in all. Wall = start-up + the slowest node, or the filesystem if slower.
    """
    import math

    out = params * itemsize / 1e9
    read = out * n
    shards = max(1, math.ceil(out / shard_gb))
    rows = []
    for nn in nodes:
        ranks = nn * per_node
        # equal shards dealt as partition() does: local rank 0 of every node first, then local rank 1, ...
        order = sorted(range(ranks), key=lambda r: (r % per_node, r // per_node))
        per_rank = [0] * ranks
        for k in range(shards):
            per_rank[order[k % ranks]] += 1
        slowest = 0.0
        for j in range(nn):
            mine = per_rank[j * per_node:(j + 1) * per_node]
            fold = max(mine) * read / shards / rank_gbps
            io = sum(mine) * (read + out) / shards / node_gbps
            slowest = max(slowest, fold, io)
        wall = start_s + max(slowest, (read + out) / fs_gbps)
        rows.append({"nodes": nn, "ranks": ranks, "busy_ranks": sum(1 for x in per_rank if x), "wall_s": wall})
    return rows


def print_model(a) -> None:
    for name, params in (("7B", 6.7e9), ("70B", 70e9)):
        for shard in (5.0, 1.0):
            rows = predict(params, rank_gbps=a.rank_gbps, node_gbps=a.node_gbps, fs_gbps=a.fs_gbps, shard_gb=shard)
            print(f"{name} x 10 fp32, {shard:g} GB shards: " + ", ".join(
                f"{r['nodes']} node(s) {r['wall_s']:.0f} s" + (f" ({r['busy_ranks']} ranks busy)"
                                                               if r['busy_ranks'] < r['ranks'] else "")
                for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="410m")
    ap.add_argument("--revisions", type=int, default=5)
    ap.add_argument("--format", default="safetensors")
    ap.add_argument("--ranks", default="1,2", help="world sizes, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-memory", default="2GB", help="per rank")
    ap.add_argument("--max-shard-size", default="100MB", help="several shards, so every rank has a share")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--root", help="an existing trajectory folder (stepN/ subfolders) to read instead")
    ap.add_argument("--model", action="store_true", help="print the scaling model's predictions and stop")
    ap.add_argument("--rank-gbps", type=float, default=1.1, help="--model: measured fold rate of one rank")
    ap.add_argument("--node-gbps", type=float, default=5.0, help="--model: one node's filesystem bandwidth")
    ap.add_argument("--fs-gbps", type=float, default=100.0, help="--model: the filesystem's aggregate bandwidth")
    a = ap.parse_args()
    if a.model:
        print_model(a)
        return
    if a.root:  # an existing trajectory, read only: its first --revisions steps
        root = Path(a.root)
        names = sorted((p.name for p in root.iterdir() if p.name.startswith("step")), key=lambda x: int(x[4:]))
        names = names[: a.revisions]
    else:
        root, names = trajectory(a.shape, a.revisions, fmt=a.format)
    files = [f for f in weight_files(root) if f.parent.name in names]
    in_bytes = sum(f.stat().st_size for f in files)
    runs_dir = BENCH / "out" / "ranks"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"shape": a.shape, "revisions": a.revisions, "device": a.device, "input_bytes": in_bytes,
                     "cpus": os.cpu_count(), "platform": platform.platform(), "runs": {}}
    outs: dict[int, Path] = {}
    for n in [int(x) for x in a.ranks.split(",")]:
        best = None
        for rep in range(a.repeat):
            out = runs_dir / f"out-{n}"
            warm(files)
            r = timed(merger_argv(a, n, root, names, out), log=runs_dir / f"log-{n}-{rep}.txt", stdout_null=True)
            if r["rc"] != 0:
                sys.exit(f"{n} ranks failed: see {runs_dir / f'log-{n}-{rep}.txt'}")
            m = json.loads((out / "merger.json").read_text())
            r.update(merge_s=m["timings"]["total_s"], read_bytes=m["read_bytes"], out_bytes=m["output"]["bytes"],
                     ranks=m.get("ranks"), gbps=in_bytes / r["wall_s"] / 1e9)
            if best is None or r["wall_s"] < best["wall_s"]:
                best = r
        outs[n] = runs_dir / f"out-{n}"
        results["runs"][n] = best
    out_bytes = next(iter(results["runs"].values()))["out_bytes"]
    floor = io_floor(files, out_bytes, runs_dir / "io")
    results["io_floor_s"] = floor
    base = min(outs)
    print(f"{a.shape} x {a.revisions} ({in_bytes / 1e9:.2f} GB in, {out_bytes / 1e9:.2f} GB out), "
          f"device {a.device}, io floor {floor:.2f} s ({in_bytes / floor / 1e9:.2f} GB/s)")
    print(f"{'ranks':>5} {'wall s':>7} {'merge s':>8} {'GB/s':>6} {'x floor':>8} {'same bytes':>10}  "
          "per rank (GB read, s, peak RSS MB)")
    for n, r in results["runs"].items():
        r["same_as_1"] = same_bytes(outs[base], outs[n])
        per = "; ".join(f"{x['read_bytes'] / 1e9:.2f}, {x['seconds']:.2f}, {x['peak_rss'] >> 20}"
                        for x in (r["ranks"] or []))
        print(f"{n:>5} {r['wall_s']:>7.2f} {r['merge_s']:>8.2f} {r['gbps']:>6.2f} {r['wall_s'] / floor:>8.2f} "
              f"{str(r['same_as_1']):>10}  {per}")
    dest = BENCH / "out" / f"ranks-{a.shape}-{a.revisions}-{a.device.replace(':', '')}.json"
    dest.write_text(json.dumps(results, indent=1, default=str))
    print(f"-> {dest}")


if __name__ == "__main__":
    os.environ.update(OFFLINE_ENV)
    main()
