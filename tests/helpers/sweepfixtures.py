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

from helpers.evalfixtures import save, tiny_neox, train

from merger.testing.hubcache import write_cache_revision

REPO_ID = "local/tiny-sweep"


def train_trajectory(*, repo_id: str = REPO_ID, steps: int = 40, save_every: int = 5,
                     batch: int = 8, seq: int = 128, lr: float = 2e-2, seed: int = 0) -> list[str]:
    """Train, publishing ``step{save_every}`` .. ``step{steps}`` to the HF cache; returns the
    revision names."""
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        def publish(step, model):
            if step % save_every == 0:
                folder = save(model, Path(tmp) / f"step{step}")
                write_cache_revision(os.environ["HF_HUB_CACHE"], repo_id, f"step{step}", folder, move=True)
                names.append(f"step{step}")

        train(tiny_neox(seed), steps=steps, batch=batch, seq=seq, lr=lr, seed=seed, on_step=publish)
    return names
