"""Warmstarting a wider model (Mallik et al. 2024) on this CPU: grow a trained tiny Pythia with
``merger grow`` and keep training it, against the same wider model trained from scratch.

Per seed: train the tiny Pythia-architecture model of the demo (examples/train_tiny_pythia.py's
model and loop) at width d, grow it to 2d with merger grow, and train the grown model at the same
learning rate, schedule and batches as a 2d model trained from scratch ("cold"). Variants show
what each part does: the default (λ, σ, μP), a plain zero-pad (σ 0), no shrink (λ 1), and a 4x
growth (from d/2 to the same 2d target). Writes demo/warmstart/{results.json,table.md,loss.png}.

    python examples/warmstart.py                 # 2 seeds, ~8 min on 2 cores (make warmstart)
    python examples/warmstart.py --seeds 0 --steps 100 --small-steps 100    # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_tiny_pythia.py

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_pythia import TrainConfig, encode_docs, model_config, train  # noqa: E402

from merger.grow import GrowOptions, grow  # noqa: E402
from merger.grow.run import DEFAULT_INIT, DEFAULT_PERTURB, DEFAULT_SHRINK  # noqa: E402
from merger.eval.textdata import split_docs  # noqa: E402
from merger.testing.tokenizer import byte_tokenizer  # noqa: E402

OUT = Path("demo/warmstart")
D = 64  # the small width; the target is 2D = 128 (head dim 32 throughout: 2, 4 and 1 heads)
BASE = TrainConfig(lr=3e-3, warmup=20, batch_size=16, seq_len=64, hidden=2 * D, layers=2, heads=4)


def variants(width: float = 2.0) -> dict[str, tuple[int, GrowOptions]]:
    """name -> (small width, grow options); all grow to 2D."""
    lam, sig = DEFAULT_SHRINK, DEFAULT_PERTURB
    return {
        f"warm λ{lam:g} σ{sig:g}": (D, GrowOptions(width=2, shrink=lam, perturb=sig, init=DEFAULT_INIT)),
        f"zero-pad λ{lam:g} σ0": (D, GrowOptions(width=2, shrink=lam, perturb=0.0, init=DEFAULT_INIT)),
        f"no shrink λ1 σ{sig:g}": (D, GrowOptions(width=2, shrink=1.0, perturb=sig, init=DEFAULT_INIT)),
        f"4x growth λ{lam:g} σ{sig:g}": (D // 2, GrowOptions(width=4, shrink=lam, perturb=sig, init=DEFAULT_INIT)),
    }


class Heldout:
    """Mean next-token loss on fixed windows of the held-out split (the same for every model)."""

    def __init__(self, seq_len: int, windows: int):
        data = encode_docs(split_docs()[1]).long()
        self.batch = data[: windows * seq_len].view(windows, seq_len)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> float:
        model.eval()
        loss = model(input_ids=self.batch, labels=self.batch).loss.item()
        model.train()
        return loss


def run(cfg: TrainConfig, heldout: Heldout, model: torch.nn.Module | None = None, save: Path | None = None
        ) -> tuple[list[int], list[float], float]:
    """Train; held-out loss at every ``cfg.save_every`` steps (step 0 included); wall seconds."""
    steps, losses = [], []
    t0 = time.perf_counter()

    def on_save(step: int, m: torch.nn.Module, state: dict) -> None:
        steps.append(step)
        losses.append(heldout(m))
        if save is not None and step == cfg.steps:  # with the tokenizer: grown models then run `merger eval`
            m.save_pretrained(save)
            byte_tokenizer().save_pretrained(save)

    train(cfg, on_save, model)
    return steps, losses, time.perf_counter() - t0


def steps_to(target: float, steps: list[int], losses: list[float]) -> int | None:
    """The first evaluated step whose held-out loss is at or below ``target`` (None: never)."""
    return next((s for s, x in zip(steps, losses) if x <= target), None)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    ap.add_argument("--steps", type=int, default=400, help="steps of each 2d run (cold and warm)")
    ap.add_argument("--small-steps", type=int, default=400, help="steps of each small run")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--windows", type=int, default=64, help="held-out windows of 64 bytes")
    ap.add_argument("--only", help="comma-separated variant names to run (default: all)")
    ap.add_argument("--report-only", action="store_true", help="rebuild table.md and loss.png from results.json")
    a = ap.parse_args(argv)
    if a.report_only:
        report(json.loads((OUT / "results.json").read_text()))
        return
    from transformers import GPTNeoXForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    OUT.mkdir(parents=True, exist_ok=True)
    heldout = Heldout(BASE.seq_len, a.windows)
    big = replace(BASE, steps=a.steps, save_every=a.eval_every)
    chosen = {k: v for k, v in variants().items() if not a.only or k in a.only.split(",")}
    params = {d: sum(p.numel() for p in GPTNeoXForCausalLM(model_config(replace(big, hidden=d, heads=d // 32)))
                     .parameters()) for d in (D // 2, D, 2 * D)}
    results: dict = {"config": {"target": json.loads(json.dumps(big.__dict__)), "small_steps": a.small_steps,
                                "small_width": D}, "params": params, "seeds": {}}
    t_all = time.perf_counter()
    for seed in [int(s) for s in a.seeds.split(",")]:
        r: dict = {}
        cold = run(replace(big, seed=seed), heldout)
        r["cold"] = {"steps": cold[0], "loss": cold[1], "seconds": cold[2]}
        print(f"seed {seed} cold: final {cold[1][-1]:.4f} ({cold[2]:.0f} s)", file=sys.stderr)
        smalls: dict[int, Path] = {}
        for name, (d, opts) in chosen.items():
            if d not in smalls:
                cfg = replace(big, hidden=d, heads=d // 32, steps=a.small_steps, save_every=a.small_steps, seed=seed)
                smalls[d] = OUT / f"small-d{d}-seed{seed}"
                s = run(cfg, heldout, save=smalls[d])
                r[f"small d{d}"] = {"steps": s[0], "loss": s[1], "seconds": s[2]}
                print(f"seed {seed} small d{d}: final {s[1][-1]:.4f} ({s[2]:.0f} s)", file=sys.stderr)
            folder = OUT / f"grown-{name.split()[0]}-{d}-seed{seed}"
            grow(str(smalls[d]), output=folder, options=replace(opts, seed=seed), force=True)
            model = GPTNeoXForCausalLM.from_pretrained(folder)
            w = run(replace(big, seed=seed), heldout, model=model)
            r[name] = {"steps": w[0], "loss": w[1], "seconds": w[2], "small": f"small d{d}", "small_width": d}
            print(f"seed {seed} {name}: step0 {w[1][0]:.4f} final {w[1][-1]:.4f} ({w[2]:.0f} s)", file=sys.stderr)
        results["seeds"][seed] = r
    results["seconds"] = time.perf_counter() - t_all
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report(results)
    print(f"wrote {OUT}/results.json, table.md, loss.png in {results['seconds']:.0f} s", file=sys.stderr)


def report(results: dict) -> None:
    table = make_table(results)
    (OUT / "table.md").write_text(table + "\n")
    plot(results, OUT / "loss.png")
    print(table)


def make_table(results: dict) -> str:
    """Per variant, mean over seeds (and each seed): held-out loss at step 0, at the cold run's
    halfway and final step, and the steps to reach the cold run's final loss."""
    seeds = list(results["seeds"].values())
    names = [k for k in seeds[0] if not k.startswith("small")]
    n = len(seeds[0]["cold"]["steps"])
    mid, last = seeds[0]["cold"]["steps"][n // 2], seeds[0]["cold"]["steps"][-1]
    small_steps = results["config"]["small_steps"]
    params = {int(k): v for k, v in results["params"].items()}
    big = params[2 * results["config"]["small_width"]]
    lines = [f"| run | loss @0 | loss @{mid} | loss @{last} | steps to cold's final loss (per seed) "
             "| + small run, in 2d steps (6ND) |", "|---|---|---|---|---|---|"]
    for k in names:
        rows = [s[k] for s in seeds]
        at = [sum(r["loss"][i] for r in rows) / len(rows) for i in (0, n // 2, n - 1)]
        reach = [steps_to(s["cold"]["loss"][-1], r["steps"], r["loss"]) for s, r in zip(seeds, rows)]
        cells = ", ".join("never" if x is None else str(x) for x in reach)
        extra = small_steps * params[rows[0]["small_width"]] / big if "small_width" in rows[0] else 0
        total = ", ".join("-" if x is None else f"{x + extra:.0f}" for x in reach)
        lines.append(f"| {k} | {at[0]:.3f} | {at[1]:.3f} | {at[2]:.3f} | {cells} | {total} |")
    for k in [k for k in seeds[0] if k.startswith("small")]:
        fin = sum(s[k]["loss"][-1] for s in seeds) / len(seeds)
        sec = sum(s[k]["seconds"] for s in seeds) / len(seeds)
        lines.append(f"| ({k}, {seeds[0][k]['steps'][-1]} steps, {sec:.0f} s) | | | {fin:.3f} | | |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    seeds = list(results["seeds"].values())
    for i, k in enumerate(k for k in seeds[0] if not k.startswith("small")):
        for j, s in enumerate(seeds):
            ax.plot(s[k]["steps"], s[k]["loss"], color=f"C{i}", alpha=0.9 if j == 0 else 0.45,
                    ls="-" if j == 0 else "--", label=k if j == 0 else None)
    ax.set_xlabel("optimizer step of the 2d model")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.set_title("tiny Pythia at width 128: merger grow from width 64 (4x: from 32) vs cold start\n"
                 "(solid: first seed, dashed: second)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
