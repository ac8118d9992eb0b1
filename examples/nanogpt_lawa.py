"""LAWA on a nanoGPT run, with merger: ``ckpt_<step>.pt`` files in, averages and a sweep out.

A small nanoGPT-architecture model (``merger.testing.nanogpt``: nanoGPT's module names, tied
head) learns the train split of Python's docs (``merger.eval.textdata``, byte tokenizer) on CPU,
at a high constant learning rate after warmup. Every ``--save-every`` iterations it saves what
nanoGPT / the LAWA code save: ``ckpt_<step>.pt`` with the model, the AdamW state,
``model_args``, ``iter_num``, ``best_val_loss`` and ``config``. Then:

1. lawa.py's windows: blocks of 5 consecutive checkpoints (k = 5), each averaged by
   ``merger average RUN -r ckpt_A..ckpt_B --every S`` into a nanoGPT ``ckpt.pt`` (checked
   against lawa.py's way, ``torch.load`` of every file and a mean) and into a Hugging Face
   folder (``--to hf``), scored on held-out text against the block's last checkpoint;
2. ``merger sweep RUN -k 5 --tokenizer TOK`` on the ``.pt`` files themselves: the gain table
   and figure (raw vs the average of the 5 checkpoints ending at each step), each model scored as
   the GPT-2 that ``--to hf`` writes, converted in memory.

About 3 minutes on 2 CPU cores; everything goes under ``nanogpt-lawa/`` (git-ignored).

    python examples/nanogpt_lawa.py            # or: make nanogpt-lawa
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from merger.eval.textdata import split_docs  # noqa: E402
from merger.testing.nanogpt import GPT, GPTConfig, save_ckpt  # noqa: E402
from merger.testing.tokenizer import byte_tokenizer, save_byte_tokenizer  # noqa: E402

K = 5  # lawa.py: blocks of 5 checkpoints


def encode(docs: dict[str, str]) -> torch.Tensor:
    """Documents as one stream of the byte tokenizer's ids, each after ``<|endoftext|>``."""
    tok = byte_tokenizer()
    ids: list[int] = []
    for text in docs.values():
        ids.append(tok.eos_token_id)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int16)


def train(run: Path, *, steps: int, save_every: int, lr: float, seed: int = 0) -> None:
    """nanoGPT's loop, shrunk: AdamW (0.9, 0.95), warmup then constant LR, grad clip 1.0."""
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    model_args = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=257, bias=True, dropout=0.0)
    model = GPT(GPTConfig(**model_args))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    data = encode(split_docs()[0])
    gen = torch.Generator().manual_seed(seed + 1)
    config = {"learning_rate": lr, "max_iters": steps, "warmup_iters": 50, "batch_size": 16,
              "block_size": 128, "dataset": "pydocs", "compile": False}
    run.mkdir(parents=True, exist_ok=True)
    for it in range(1, steps + 1):
        starts = torch.randint(0, len(data) - 130, (16,), generator=gen).tolist()
        xy = torch.stack([data[s: s + 129] for s in starts]).long()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, it / 50)
        _, loss = model(xy[:, :-1].contiguous(), xy[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % save_every == 0:
            save_ckpt(run / f"ckpt_{it}.pt", model, opt, model_args, iter_num=it,
                      best_val_loss=float(loss.detach()), config=config)
            print(f"iter {it}: loss {loss.item():.3f}", file=sys.stderr)


def merger(*args: str) -> dict:
    """Run the real CLI; its --json result."""
    cmd = [sys.executable, "-m", "merger", *args, "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def to_hf(src: Path, dst: Path, *args: str) -> dict:
    res = merger("average", str(src), *args, "--to", "hf", "-o", str(dst), "--force")
    save_byte_tokenizer(dst)  # training checkpoints carry no tokenizer
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("nanogpt-lawa"))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--limit", type=int, default=40, help="held-out passages scored")
    a = ap.parse_args()
    run = a.out / "run"
    t0 = time.time()
    if not (run / f"ckpt_{a.steps}.pt").exists():
        train(run, steps=a.steps, save_every=a.save_every, lr=a.lr)
    t_train = time.time() - t0

    from merger.eval.scoring import HeldoutScorer
    from safetensors.torch import load_file

    steps = list(range(a.save_every, a.steps + 1, a.save_every))
    hf = a.out / "hf"
    for s in steps[K - 1::K]:  # each block's last checkpoint as a HF folder, for the table
        if not (hf / f"step{s}" / "config.json").exists():
            to_hf(run / f"ckpt_{s}.pt", hf / f"step{s}")
    scorer = HeldoutScorer(hf / f"step{steps[K - 1::K][-1]}", limit=a.limit)
    rows = []
    for i in range(0, len(steps) - K + 1, K):  # lawa.py: non-overlapping blocks of K
        lo, hi = steps[i], steps[i + K - 1]
        block = a.out / "blocks" / f"ckpt_{lo}-{hi}"
        res = merger("average", str(run), "-r", f"ckpt_{lo}..ckpt_{hi}", "--every", str(a.save_every),
                     "-o", str(block), "--force")
        ours = torch.load(block / "ckpt.pt", weights_only=True)["model"]
        sds = [torch.load(run / f"ckpt_{s}.pt", weights_only=True)["model"] for s in steps[i: i + K]]
        lawa = {k: sum(sd[k] for sd in sds) / K for k in sds[0]}  # lawa.py's way: load all, mean
        diff = max(float((ours[k] - lawa[k]).abs().max()) for k in lawa)
        to_hf(run, a.out / "blocks" / f"hf_{lo}-{hi}", "-r", f"ckpt_{lo}..ckpt_{hi}", "--every", str(a.save_every))
        avg_bpb = scorer.score(load_file(a.out / "blocks" / f"hf_{lo}-{hi}" / "model.safetensors"))["bits_per_byte"]
        last_bpb = scorer.score(load_file(hf / f"step{hi}" / "model.safetensors"))["bits_per_byte"]
        rows.append((lo, hi, last_bpb, avg_bpb, diff, res["result"]["read_bytes"],
                     sum((run / f"ckpt_{s}.pt").stat().st_size for s in steps[i: i + K])))
    print(f"\ntrained {len(steps)} checkpoints in {t_train:.0f} s\n")
    print("| block (k=5) | last ckpt bpb | LAWA avg bpb | gain | max |merger - lawa.py| | read / file bytes |")
    print("|---|---|---|---|---|---|")
    for lo, hi, last, avg, diff, rb, fb in rows:
        print(f"| ckpt_{lo}..{hi} | {last:.4f} | {avg:.4f} | {last - avg:+.4f} | {diff:.1e} | {rb / fb:.2f} |")
    sweep_dir = a.out / "sweep"
    save_byte_tokenizer(a.out / "tokenizer")  # the run's tokenizer: training checkpoints carry none
    subprocess.run([sys.executable, "-m", "merger", "sweep", str(run), "-k", str(K), "--limit", str(a.limit),
                    "--tokenizer", str(a.out / "tokenizer"), "-o", str(sweep_dir)], check=True)
    print(f"\nfigure: {sweep_dir / 'sweep.png'}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
