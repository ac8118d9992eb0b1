"""A minimal nanoGPT (karpathy/nanoGPT ``model.py``: same module names, tied head, bias option,
``GPTConfig``) and its training loop's ``torch.save``, for tests, the example and the bench.

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256))
    save_ckpt(path, model, optimizer, model_args, iter_num=100, best_val_loss=3.2, config={...})

``load_nanogpt(path)`` loads a ``ckpt.pt`` the way nanoGPT's training and sampling scripts resume:
``GPT(GPTConfig(**model_args))``, strip ``_orig_mod.``, ``load_state_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


def save_ckpt(path, model, optimizer, model_args: dict, *, iter_num: int, best_val_loss: float,
              config: dict, compiled: bool = False) -> None:
    """nanoGPT train.py's checkpoint; ``compiled`` adds torch.compile's ``_orig_mod.`` prefix."""
    sd = model.state_dict()
    if compiled:  # what raw_model.state_dict() of a torch.compile'd model holds
        sd = type(sd)((f"_orig_mod.{k}", v) for k, v in sd.items())
    torch.save({"model": sd, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(best_val_loss), "config": config}, path)


def load_nanogpt(path) -> GPT:
    """nanoGPT's resume: GPT(GPTConfig(**model_args)), strip ``_orig_mod.``, load_state_dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    sd = ckpt["model"]
    unwanted_prefix = "_orig_mod."
    for k in list(sd):
        if k.startswith(unwanted_prefix):
            sd[k[len(unwanted_prefix):]] = sd.pop(k)
    model.load_state_dict(sd)
    return model


def nanogpt_run(folder, args: dict, *, steps=(100, 200, 300, 400, 500), compiled: bool = False, seed: int = 0,
                name: str = "ckpt_{step}.pt", lr: float = 3e-3):
    """A nanoGPT-style run of ``GPT(GPTConfig(**args))``: AdamW on random tokens, two steps per 100
    iterations, a ``torch.save`` checkpoint at each of ``steps`` (multiples of 100). Returns ``folder``."""
    from pathlib import Path

    folder = Path(folder)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    model = GPT(GPTConfig(**args))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    config = {"out_dir": str(folder), "learning_rate": lr, "dataset": "pydocs", "compile": compiled}
    for it in range(1, steps[-1] // 100 * 2 + 1):
        x = torch.randint(0, args["vocab_size"], (4, args["block_size"]))
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if it % 2 == 0 and it // 2 * 100 in steps:
            step = it // 2 * 100
            save_ckpt(folder / name.format(step=step), model, opt, args, iter_num=step,
                      best_val_loss=float(loss.detach()), config=config, compiled=compiled)
    return folder
