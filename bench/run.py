"""Benchmark: merger against its peers on one synthetic Pythia-shaped trajectory, in one run.

Each tool runs as a whole separate process on the same inputs, with a warm page cache (the input
files are read with ``cat`` before every timed run, and ``sync`` flushes the previous run's
output first). Timed per tool: wall time, peak RSS (``/usr/bin/time -v``: ru_maxrss, which counts
the file pages a tool mmaps, too) and peak anonymous RSS (sampled from /proc every 50 ms over the
tool's process tree).

  merger    ``merger average ROOT --revisions stepA..stepB -o OUT --force --max-memory M --device D``
  mergekit  ``mergekit-yaml`` with ``merge_method: linear``, ``dtype: float16``, weight 1.0 each,
            normalize (installed by ``bench/setup.sh`` into bench/.venv)
  naive     ``bench/naive_average.py``: fairseq's load-whole-state-dicts average, fp64 sums
  cat       ``cat`` of every input weight file to /dev/null: the read floor
  io        ``cat`` as above while ``dd`` copies the latest revision's weight files to a file with
            O_DIRECT: the I/O floor of a merge (read every input, write one output), no computing

The outputs of merger and mergekit are then compared, tensor by tensor, with naive's fp64
reference (max abs diff, max distance in units in the last place). Results go to the terminal
and to ``bench/out/results-<shape>-<n>[-<format>][-<tag>].json``.

    .venv/bin/python bench/run.py --shape 70m                         # 9 revisions, every tool
    .venv/bin/python bench/run.py --shape 410m --revisions 20 --tools mergekit,naive,cat --repeat 3
    .venv/bin/python bench/run.py --shape 70m --merger-cmd '{python} bench/naive_average.py {out} {dirs}'

Run it with the repo's venv (it imports ``merger.testing.synth`` to make the trajectory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(BENCH))

from compare import compare_outputs  # noqa: E402
from make_trajectory import trajectory, weight_files  # noqa: E402

TOOLS = ("merger", "mergekit", "naive", "cat", "io")
DEFAULT_MERGER_CMD = ("{merger} average {root} --revisions {first}..{last} -o {out} --force "
                      "--max-memory {max_memory} --device {device}")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------- commands, one per tool

def mergekit_config(dirs: list[Path], path: Path, dtype: str) -> Path:
    """mergekit's YAML for a uniform linear merge of ``dirs``."""
    lines = ["merge_method: linear", f"dtype: {dtype}", "parameters:", "  normalize: true", "models:"]
    for d in dirs:
        lines += [f"  - model: {d}", "    parameters:", "      weight: 1.0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def commands(a, root: Path, names: list[str], files: list[Path], runs: Path) -> dict[str, list[str] | None]:
    """argv of every tool; None for a tool that is not installed."""
    dirs = [root / n for n in names]
    q = shlex.quote
    fields = {"merger": q(str(a.merger_bin)), "python": q(sys.executable), "root": q(str(root)),
              "first": names[0], "last": names[-1], "max_memory": a.max_memory, "device": a.device,
              "revisions": ",".join(names), "dirs": " ".join(q(str(d)) for d in dirs)}
    cmds: dict[str, list[str] | None] = {}
    merger_ok = a.merger_cmd != DEFAULT_MERGER_CMD or Path(a.merger_bin).exists()
    cmds["merger"] = ([*shlex.split(a.merger_cmd.format(out=q(str(runs / "merger")), **fields)),
                       *shlex.split(a.merger_args)] if merger_ok else None)
    mk = Path(a.mergekit_venv) / "bin" / "mergekit-yaml"
    cfg = mergekit_config(dirs, runs / "mergekit.yml", a.dtype)
    cmds["mergekit"] = ([str(mk), str(cfg), str(runs / "mergekit"), "--no-copy-tokenizer",
                         "--no-write-model-card", "--quiet", "--device", a.device,
                         *shlex.split(a.mergekit_args)] if mk.exists() else None)
    cmds["naive"] = [sys.executable, str(BENCH / "naive_average.py"), str(runs / "naive"),
                     *map(str, dirs), "--accumulate", a.naive_accumulate]
    cmds["cat"] = ["cat", *map(str, files)]
    # one revision's bytes (real data: a virtual disk may skip writing zeros) to an O_DIRECT file
    last = [q(str(f)) for f in files if dirs[-1] in f.parents]
    io_out = q(str(runs / "io" / "floor.bin"))
    cmds["io"] = ["sh", "-c", f"mkdir -p {q(str(runs / 'io'))} && {{ cat {' '.join(q(str(f)) for f in files)} "
                  f">/dev/null & cat {' '.join(last)} | dd of={io_out} bs=8M iflag=fullblock oflag=direct "
                  "status=none; wait; }"]
    return cmds


# ---------------------------------------------------------------- measuring one process

def _tree(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return out


def _rss_kb(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of one process, in kB; zeros once it is gone."""
    anon = total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    total = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return anon, total


def timed(argv: list[str], *, log: Path, stdout_null: bool = False) -> dict:
    """Run ``argv`` under ``/usr/bin/time -v``; wall seconds, peak RSS, sampled peak anon RSS."""
    tv = log.with_suffix(".time")
    env = {**os.environ, **OFFLINE_ENV}
    with open(log, "w") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(tv), *argv], env=env,
                             stdout=subprocess.DEVNULL if stdout_null else err, stderr=err)
        peak_anon, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                pids = [q for q in _tree(p.pid) if q != p.pid]
                peak_anon[0] = max(peak_anon[0], sum(_rss_kb(q)[0] for q in pids))

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = p.wait()
        wall = time.perf_counter() - t0
        done.set()
        th.join()
    rusage = {}
    for line in tv.read_text().splitlines() if tv.exists() else []:
        k, _, v = line.strip().rpartition(": ")
        rusage[k] = v
    return {"rc": rc, "wall_s": wall, "maxrss_kb": int(rusage.get("Maximum resident set size (kbytes)", 0)),
            "peak_anon_kb": peak_anon[0], "user_s": float(rusage.get("User time (seconds)", 0)),
            "sys_s": float(rusage.get("System time (seconds)", 0))}


def cpu_busy(seconds: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``seconds`` (from /proc/stat): other work skews timings."""
    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    (t0, i0), _, (t1, i1) = snap(), time.sleep(seconds), snap()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit_s: float, log) -> float:
    """Wait up to ``limit_s`` for the machine to be (nearly) idle; returns the last busy fraction."""
    t0 = time.monotonic()
    while (b := cpu_busy()) > 0.2 and time.monotonic() - t0 < limit_s:
        pass
    if b > 0.2:
        log(f"  note: CPUs {b:.0%} busy with other work before this run; its timing is skewed")
    return b


def warm(files: list[Path]) -> float:
    """Read the inputs into the page cache (untimed for the tools); returns seconds taken."""
    subprocess.run(["sync"], check=False)
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def cached_fraction(files: list[Path]) -> float | None:
    """Share of the input bytes in the page cache (util-linux ``fincore``); None without it."""
    try:
        out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    res, size = sum(map(int, out[0::2])), sum(map(int, out[1::2]))
    return min(res / size, 1.0) if size else None


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


# ---------------------------------------------------------------- report

def summarize(runs: dict[str, list[dict]], input_bytes: int) -> dict[str, dict]:
    """Per tool: best/median wall, max of peak RSS over repeats, throughput and ratios."""
    s: dict[str, dict] = {}
    for tool, rs in runs.items():
        ok = [r for r in rs if r["rc"] == 0]
        if not ok:
            s[tool] = {"ok": False, "rc": rs[-1]["rc"] if rs else None}
            continue
        walls = [r["wall_s"] for r in ok]
        s[tool] = {"ok": True, "wall_s": min(walls), "wall_median_s": statistics.median(walls),
                   "maxrss_kb": max(r["maxrss_kb"] for r in ok),
                   "peak_anon_kb": max(r["peak_anon_kb"] for r in ok),
                   "cpu_s": min(r["user_s"] + r["sys_s"] for r in ok),
                   "max_busy_before": max(r.get("busy_before", 0.0) for r in ok),
                   "min_cached_before": min((r["cached_before"] for r in ok
                                             if r.get("cached_before") is not None), default=None),
                   "input_gb_per_s": input_bytes / min(walls) / 1e9}
    for ref, key in (("mergekit", "vs_mergekit"), ("cat", "vs_cat"), ("io", "vs_io")):
        if s.get(ref, {}).get("ok"):
            for v in s.values():
                if v.get("ok"):
                    v[key] = v["wall_s"] / s[ref]["wall_s"]
    return s


def print_table(title: str, summary: dict[str, dict], checks: dict[str, dict]) -> None:
    gb = lambda kb: f"{kb / 1e6:.2f} GB"  # noqa: E731  (kB -> GB)
    x = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    header = ["tool", "wall s (best)", "median", "cpu s", "peak RSS", "peak anon", "input GB/s",
              "time/mergekit", "time/cat", "time/io", "vs naive"]
    rows = []
    for tool, v in summary.items():
        if not v["ok"]:
            rows.append([tool, f"FAILED rc={v['rc']}"] + [""] * (len(header) - 2))
            continue
        c = checks.get(tool, {})
        check = ("reference" if tool == "naive" else
                 f"{c['max_ulp']} ulp, {c['max_abs']:.1e}" if c.get("max_ulp") is not None else
                 f"max abs {c['max_abs']:.1e}" if "max_abs" in c else c.get("error", "-"))
        rows.append([tool, f"{v['wall_s']:.2f}", f"{v['wall_median_s']:.2f}", f"{v['cpu_s']:.1f}", gb(v["maxrss_kb"]),
                     gb(v["peak_anon_kb"]), f"{v['input_gb_per_s']:.2f}", x(v.get("vs_mergekit")),
                     x(v.get("vs_cat")), x(v.get("vs_io")), check])
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="left" if h in ("tool", "vs naive") else "right")
        for r in rows:
            t.add_row(*r)
        Console(width=max(shutil.get_terminal_size((160, 24)).columns, 160)).print(t)
    except ImportError:
        print(title)
        w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            print("  ".join(str(c).rjust(w[i]) for i, c in enumerate(r)))


def versions(a) -> dict:
    def out(argv: list[str]) -> str | None:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None
    mk_py = Path(a.mergekit_venv) / "bin" / "python"
    return {"merger_git": out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "mergekit": out([str(mk_py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"]),
            "torch": out([sys.executable, "-c", "import torch; print(torch.__version__)"]),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "machine": platform.platform()}


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--shape", default="70m", choices=["tiny", "70m", "160m", "410m", "1b"])
    ap.add_argument("--revisions", type=int, default=9, help="number of checkpoints (default 9)")
    ap.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--max-shard-size", type=int, default=None, help="input shard size, bytes")
    ap.add_argument("--max-memory", default="2GB", help="merger's --max-memory (default 2GB)")
    ap.add_argument("--device", default="cpu", help="merger's and mergekit's --device")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma list from {','.join(TOOLS)}")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per tool (best and median shown)")
    ap.add_argument("--merger-bin", default=str(REPO / ".venv" / "bin" / "merger"))
    ap.add_argument("--merger-cmd", default=DEFAULT_MERGER_CMD,
                    help="merger's command template; fields: {merger} {python} {root} {first} {last} "
                         "{out} {max_memory} {device} {revisions} (comma list) {dirs} (space list)")
    ap.add_argument("--merger-args", default="", help="extra merger flags, e.g. --no-hash")
    ap.add_argument("--mergekit-venv", default=str(BENCH / ".venv"))
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml flags, e.g. --lazy-unpickle")
    ap.add_argument("--naive-accumulate", default="float64", choices=["float32", "float64"])
    ap.add_argument("--root", default=None, help="trajectory folder (default under bench/out/data)")
    ap.add_argument("--wait-idle", type=float, default=60.0,
                    help="seconds to wait for other load to stop before each run (default 60)")
    ap.add_argument("--tag", default="", help="suffix of the results file name, for side runs")
    ap.add_argument("--keep", action="store_true", help="keep the outputs under bench/out/runs")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with naive")
    a = ap.parse_args()

    tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    if bad := [t for t in tools if t not in TOOLS]:
        ap.error(f"unknown tools {bad}; choose from {','.join(TOOLS)}")
    if not Path("/usr/bin/time").exists():
        sys.exit("Error: /usr/bin/time is missing (Debian: apt-get install time)")

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    root, names = trajectory(a.shape, a.revisions, fmt=a.format, dtype=a.dtype, root=a.root,
                             max_shard_size=a.max_shard_size, log=log)
    files = weight_files(root)
    input_bytes = sum(f.stat().st_size for f in files)
    runs_dir = BENCH / "out" / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    cmds = commands(a, root, names, files, runs_dir)
    log(f"inputs: {len(names)} revisions, {len(files)} files, {input_bytes / 1e9:.2f} GB")

    runs: dict[str, list[dict]] = {}
    for rep in range(a.repeat):
        for tool in tools:
            argv = cmds[tool]
            if argv is None:
                log(f"skip {tool}: not installed")
                continue
            out = runs_dir / tool
            shutil.rmtree(out, ignore_errors=True)
            busy = wait_idle(a.wait_idle, log)  # first: the cache cools while we wait
            w = warm(files)
            cached = cached_fraction(files)
            if cached is not None and cached < 0.95:
                log(f"  note: only {cached:.0%} of the inputs are in the page cache (RAM too small "
                    "for them): this run reads from disk")
            line = shlex.join(argv)
            log(f"[{rep + 1}/{a.repeat}] {tool}: {line[:200]}{' ...' if len(line) > 200 else ''}")
            r = timed(argv, log=runs_dir / f"{tool}.log", stdout_null=tool in ("cat", "io"))
            r.update(warm_s=w, busy_before=round(busy, 3), cached_before=cached,
                     output_bytes=dir_bytes(out), argv=argv)
            if r["rc"] != 0:
                r["stderr_tail"] = (runs_dir / f"{tool}.log").read_text()[-3000:]
                log(f"  {tool} failed (rc {r['rc']}):\n{r['stderr_tail'][-1500:]}")
            else:
                log(f"  {r['wall_s']:.2f} s, peak RSS {r['maxrss_kb'] / 1e6:.2f} GB, "
                    f"peak anon {r['peak_anon_kb'] / 1e6:.2f} GB")
            runs.setdefault(tool, []).append(r)

    checks: dict[str, dict] = {}
    ref = runs_dir / "naive"
    if not a.no_check and runs.get("naive") and runs["naive"][-1]["rc"] == 0:
        for tool in ("merger", "mergekit"):
            if runs.get(tool) and runs[tool][-1]["rc"] == 0:
                log(f"checking {tool} against naive ...")
                try:
                    checks[tool] = compare_outputs(runs_dir / tool, ref)
                except Exception as e:  # report, don't lose the timings
                    checks[tool] = {"error": f"{type(e).__name__}: {e}"}

    summary = summarize(runs, input_bytes)
    title = (f"{a.shape} x {len(names)} revisions, {a.format} {a.dtype}, "
             f"{input_bytes / 1e9:.2f} GB in, {os.cpu_count()} CPUs, merger --max-memory {a.max_memory} "
             f"--device {a.device}")
    print_table(title, summary, checks)
    if busy := [t for t, v in summary.items() if v.get("max_busy_before", 0) > 0.2]:
        print(f"warning: other processes kept the CPUs busy before runs of {', '.join(busy)}: "
              "timings are skewed (see busy_before in the JSON; use --repeat, best is shown)")
    if cold := [t for t, v in summary.items() if (v.get("min_cached_before") or 1.0) < 0.95]:
        print(f"warning: inputs not fully in the page cache before runs of {', '.join(cold)}: "
              "those timings include disk reads (the cat floor then is the disk's)")
    for tool, c in checks.items():
        notes = {k: c[k] for k in ("missing", "extra", "dtype_changed", "buffers_not_exact", "error")
                 if c.get(k)}
        if notes:
            print(f"{tool}: {json.dumps(notes)}")

    suffix = ("" if a.format == "safetensors" else f"-{a.format}") + (f"-{a.tag}" if a.tag else "")
    path = BENCH / "out" / f"results-{a.shape}-{len(names)}{suffix}.json"
    path.write_text(json.dumps({
        "shape": a.shape, "revisions": names, "format": a.format, "dtype": a.dtype, "root": str(root),
        "input_bytes": input_bytes, "input_files": len(files), "max_memory": a.max_memory,
        "device": a.device, "repeat": a.repeat, "tools": tools, "merger_args": a.merger_args,
        "mergekit_args": a.mergekit_args, "versions": versions(a), "summary": summary,
        "checks": checks, "runs": runs, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=2) + "\n")
    log(f"wrote {path}")
    if not a.keep:
        for tool in TOOLS:
            shutil.rmtree(runs_dir / tool, ignore_errors=True)


if __name__ == "__main__":
    main()
