"""Benchmark: averaging a DCP training run (torch.distributed.checkpoint folders), merger against a
load-everything baseline and the read floor. Not a test.

The run: ``step-<N>/`` folders of a 410m-shaped GPT-NeoX (fp32 parameters, as FSDP keeps them),
each tensor cut along dim 0 into 2 chunks (``__0_0.distcp``, ``__1_0.distcp``: 2 ranks), the
state dict ``{"model": ..., "optim": {exp_avg, exp_avg_sq}}`` laid out exactly as torch's
``FileSystemWriter`` lays it out (model records first, then the optimizer's; each record a
``torch.save`` of its chunk; ``.metadata`` a pickle of torch's own Metadata classes). The
optimizer's storage bytes are written as holes (a sparse file: the right size and layout, no disk),
so 9 revisions take ~15 GB of disk, not 44.

Timed, each in its own process (wall, peak RSS from ``/usr/bin/time``), from a cold page cache
(dropped before each run: the inputs come from the disk, as a run bigger than memory reads them)
and a warm one (what the floor's read left in it):
  floor     pread of exactly the model records' bytes of every revision, 4 MB reads on merger's number
            of threads: the read floor; and the I/O floor: that, with the output's bytes written
            beside it (O_DIRECT, 8 MB pieces), as any merge must write them
  merger    ``merger average RUN --revisions ... -o OUT --max-memory M`` (output: a DCP folder)
  baseline  OLMo-core's way: ``dcp.load`` of each revision's model into memory, a float64 sum,
            the mean cast to fp32 and ``dcp.save``\\ d
Each merger and baseline run comes right after the floor runs in the same cache state
(``read_floor_s``, ``io_floor_s``), and ``x_floor`` is the ratio to the I/O floor (``x_read_floor``
to the read floor); merger runs ``--repeat`` times (the median
trial is reported, every trial is kept). Then the two outputs are compared (max abs difference).

    python bench/dcp.py --revisions 9 --shape 410m --max-memory 2GB     # data in bench/out/dcp-410m-n9
    (as root for the cold runs: they write /proc/sys/vm/drop_caches)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class _Sparse:
    """A file stream that turns large writes (tensor storages) into holes: seek instead of write."""

    def __init__(self, f):
        self.f = f

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n >= 1 << 16:
            self.f.seek(n, 1)
        else:
            self.f.write(b)
        return n

    def flush(self) -> None:
        self.f.flush()


def make_run(root: Path, shape: str, n: int) -> list[str]:
    """Write ``n`` step folders (2 ranks each); returns the revision names. Reused when complete."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta,
                                                       TensorProperties, TensorStorageMetadata)

    from merger.testing.synth import SHAPES, pythia_names

    names = [f"step-{1000 * (i + 1)}" for i in range(n)]
    params = {k: d for k, (d, kind) in pythia_names(SHAPES[shape]).items() if kind in ("weight", "bias", "norm")}
    for step_i, name in enumerate(names):
        folder = root / name
        if (folder / ".metadata").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(step_i)
        entries, storage, planner = {}, {}, {}
        files = [open(folder / f"__{r}_0.distcp", "wb") for r in range(2)]
        for group, keys in (("model", [""]), ("optim", [".exp_avg", ".exp_avg_sq"])):
            for pname, dims in params.items():
                for suffix in keys:
                    fqn = f"model.{pname}" if group == "model" else f"optim.state.{pname}{suffix}"
                    half = (dims[0] + 1) // 2
                    chunks = []
                    for r, (lo, hi) in enumerate(((0, half), (half, dims[0]))):
                        size = (hi - lo, *dims[1:])
                        offs = torch.Size([lo] + [0] * (len(dims) - 1))
                        f = files[r]
                        at = f.tell()
                        if group == "model":
                            torch.save(torch.randn(size, generator=g).mul_(0.02), f)
                        else:
                            torch.save(torch.zeros(size), _Sparse(f))
                        storage[MetadataIndex(fqn, offs, r)] = _StorageInfo(f.name.rsplit("/", 1)[1], at, f.tell() - at)
                        chunks.append(ChunkStorageMetadata(offs, torch.Size(size)))
                    props = TensorProperties(dtype=torch.float32)
                    entries[fqn] = TensorStorageMetadata(props, torch.Size(dims), chunks)
                    planner[fqn] = (group, pname) if group == "model" else (group, "state", pname, suffix[1:])
        for f in files:
            f.truncate(f.tell())
            f.close()
        md = Metadata(entries, planner_data=planner, storage_data=storage, storage_meta=StorageMeta(), version="1.0.0")
        (folder / ".metadata.tmp").write_bytes(pickle.dumps(md))
        (folder / ".metadata.tmp").rename(folder / ".metadata")
    return names


def floor(folders: list[str], write: int = 0, out: str | None = None) -> None:
    """Read exactly the model records of every revision (what any reader must read), on as many
    threads as merger folds on, each a share of the records; with ``write``, write that many bytes
    (the output's size) into ``out`` beside, with O_DIRECT in 8 MB pieces as merger writes: the I/O
    floor of the merge."""
    from concurrent.futures import ThreadPoolExecutor

    from merger.device import usable_cpus
    from merger.formats.dcp_metadata import read_metadata

    spans = []
    for folder in folders:
        md = read_metadata(folder)
        for e in md.entries.values():
            if e.fqn.startswith("model."):
                spans += [(str(Path(folder) / c.file), c.offset, c.length) for c in e.chunks]
    threads = max(1, min(usable_cpus(), 16))

    def reader(share) -> None:
        buf, fds = memoryview(bytearray(4 << 20)), {}
        for path, at, n in share:
            fd = fds.setdefault(path, os.open(path, os.O_RDONLY))
            end = at + n
            while at < end:
                at += os.preadv(fd, [buf[: min(len(buf), end - at)]], at)
        for fd in fds.values():
            os.close(fd)

    def writer() -> None:
        import mmap

        piece = mmap.mmap(-1, 8 << 20)  # page-aligned, as O_DIRECT wants
        fd = os.open(Path(out) / "floor.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0))
        try:
            for at in range(0, write, len(piece)):
                os.pwrite(fd, piece, at)
        finally:
            os.close(fd)
            os.unlink(Path(out) / "floor.bin")

    with ThreadPoolExecutor(threads + 1) as pool:
        jobs = [pool.submit(reader, spans[i::threads]) for i in range(threads)]
        if write:
            Path(out).mkdir(parents=True, exist_ok=True)
            jobs.append(pool.submit(writer))
        for j in jobs:
            j.result()


def baseline(out: str, folders: list[str]) -> None:
    """OLMo-core's merge: dcp.load each model part whole, sum in float64, save the mean."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from merger.formats.dcp_metadata import read_metadata

    warnings.simplefilter("ignore")
    md = read_metadata(folders[0])
    shapes = {e.fqn[len("model."):]: e.shape for e in md.entries.values() if e.fqn.startswith("model.")}
    acc = {k: torch.zeros(s, dtype=torch.float64) for k, s in shapes.items()}
    for folder in folders:
        sd = {"model": {k: torch.empty(s, dtype=torch.float32) for k, s in shapes.items()}}
        dcp.load(sd, checkpoint_id=folder, no_dist=True)
        for k, v in sd["model"].items():
            acc[k] += v
        del sd
    mean = {k: (v / len(folders)).to(torch.float32) for k, v in acc.items()}
    del acc
    dcp.save({"model": mean}, checkpoint_id=out, no_dist=True)


def can_drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        print("cold runs skipped: dropping the page cache needs root", file=sys.stderr)
        return False


def settle(cache: str) -> None:
    """Before a timed run: written data on disk; for ``cold``, nothing of the inputs in the page cache."""
    subprocess.run(["sync"], check=True)
    if cache == "cold":
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(argv: list[str]) -> dict:
    """Run ``argv``; wall time, and peak RSS as ``/usr/bin/time`` measures it (the tool's own: a
    ``wait4`` from this process would count the pages a forked child shares with it)."""
    t0 = time.perf_counter()
    rss = Path(f"/tmp/merger-bench-rss-{os.getpid()}")
    p = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss), *argv], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    kb, user, system = rss.read_text().split()[-3:]
    rss.unlink()
    return {"rc": p.returncode, "wall_s": round(wall, 2), "peak_rss_gb": round(int(kb) / 1e6, 3),
            "cpu_s": round(float(user) + float(system), 1),
            **({"stderr": p.stderr.decode()[-2000:]} if p.returncode else {})}


def compare(a: str, b: str) -> float:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    import warnings
    warnings.simplefilter("ignore")
    sa, sb = _load_state_dict_from_keys(checkpoint_id=a)["model"], _load_state_dict_from_keys(checkpoint_id=b)["model"]
    assert set(sa) == set(sb)
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="410m")
    ap.add_argument("--revisions", type=int, default=9)
    ap.add_argument("--max-memory", default="2GB")
    ap.add_argument("--tools", default="merger,baseline")
    ap.add_argument("--repeat", type=int, default=3, help="trials of merger (the median is reported)")
    ap.add_argument("--cache", default="cold,warm", help="cold: the page cache dropped before the floor and the "
                                                         "tool (needs root); warm: the floor's read warms it")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role == "floor":
        return floor(a.args)
    if a.role == "io-floor":
        return floor(a.args[2:], int(a.args[0]), a.args[1])
    if a.role == "baseline":
        return baseline(a.args[0], a.args[1:])
    root = HERE / "out" / f"dcp-{a.shape}-n{a.revisions}"
    t0 = time.perf_counter()
    names = make_run(root / "run", a.shape, a.revisions)
    folders = [str(root / "run" / n) for n in names]
    print(f"data: {root / 'run'} ({time.perf_counter() - t0:.0f} s to make or find)", file=sys.stderr)
    from merger.formats.dcp import read as read_dcp

    model_bytes = sum(t.nbytes for t in read_dcp(folders[0]).values())
    out_bytes = model_bytes  # fp32 in, fp32 out
    file_bytes = sum(os.path.getsize(Path(folders[0]) / f) for f in os.listdir(folders[0]))
    results = {"shape": a.shape, "revisions": a.revisions, "model_bytes_per_revision": model_bytes,
               "file_bytes_per_revision": file_bytes, "max_memory": a.max_memory, "runs": {}}
    me = [sys.executable, __file__]
    caches = [c for c in a.cache.split(",") if c != "cold" or can_drop_caches()]
    for cache in caches:
        results["runs"][cache] = {}
        for tool in a.tools.split(","):
            out = root / f"out-{tool}"
            trials = []
            for _ in range(a.repeat if tool != "baseline" else 1):
                subprocess.run(["rm", "-rf", str(out)], check=True)
                argv = {"merger": [sys.executable, "-m", "merger", "average", str(root / "run"), "--revisions",
                                   f"{names[0]}..{names[-1]}", "-o", str(out), "--max-memory", a.max_memory,
                                   "--force"],
                        "baseline": me + ["--role", "baseline", str(out), *folders]}[tool]
                # the floors right before, in the same page-cache state (cold: all from the disk): the
                # read floor (the model records on merger's number of threads) and the I/O floor (that,
                # with the output's bytes written beside it, as a merge must)
                settle(cache)
                read_first = timed(me + ["--role", "floor", *folders])
                settle(cache)
                io_first = timed(me + ["--role", "io-floor", str(out_bytes), str(root / "out-floor"), *folders])
                settle(cache)
                r = timed(argv)
                r["read_gb_per_s"] = round(a.revisions * model_bytes / 1e9 / r["wall_s"], 2)
                r["read_floor_s"], r["io_floor_s"] = read_first["wall_s"], io_first["wall_s"]
                r["x_read_floor"] = round(r["wall_s"] / read_first["wall_s"], 2)
                r["x_floor"] = round(r["wall_s"] / io_first["wall_s"], 2)
                trials.append(r)
                print(cache, tool, json.dumps(r), file=sys.stderr)
            mid = sorted(trials, key=lambda r: r["x_floor"])[len(trials) // 2]  # the median trial
            results["runs"][cache][tool] = {**mid, "trials": trials} if len(trials) > 1 else mid
    last = results["runs"][caches[-1]] if caches else {}
    if "merger" in last and "baseline" in last:
        results["max_abs_diff_merger_vs_baseline"] = compare(str(root / "out-merger"), str(root / "out-baseline"))
        mj = json.loads((root / "out-merger" / "merger.json").read_text())
        results["merger_read_bytes"] = mj["read_bytes"]
    print(json.dumps(results, indent=1))
    (root / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
