"""Decay by merging, tested on a WSD run: does ``--method decay`` get what a real LR decay gets?

For each seed: train the demo's tiny Pythia (``train_tiny_pythia.py``: same model, data, AdamW)
with warmup then a constant LR (the "stable" phase of WSD), saving a checkpoint every ``--every``
steps as plain folders; at stable step T, fork the model and optimizer and train a real linear
decay to zero over D steps on the same batches (D = 20% of T + D). Then, on the held-out Python
docs (bits per byte, ``merger.eval.scoring.HeldoutScorer``, the metric of ``merger sweep``), compare at
equal compute T + D:

- the raw stable checkpoint at T + D, and the real decayed branch at T + D;
- merges of the stable checkpoints T, T + every, ..., T + D, run by ``merger.api.average``:
  uniform (LAWA), ``decay --shape linear``, ``decay --shape cosine``, ``decay --shape 1-sqrt``;
- EMA (b per checkpoint) over the stable checkpoints from the end of warmup to T + D.

Writes ``table.md``, ``results.json`` and ``wsd.png`` under ``--out`` (git-ignored ``demo/wsd``).
Two seeds: ~310 CPU-seconds (9 minutes on 2 shared, busy cores); a seed whose checkpoints are
there is not retrained (then ~30 s).

    python examples/wsd_decay.py                       # seeds 0 and 1 -> demo/wsd/
    python examples/wsd_decay.py --seeds 0 --branch 300 --decay-steps 80 --out demo/wsd-short
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_tiny_pythia.py

import torch  # noqa: E402
from train_tiny_pythia import TrainConfig, init_training, lr_at, train_step  # noqa: E402

from merger.api import average  # noqa: E402
from merger.plan.methods import Method  # noqa: E402
from merger.plan import Options  # noqa: E402
from merger.eval.scoring import HeldoutScorer  # noqa: E402
from merger.eval.state import read_state_dict  # noqa: E402
from merger.testing.tokenizer import byte_tokenizer  # noqa: E402

# what is compared at step T + D: label -> merger method (None: a trained checkpoint)
MERGES = {
    "LAWA (uniform)": Method("uniform"),
    "decay --shape linear": Method("decay", shape="linear"),
    "decay --shape cosine": Method("decay", shape="cosine"),
    "decay --shape 1-sqrt": Method("decay", shape="1-sqrt"),
}


@dataclass(frozen=True)
class WSD:
    """The schedule: warmup and peak LR from ``TrainConfig``; constant to T; the branch decays."""

    branch: int = 400      # T: the stable checkpoint the decay starts from
    decay_steps: int = 100  # D: linear decay to 0 over D steps (20% of T + D)
    every: int = 20        # checkpoint spacing (the merge window holds D / every + 1 checkpoints)
    ema: float = 0.8       # EMA decay per checkpoint (the demo's)
    lr: float = TrainConfig.lr

    @property
    def end(self) -> int:
        return self.branch + self.decay_steps

    def decay_lr(self, step: int) -> float:
        """Branch LR at ``step`` in [T, T + D): peak * (1 - (step - T) / D)."""
        return self.lr * (1 - (step - self.branch) / self.decay_steps)


def save(folder: Path, model: torch.nn.Module) -> None:
    model.save_pretrained(folder)
    tok = byte_tokenizer()
    tok.model_max_length = model.config.max_position_embeddings
    tok.save_pretrained(folder)


def train_seed(seed: int, wsd: WSD, out: Path, log) -> None:
    """Stable run to T + D (a checkpoint every ``wsd.every`` steps in ``out/stable``) and the decay
    branch forked at T (``out/decay``); skipped when ``out/train.json`` records the same run."""
    cfg = TrainConfig(lr=wsd.lr, steps=wsd.end, seed=seed)
    record = {"train": json.loads(json.dumps(asdict(cfg))), "wsd": asdict(wsd)}
    done = out / "train.json"
    if done.is_file() and json.loads(done.read_text()) == record:
        log(f"seed {seed}: reusing the checkpoints in {out}")
        return
    from transformers.utils import logging

    logging.disable_progress_bar()
    t0 = time.perf_counter()
    model, opt, data, gen = init_training(cfg)
    fork = None
    for step in range(wsd.end + 1):
        if step % wsd.every == 0 or step == wsd.end:
            save(out / "stable" / f"step{step}", model)
        if step == wsd.branch:  # model + optimizer state together, and the batch stream
            fork = copy.deepcopy((model, opt)), torch.Generator().set_state(gen.get_state())
        if step == wsd.end:
            break
        train_step(model, opt, data, gen, cfg, lr_at(step, cfg))
    log(f"seed {seed}: stable run to step {wsd.end} in {time.perf_counter() - t0:.0f}s")
    (model, opt), gen = fork
    for step in range(wsd.branch, wsd.end + 1):
        if step > wsd.branch and (step % wsd.every == 0 or step == wsd.end):
            save(out / "decay" / f"step{step}", model)
        if step == wsd.end:
            break
        train_step(model, opt, data, gen, cfg, wsd.decay_lr(step))
    log(f"seed {seed}: decay branch {wsd.branch}..{wsd.end} done, {time.perf_counter() - t0:.0f}s")
    done.write_text(json.dumps(record, indent=2) + "\n")


def evaluate_seed(seed: int, wsd: WSD, out: Path, limit: int | None, log) -> dict:
    """Merge with merger and score everything: {"stable": {step: bpb}, "decay": {...},
    "final": {label: bpb at T + D}, "weights": {label: [...]}}."""
    t0 = time.perf_counter()
    stable = out / "stable"
    scorer = HeldoutScorer(stable / f"step{wsd.end}", limit=limit, device="cpu")

    def bpb(folder: Path) -> float:
        return scorer.score(read_state_dict(folder))["bits_per_byte"]

    steps = sorted(int(p.name[4:]) for p in stable.glob("step*"))
    shown = [s for s in steps if s >= wsd.branch - wsd.decay_steps]  # the figure's stretch
    res: dict = {"stable": {s: bpb(stable / f"step{s}") for s in shown},
                 "final": {}, "weights": {}}
    res["decay"] = {int(p.name[4:]): bpb(p) for p in sorted((out / "decay").glob("step*"))}
    res["final"]["raw checkpoint T+D"] = res["stable"][wsd.end]
    res["final"]["real linear decay"] = res["decay"][wsd.end]
    runs = {label: (m, f"step{wsd.branch}..step{wsd.end}") for label, m in MERGES.items()}
    runs[f"EMA b={wsd.ema}"] = (Method("ema", decay=wsd.ema), f"step{TrainConfig.warmup}..step{wsd.end}")
    for label, (method, revisions) in runs.items():
        folder = out / "merged" / method.describe().replace("=", "-").replace("(", "-").strip(")")
        plan, _ = average([str(stable)], revisions=revisions, every=wsd.every, force=True,
                          options=Options(method=method), output=folder)
        res["final"][label] = bpb(folder)
        res["weights"][label] = [round(w, 4) for w in plan.weights]
    log(f"seed {seed}: {len(res['stable']) + len(res['decay']) + len(runs)} models scored in "
        f"{time.perf_counter() - t0:.0f}s")
    return res


def table(results: dict[int, dict], wsd: WSD) -> str:
    """Markdown: a row per model, bpb per seed, mean, and the gap to the real decay."""
    seeds = list(results)
    labels = list(results[seeds[0]]["final"])
    head = "| model at step T+D | " + " | ".join(f"seed {s}" for s in seeds) + \
        " | mean | - real decay | share of the decay's gain |"
    lines = [head, "|---" * (len(seeds) + 4) + "|"]
    mean = {k: statistics.fmean(results[s]["final"][k] for s in seeds) for k in labels}
    raw, real = mean["raw checkpoint T+D"], mean["real linear decay"]
    for k in labels:
        share = (raw - mean[k]) / (raw - real) if raw != real else float("nan")
        lines.append(f"| {k} | " + " | ".join(f"{results[s]['final'][k]:.4f}" for s in seeds)
                     + f" | {mean[k]:.4f} | {mean[k] - real:+.4f} | {share:.0%} |")
    n = wsd.decay_steps // wsd.every + 1
    lines.append(f"\nHeld-out bits per byte (lower is better). T = {wsd.branch}, D = {wsd.decay_steps}, "
                 f"merges over the {n} stable checkpoints step{wsd.branch}..step{wsd.end}; EMA over "
                 f"step{TrainConfig.warmup}..step{wsd.end}, every {wsd.every} steps.")
    return "\n".join(lines) + "\n"


def plot(results: dict[int, dict], wsd: WSD, path: Path) -> None:
    """bpb vs step: the stable run, the decay branch, and the merged models at T + D."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(results), 4.4), dpi=110)
    FigureCanvasAgg(fig)
    marks = {"LAWA (uniform)": ("s", "tab:blue"), "decay --shape linear": ("D", "tab:green"),
             "decay --shape cosine": ("v", "tab:olive"), "decay --shape 1-sqrt": ("P", "tab:cyan"),
             f"EMA b={wsd.ema}": ("^", "tab:orange")}
    for i, (seed, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        xs = list(r["stable"])
        ax.plot(xs, [r["stable"][s] for s in xs], "o-", color="tab:gray", ms=3, label="stable (constant LR)")
        ys = {wsd.branch: r["stable"][wsd.branch], **r["decay"]}
        ax.plot(list(ys), list(ys.values()), "o-", color="tab:red", ms=3, label="real linear decay")
        for j, (label, (m, c)) in enumerate(marks.items()):  # all at T + D, spread to be seen
            ax.plot([wsd.end + wsd.every * (0.2 + 0.15 * j)], [r["final"][label]], m, color=c, ms=6,
                    label=label + " (merge, at T+D)")
        ax.axvspan(wsd.branch, wsd.end, color="tab:green", alpha=0.06)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out bits per byte")
        ax.set_title(f"seed {seed}: WSD, decay from step {wsd.branch}")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--branch", type=int, default=WSD.branch, help="T: the step the decay starts from")
    ap.add_argument("--decay-steps", type=int, default=WSD.decay_steps, help="D: length of the decay")
    ap.add_argument("--every", type=int, default=WSD.every, help="checkpoint spacing")
    ap.add_argument("--limit", type=int, default=8, help="held-out passages, of 20 (default: 8)")
    ap.add_argument("--out", type=Path, default=Path("demo/wsd"))
    a = ap.parse_args(argv)
    wsd = WSD(branch=a.branch, decay_steps=a.decay_steps, every=a.every)
    if wsd.branch % wsd.every or wsd.decay_steps % wsd.every or wsd.branch - wsd.decay_steps < TrainConfig.warmup:
        ap.error(f"--branch and --decay-steps must be multiples of --every, and --branch after "
                 f"--branch - --decay-steps at or after the warmup ({TrainConfig.warmup} steps)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = {}
    for seed in a.seeds:
        out = a.out / f"seed{seed}"
        train_seed(seed, wsd, out, log)
        results[seed] = evaluate_seed(seed, wsd, out, a.limit, log)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps({"wsd": asdict(wsd), "seeds": results}, indent=2) + "\n")
    (a.out / "table.md").write_text(table(results, wsd))
    plot(results, wsd, a.out / "wsd.png")
    print(table(results, wsd))
    log(f"wrote {a.out}/table.md, results.json, wsd.png in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
