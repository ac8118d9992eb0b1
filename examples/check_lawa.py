"""Evidence for the demo: last checkpoint vs uniform average (LAWA) vs EMA, on held-out text.

Reads the trajectories that ``train_tiny_pythia.py`` published into the hub cache, averages the
latest ``K`` checkpoints of a window in float64 entirely in memory (no merger code involved: an
independent reference for ``merger average``), and prints held-out bits per byte of Python's
docs (the held-out split of ``merger.eval.textdata``; lower is better).

    python examples/check_lawa.py                                   # both demo runs
    python examples/check_lawa.py --window 800:5 --window 600:5 --ema-decay 0.8
    python examples/check_lawa.py --repo local/tiny-pythia-s1 --repo local/tiny-pythia-lowlr-s1
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_tiny_pythia.py

import torch  # noqa: E402

from merger.testing.hubcache import repo_folder_name
from merger.eval.textdata import split_docs
from merger.testing.tokenizer import byte_tokenizer

DEFAULT_REPOS = ["local/tiny-pythia", "local/tiny-pythia-lowlr"]


def revisions(cache_dir: Path, repo_id: str) -> dict[int, Path]:
    """step -> snapshot folder for every ``refs/stepN`` of ``repo_id`` in the cache, by step."""
    repo = cache_dir / repo_folder_name(repo_id)
    out = {}
    for ref in (repo / "refs").glob("step*"):
        if m := re.fullmatch(r"step(\d+)", ref.name):
            out[int(m.group(1))] = repo / "snapshots" / ref.read_text().strip()
    if not out:
        sys.exit(f"Error: no stepN revisions of {repo_id} in {cache_dir}.\n"
                 f"Hint: run examples/train_tiny_pythia.py first.")
    return dict(sorted(out.items()))


def heldout_ids(max_bytes: int | None = None) -> torch.Tensor:
    """The held-out split as one stream of token ids: per document ``<|endoftext|>`` (256), then
    the tokenizer's ids of its bytes (one per byte, but not equal to the byte values)."""
    tok = byte_tokenizer()
    ids: list[int] = []
    for text in split_docs()[1].values():
        ids.append(tok.eos_token_id)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
    ids = ids[:max_bytes] if max_bytes else ids
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, ids: torch.Tensor, *, seq_len: int, eos: int = 256,
                  batch_size: int = 64) -> float:
    """Held-out bits per byte: windows of ``seq_len`` tokens overlapping by one, so every token
    but the first is predicted once; ``<|endoftext|>`` targets are not counted."""
    model.eval()
    stride = seq_len - 1
    n_win = (len(ids) - 2) // stride + 1
    pad = n_win * stride + 1 - len(ids)
    ids = torch.cat([ids, torch.full((max(pad, 0),), -100, dtype=ids.dtype)])
    windows = ids.unfold(0, seq_len, stride)[:n_win] if n_win * stride + 1 >= seq_len else ids[None]
    nll, count = 0.0, 0
    for chunk in windows.split(batch_size):
        inputs = chunk.clamp(min=0)
        logits = model(input_ids=inputs).logits[:, :-1].double()  # (B, T-1, vocab)
        target = chunk[:, 1:]
        keep = (target >= 0) & (target != eos)
        logp = torch.log_softmax(logits, dim=-1)
        nll -= logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].sum().item()
        count += int(keep.sum())
    return nll / count / math.log(2)


def weights(method: str, n: int, *, decay: float = 0.8) -> list[float]:
    """merger's weight vectors over ``n`` checkpoints, oldest first (see README.md, "Methods")."""
    if method == "uniform":
        return [1.0 / n] * n
    if method == "ema":  # e_1 = x_1, e_i = b e_{i-1} + (1-b) x_i
        return [decay ** (n - 1)] + [(1 - decay) * decay ** (n - i) for i in range(2, n + 1)]
    raise ValueError(method)


def average(state_dicts: list[dict[str, torch.Tensor]], w: list[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i x_i in float64 for floating tensors; others taken from the latest checkpoint."""
    out = {}
    for name, last in state_dicts[-1].items():
        if last.is_floating_point():
            acc = torch.zeros(last.shape, dtype=torch.float64)
            for wi, sd in zip(w, state_dicts):
                acc += wi * sd[name].double()
            out[name] = acc.float()
        else:
            out[name] = last
    return out


def load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", action="append", help="repeatable (default: the two demo runs)")
    ap.add_argument("--window", action="append",
                    help="END:K, the K latest saved checkpoints up to step END (repeatable; "
                         "default: the last step with K = 5 and 10, two thirds of the way with K = 5)")
    ap.add_argument("--ema-decay", type=float, default=0.8, help="EMA decay per checkpoint")
    ap.add_argument("--max-bytes", type=int, default=None, help="evaluate on a prefix (quicker)")
    ap.add_argument("--cache-dir", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.cache_dir is None:
        from huggingface_hub import constants

        a.cache_dir = Path(constants.HF_HUB_CACHE)
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(2)
    ids = heldout_ids(max_bytes=a.max_bytes)
    print(f"held-out: {len(ids)} bytes of Python docs; bits per byte, lower is better; "
          f"EMA decay {a.ema_decay} per checkpoint; best = best single checkpoint of the window")
    print(f"{'repo':<26} {'window':<16} {'K':>3} {'last':>7} {'best':>7} {'uniform':>8} {'ema':>7} "
          f"{'d_unif':>7} {'d_ema':>7}")
    for repo_id in a.repo or DEFAULT_REPOS:
        revs = revisions(a.cache_dir, repo_id)
        steps = list(revs)
        mid = steps[(2 * len(steps)) // 3]
        specs = a.window or [f"{steps[-1]}:5", f"{steps[-1]}:10", f"{mid}:5"]
        state_dicts: dict[int, dict[str, torch.Tensor]] = {}
        single: dict[int, float] = {}  # step -> bits per byte of that checkpoint alone
        model = None
        for spec in specs:
            end, k = (int(x) for x in spec.split(":"))
            window = [s for s in steps if s <= end][-k:]
            for s in window:
                if s not in state_dicts:
                    m = load(revs[s])
                    state_dicts[s] = {n: t.clone() for n, t in m.state_dict().items()}
                    model = model or m
            seq_len = model.config.max_position_embeddings
            for s in window:
                if s not in single:
                    model.load_state_dict(state_dicts[s])
                    single[s] = bits_per_byte(model, ids, seq_len=seq_len)
            sds = [state_dicts[s] for s in window]
            row = {"last": single[window[-1]], "best": min(single[s] for s in window)}
            for name in ("uniform", "ema"):
                model.load_state_dict(average(sds, weights(name, len(sds), decay=a.ema_decay)))
                row[name] = bits_per_byte(model, ids, seq_len=seq_len)
            print(f"{repo_id:<26} {f'step{window[0]}..{window[-1]}':<16} {len(window):>3} "
                  f"{row['last']:7.4f} {row['best']:7.4f} {row['uniform']:8.4f} {row['ema']:7.4f} "
                  f"{row['uniform'] - row['last']:+7.4f} {row['ema'] - row['last']:+7.4f}",
                  flush=True)


if __name__ == "__main__":
    main()
