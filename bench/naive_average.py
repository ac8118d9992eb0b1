"""The naive checkpoint average, as fairseq's ``scripts/average_checkpoints.py`` does it: the peer
baseline for the benchmarks and the reference the streaming result is checked against.

Each checkpoint's whole state dict is loaded into memory (``safetensors.torch.load_file`` or
``torch.load``), floating tensors are summed into full-size accumulators (float64 by default, the
reference; ``--accumulate float32`` is fairseq's own choice for fp16), divided by n and cast back
to the input dtype; non-floating tensors are taken from the last checkpoint (fairseq integer-divides
their sum, which is the same thing for identical buffers). ``config.json`` is copied from the last
checkpoint. The output is one ``model.safetensors``.

    python bench/naive_average.py OUT CKPT_DIR [CKPT_DIR ...]            # fairseq: one loaded at a time
    python bench/naive_average.py OUT CKPT_DIR ... --hold-all            # load all, then sum

Memory: accumulators (8 bytes/param in float64) + one state dict; with ``--hold-all``, every
state dict at once.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one checkpoint folder (single file or shards + index), fully in memory."""
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = folder / f"{stem}.{ext}.index.json"
        files = ([folder / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
                 if index.is_file() else [folder / f"{stem}.{ext}"])
        if all(f.is_file() for f in files):
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(load_file(str(f)) if ext == "safetensors"
                          else torch.load(f, map_location="cpu", weights_only=True))
            return sd
    raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin (or index) in {folder}")


def average(folders: list[Path], *, accumulate: torch.dtype = torch.float64,
            hold_all: bool = False) -> dict[str, torch.Tensor]:
    """Uniform average of the checkpoints in ``folders`` (oldest first)."""
    n = len(folders)
    acc: dict[str, torch.Tensor] = {}
    last: dict[str, torch.Tensor] = {}
    sds = [load_state_dict(f) for f in folders] if hold_all else None
    for i, folder in enumerate(folders):
        sd = sds[i] if sds is not None else load_state_dict(folder)
        for name, t in sd.items():
            if t.is_floating_point():
                if name in acc:
                    acc[name] += t.to(accumulate)
                else:
                    acc[name] = t.to(accumulate, copy=True)
        last = sd
    out = {}
    for name, t in last.items():
        out[name] = (acc[name] / n).to(t.dtype) if name in acc else t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint folders, oldest first")
    ap.add_argument("--accumulate", default="float64", choices=["float32", "float64"])
    ap.add_argument("--hold-all", action="store_true", help="load every state dict before summing")
    a = ap.parse_args()
    sd = average(a.checkpoints, accumulate=getattr(torch, a.accumulate), hold_all=a.hold_all)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(a.out / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = a.checkpoints[-1] / "config.json"
    if cfg.is_file():
        shutil.copyfile(cfg, a.out / "config.json")


if __name__ == "__main__":
    main()
