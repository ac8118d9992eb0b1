"""``make demo``: the LAWA experiment on this machine, offline, in a few minutes on 2 CPU cores.

1. Train a tiny Pythia (GPT-NeoX) on Python's own docs at a high constant learning rate, and a
   low-LR control, saving a checkpoint every 40 steps as Hub-style revisions ``stepN`` of
   ``local/tiny-pythia`` / ``local/tiny-pythia-lowlr`` in ``demo/hub`` (reused when present).
2. ``merger average`` the last K checkpoints of each run: uniform (LAWA) and EMA.
3. ``merger eval`` the last checkpoint against both averages on held-out perplexity.
4. ``merger sweep`` the second half of the high-LR run: raw vs averaged at every step (the LAWA
   figure, a PNG), on 40 held-out documents per point.

Every step is the real CLI, printed before it runs, exactly as a user would type it.

    python examples/demo.py [--window 5] [--decay 0.8] [--out demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {"high": "local/tiny-pythia", "low": "local/tiny-pythia-lowlr"}


def sh(*args: str, capture: bool = False) -> str:
    """Run ``merger``/python as a user would; show the command; fail loudly."""
    shown = " ".join(shlex.quote(a) for a in args).replace(sys.executable + " -m merger", "merger")
    print(f"\n$ {shown}", file=sys.stderr, flush=True)
    r = subprocess.run(list(args), text=True, stdout=subprocess.PIPE if capture else None)
    if r.returncode:
        sys.exit(f"demo: `{shown}` failed with exit code {r.returncode}")
    return r.stdout or ""


def merger(*args: str, capture: bool = False) -> str:
    return sh(sys.executable, "-m", "merger", *args, capture=capture)


def revisions(cache: Path, repo: str) -> list[int]:
    refs = cache / ("models--" + repo.replace("/", "--")) / "refs"
    return sorted(int(p.name[4:]) for p in refs.glob("step*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo"))
    ap.add_argument("--window", type=int, default=5, help="checkpoints averaged (K)")
    ap.add_argument("--decay", type=float, default=0.8, help="EMA decay per checkpoint")
    ap.add_argument("--limit", type=float, default=None, help="eval documents per task (default: all)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    cache = (a.out / "hub").absolute()
    os.environ.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                      TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                      MERGER_CACHE=str((a.out / "cache").absolute()))
    sh(sys.executable, str(HERE / "train_tiny_pythia.py"), "--cache-dir", str(cache))

    rows = {}
    limit = ["--limit", str(a.limit)] if a.limit else []
    for run, repo in RUNS.items():
        steps = revisions(cache, repo)
        every = steps[-1] - steps[-2]
        first, last = steps[-1] - (a.window - 1) * every, steps[-1]
        spec = ["--revisions", f"step{first}..step{last}", "--every", str(every)]
        uniform, ema = a.out / "merged" / f"{run}-uniform", a.out / "merged" / f"{run}-ema"
        merger("average", repo, *spec, "-o", str(uniform), "--force")
        merger("average", repo, *spec, "--method", "ema", "--decay", str(a.decay), "-o", str(ema), "--force")
        report = json.loads(merger("eval", f"{repo}@step{last}", str(uniform), str(ema), "--tasks",
                                   "merger_pydocs_ppl", "--output-dir", str(a.out / "eval" / run), *limit,
                                   "--json", capture=True))
        bpb = [m["scores"]["merger_pydocs_ppl"]["bits_per_byte"]["value"] for m in report["models"]]
        rows[run] = (repo, first, last, *bpb)

    steps = revisions(cache, RUNS["high"])
    every = steps[-1] - steps[-2]
    merger("sweep", RUNS["high"], "--revisions", f"step{steps[len(steps) // 2]}..step{steps[-1]}",
           "--every", str(every), "--window", str(a.window), "--methods", "uniform,ema", "--decay", str(a.decay),
           "--limit", "40", "--output-dir", str(a.out / "sweep"))  # 40 held-out documents per point: fast

    print(f"\nheld-out bits per byte (lower is better), average of the last {a.window} checkpoints:")
    print(f"{'run':<28} {'window':<18} {'last':>7} {'LAWA':>7} {'gain':>7} {'EMA':>7} {'gain':>7}")
    for repo, first, last, raw, uni, em in rows.values():
        window = f"step{first}..step{last}"
        print(f"{repo:<28} {window:<18} {raw:7.4f} {uni:7.4f} {raw - uni:+7.4f} {em:7.4f} {raw - em:+7.4f}")
    gain = {run: r[3] - r[4] for run, r in rows.items()}
    verdict = "larger" if gain["high"] > gain["low"] else "NOT larger"
    print(f"\nLAWA's gain at the high LR ({gain['high']:+.4f}) is {verdict} than at the low LR "
          f"({gain['low']:+.4f}).")
    print(f"The LAWA figure: {a.out / 'sweep' / 'sweep.png'}; merged models in {a.out / 'merged'}; "
          f"done in {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
