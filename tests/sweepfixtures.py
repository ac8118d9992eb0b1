"""A tiny real training trajectory in the offline HF cache, for ``merger sweep`` tests.

A GPT-NeoX of ``SHAPES["tiny"]`` (hidden 64, 2 layers, vocab 512, 128 positions, float32) with the
byte tokenizer, trained with AdamW at a high constant learning rate on the Python-docs train
split; every ``save_every`` steps the model is saved (``save_pretrained`` + byte tokenizer) and
published as revision ``step<N>`` of ``repo_id`` in ``$HF_HUB_CACHE``. A high LR makes consecutive
checkpoints noisy, which is where a LAWA average beats the latest checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from evalfixtures import save, tiny_neox

from merger.hubcache import write_cache_revision
from merger.textdata import split_docs
from merger.tokenizer import byte_tokenizer

REPO_ID = "local/tiny-sweep"


def train_trajectory(*, repo_id: str = REPO_ID, steps: int = 40, save_every: int = 5,
                     batch: int = 8, seq: int = 128, lr: float = 2e-2, seed: int = 0) -> list[str]:
    """Train, publishing ``step{save_every}`` .. ``step{steps}`` to the HF cache; returns the
    revision names."""
    model = tiny_neox(seed)
    train, _ = split_docs()
    ids = torch.tensor(byte_tokenizer()("\n\n".join(train.values()))["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(1, steps + 1):
            model.train()
            starts = torch.randint(0, len(ids) - seq, (batch,), generator=g)
            x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % save_every == 0:
                model.eval()
                folder = save(model, Path(tmp) / f"step{step}")
                write_cache_revision(os.environ["HF_HUB_CACHE"], repo_id, f"step{step}", folder,
                                     move=True)
                names.append(f"step{step}")
    return names
