"""Bench row: LAWA over a 124M-shaped nanoGPT run of ``ckpt_<step>.pt`` files with AdamW state.

Writes N synthetic checkpoints shaped like nanoGPT's GPT-2 small (n_layer 12, n_head 12, n_embd
768, block 1024, vocab 50304, tied head; fp32 as nanoGPT saves: 124M parameters, 0.50 GB of
model and 1.0 GB of AdamW moments per file), then times, each in a fresh process with warm page
cache (best of ``--repeat`` interleaved runs for the floor and merger; the machine may be shared):

- ``merger``: ``merger average RUN -o OUT`` (nanoGPT ``ckpt.pt`` output);
- ``lawa.py``: what the LAWA code does: ``torch.load`` every file (optimizer included) and a
  running mean of the models in float32, then ``torch.save``;
- ``floor``: ``pread`` of the model's byte ranges only (the I/O floor of the model bytes).

Peak RSS is each process's ``ru_maxrss``.

    python bench/nanogpt.py --files 9 --dir bench/out/nanogpt       # ~14 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, bias=True, dropout=0.0)


def shapes(a: dict) -> dict[str, tuple[int, ...]]:
    """nanoGPT's state dict names and shapes (``lm_head.weight`` is tied to ``wte``)."""
    C, out = a["n_embd"], {"transformer.wte.weight": (a["vocab_size"], a["n_embd"]),
                           "transformer.wpe.weight": (a["block_size"], a["n_embd"])}
    for i in range(a["n_layer"]):
        p = f"transformer.h.{i}."
        out.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "attn.c_attn.weight": (3 * C, C),
                    p + "attn.c_attn.bias": (3 * C,), p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                    p + "ln_2.weight": (C,), p + "ln_2.bias": (C,), p + "mlp.c_fc.weight": (4 * C, C),
                    p + "mlp.c_fc.bias": (4 * C,), p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,)})
    out.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return out


def make(folder: Path, n: int) -> list[Path]:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = folder / f"ckpt_{(i + 1) * 1000}.pt"
        files.append(f)
        if f.exists():
            continue
        g = torch.Generator().manual_seed(i)
        model = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes(SHAPE).items()}
        model["lm_head.weight"] = model["transformer.wte.weight"]  # tied, as nanoGPT
        params = [v for k, v in model.items() if k != "lm_head.weight"]
        state = {j: {"step": torch.tensor(float((i + 1) * 1000)), "exp_avg": torch.randn(p.shape, generator=g) * 1e-3,
                     "exp_avg_sq": torch.rand(p.shape, generator=g) * 1e-6} for j, p in enumerate(params)}
        opt = {"state": state, "param_groups": [{"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                                                 "amsgrad": False, "params": list(range(len(params)))}]}
        torch.save({"model": model, "optimizer": opt, "model_args": SHAPE, "iter_num": (i + 1) * 1000,
                    "best_val_loss": torch.tensor(3.0), "config": {"learning_rate": 6e-4}}, f)
        del model, state, opt
    return files


NAIVE = """
import resource, sys, time, torch
t0 = time.perf_counter()
files = sys.argv[2:]
acc = None
for f in files:
    sd = torch.load(f, map_location="cpu")["model"]   # the whole file: optimizer included
    if acc is None:
        acc = {k: v.clone() for k, v in sd.items()}
    else:
        for k, v in sd.items():
            acc[k] += v
    del sd
torch.save({k: v / len(files) for k, v in acc.items()}, sys.argv[1])
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

FLOOR = """
import os, resource, sys, time
from merger.formats.torch_pt import read
files = sys.argv[1:]
exts = [e for f in files for t in read(f).values() for e in t.extents]
t0 = time.perf_counter()
buf = bytearray(64 << 20)
total = 0
fds = {f: os.open(f, os.O_RDONLY) for f in files}
for e in exts:
    done = 0
    while done < e.nbytes:
        k = os.preadv(fds[e.path], [memoryview(buf)[: min(len(buf), e.nbytes - done)]], e.offset + done)
        done += k
    total += e.nbytes
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total)
"""


def run(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=9)
    ap.add_argument("--dir", type=Path, default=Path("bench/out/nanogpt"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the floor and of merger (best kept)")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    need = a.files * 1.5e9 + 1e9
    free = shutil.disk_usage(a.dir.parent if a.dir.parent.exists() else ".").free
    if free < need:
        sys.exit(f"needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free: use fewer --files")
    if a.make_only:
        make(a.dir / "run", a.files)
        return
    t0 = time.perf_counter()
    py = sys.executable
    # in a child: this process stays small, so the children below don't inherit its peak RSS
    run([py, __file__, "--make-only", "--files", str(a.files), "--dir", str(a.dir)])
    files = [a.dir / "run" / f"ckpt_{(i + 1) * 1000}.pt" for i in range(a.files)]
    print(f"made {len(files)} files ({sum(f.stat().st_size for f in files) / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows: dict[str, tuple[float, float, float]] = {}
    out = a.dir / "avg"

    def keep_best(name: str, row: tuple[float, float, float]) -> None:
        if name not in rows or row[0] < rows[name][0]:
            rows[name] = row

    run([py, "-c", FLOOR, *map(str, files)])  # warm the page cache
    for _ in range(a.repeat):  # interleaved, best of each: the machine is shared
        s_, rss, nbytes = map(float, run([py, "-c", FLOOR, *map(str, files)]).split())
        keep_best("floor (pread of the model bytes)", (s_, rss, nbytes))
        for to, name in (("nanogpt", "merger average (nanogpt ckpt.pt out)"),
                         ("safetensors", "merger average --to safetensors (no conversion)")):
            shutil.rmtree(out, ignore_errors=True)
            res = json.loads(run([py, "-m", "merger", "average", str(a.dir / "run"), "-o", str(out), "--to", to,
                                  "--json"]))["result"]
            keep_best(name, (res["seconds"], res["peak_rss"], res["read_bytes"]))
            print(f"{name}: {res['seconds']:.2f} s, timings {res['timings']}", file=sys.stderr)
    floor_s = rows["floor (pread of the model bytes)"][0]
    t, rss = map(float, run([py, "-c", NAIVE, str(a.dir / "naive.pt"), *map(str, files)]).split())
    rows["lawa.py way (torch.load all + mean)"] = (t, rss, sum(f.stat().st_size for f in files))
    print(f"\n{len(files)} x nanoGPT 124M ckpt_<step>.pt (fp32 model + AdamW), warm page cache, "
          f"{os.cpu_count()} cores\n")
    print("| method | seconds | x floor | bytes read | peak RSS |")
    print("|---|---|---|---|---|")
    for k, (s, r, b) in rows.items():
        print(f"| {k} | {s:.2f} | {s / floor_s:.2f} | {b / 1e9:.2f} GB | {r / 1e9:.2f} GB |")
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
