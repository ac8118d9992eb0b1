"""Tiny GPT-NeoX models for the eval tests: one trained on the Python-docs train split, one random.

Both use the byte tokenizer (:mod:`merger.testing.tokenizer`, vocab 257) and ``SHAPES["tiny"]``'s
architecture (hidden 64, 2 layers, vocab 512, 128 positions) in float32, so lm-eval loads them
like any Hub model. Training 200 steps of 8 x 128 bytes takes a few seconds on one CPU thread
and brings held-out bits per byte from ~9 (random: 512-way uniform) to ~3.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from merger.testing.synth import SHAPES
from merger.eval.textdata import split_docs
from merger.testing.tokenizer import EOS, byte_tokenizer, save_byte_tokenizer


def tiny_neox(seed: int):
    """An untrained ``GPTNeoXForCausalLM`` of ``SHAPES["tiny"]`` (EOS: the tokenizer's)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    eos = byte_tokenizer().convert_tokens_to_ids(EOS)  # 256; the config must agree with it
    cfg = {**SHAPES["tiny"].config(torch.float32), "bos_token_id": eos, "eos_token_id": eos}
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(GPTNeoXConfig(**cfg))


def save(model, folder: Path) -> Path:
    """``save_pretrained`` + the byte tokenizer: a complete Hugging Face model folder."""
    model.save_pretrained(folder)
    save_byte_tokenizer(folder)
    return folder


def random_model(folder: Path, *, seed: int = 1) -> Path:
    """Write an untrained tiny model to ``folder``."""
    return save(tiny_neox(seed), folder)


def train(model, *, steps: int, batch: int = 8, seq: int = 128, lr: float = 5e-3, seed: int = 0,
          on_step: Callable[[int, object], None] | None = None):
    """AdamW at a constant ``lr`` on random windows of the train split; ``on_step(step, model)``
    after each step (1-based), in eval mode."""
    train_docs, _ = split_docs()
    ids = torch.tensor(byte_tokenizer()("\n\n".join(train_docs.values()))["input_ids"])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        model.train()
        starts = torch.randint(0, len(ids) - seq, (batch,), generator=g)
        x = torch.stack([ids[s:s + seq] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.eval()
        if on_step is not None:
            on_step(step, model)
    return model


def trained_model(folder: Path, *, steps: int = 200, batch: int = 8, seq: int = 128,
                  lr: float = 5e-3, seed: int = 0) -> Path:
    """Train a tiny model on random windows of the train split (AdamW, constant lr) and save it."""
    return save(train(tiny_neox(seed), steps=steps, batch=batch, seq=seq, lr=lr, seed=seed), folder)
