"""Train the demo trajectory: a tiny Pythia on Python's own docs, on CPU, saved as Hub revisions.

A GPT-NeoX model shaped like Pythia (rotary on 25% of each head, parallel residual, untied
embeddings) with the byte tokenizer learns the train split of ``merger.eval.textdata``. Every
``--save-every`` steps the weights (safetensors), config and tokenizer are published as revision
``stepN`` of ``--repo-id`` in a Hugging Face hub cache, so merger reads the run exactly as it
reads ``EleutherAI/pythia-70m`` from the Hub (``HF_HUB_OFFLINE=1``).

Two runs make the LAWA paper's point: ``local/tiny-pythia`` at a high constant learning rate
(after warmup) and the control ``local/tiny-pythia-lowlr`` at a low one. Averaging the latest
checkpoints of the high-LR run beats its latest checkpoint on held-out text (by ~0.12 bits per
byte); on the low-LR run, still descending fast, it does not help. Both runs take 3-4 minutes on
2 CPU cores (examples/README.md has the numbers); a finished trajectory in the cache is reused.

    python examples/train_tiny_pythia.py                       # both runs
    python examples/train_tiny_pythia.py --run high --seed 1 --repo-id local/tiny-pythia-s1
    python examples/check_lawa.py                              # last vs average vs EMA
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads make a
# step 3-7x slower whenever another process runs. Must be set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from merger.testing.hubcache import repo_folder_name, write_cache_revision
from merger.eval.textdata import split_docs
from merger.testing.tokenizer import byte_tokenizer

# The two runs of the demo. Only the learning rate differs (and the repo it is published as).
RUNS = {"high": ("local/tiny-pythia", 6e-3), "low": ("local/tiny-pythia-lowlr", 3e-4)}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that fixes a trajectory; stored in each revision's ``trainer_state.json``."""

    lr: float = RUNS["high"][1]
    steps: int = 800             # optimizer steps, 16 x 128 = 2048 bytes each (~5 epochs of train)
    save_every: int = 40         # a revision every this many steps, step0 included: 21 revisions
    warmup: int = 100            # linear warmup, then constant (a WSD "stable" phase, no decay)
    batch_size: int = 16         # sequences per step
    seq_len: int = 128           # bytes per sequence; also max_position_embeddings
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dtype: str = "float32"       # dtype of the saved weights (training is always float32)
    seed: int = 0

    def saved_steps(self) -> list[int]:
        """The steps published as revisions: 0, save_every, ..., and ``steps`` itself."""
        out = list(range(0, self.steps + 1, self.save_every))
        return out if out[-1] == self.steps else out + [self.steps]


def model_config(cfg: TrainConfig):
    """A Pythia-style GPTNeoXConfig for the byte tokenizer (vocab 257, EOS id 256)."""
    from transformers import GPTNeoXConfig

    eos = byte_tokenizer().eos_token_id
    return GPTNeoXConfig(
        vocab_size=eos + 1, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=4 * cfg.hidden,
        max_position_embeddings=cfg.seq_len,  # lm-eval reads its context length from here
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
        tie_word_embeddings=False, hidden_act="gelu", layer_norm_eps=1e-5,
        hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.02,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        architectures=["GPTNeoXForCausalLM"],
    )


def encode_docs(docs: dict[str, str]) -> torch.Tensor:
    """Documents as one stream of token ids, each document preceded by ``<|endoftext|>``.

    Ids come from the tokenizer itself, not from raw byte values: the byte-level vocabulary is
    ordered by GPT-2's byte-to-unicode alphabet, so byte ``b`` is generally not id ``b``, and
    lm-eval will tokenize with the saved tokenizer.
    """
    tok = byte_tokenizer()
    ids: list[int] = []
    for text in docs.values():
        ids.append(tok.eos_token_id)
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.int16)  # int16: id 256 does not fit a byte


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``cfg.warmup`` steps, then constant."""
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup)


def init_training(cfg: TrainConfig, model: torch.nn.Module | None = None
                  ) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Generator]:
    """The seeded model (or ``model``, e.g. a grown one), its AdamW, the train split as token ids,
    and the batch generator (the batches are the same whether or not ``model`` is given:
    examples/warmstart.py relies on it)."""
    from transformers import GPTNeoXForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(cfg.seed)
    model = (model or GPTNeoXForCausalLM(model_config(cfg))).float().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    data = encode_docs(split_docs()[0])  # the train split
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    return model, opt, data, gen


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor,
               gen: torch.Generator, cfg: TrainConfig, lr: float) -> float:
    """One optimizer step at learning rate ``lr`` on a fresh random batch; returns the loss."""
    # (batch, seq_len + 1) random windows of the stream; the model shifts labels itself
    starts = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
    batch = torch.stack([data[s: s + cfg.seq_len] for s in starts.tolist()]).long()
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def train(cfg: TrainConfig, on_save: Callable[[int, torch.nn.Module, dict], None],
          model: torch.nn.Module | None = None) -> None:
    """Train ``model`` (default: a fresh one from ``cfg``, from scratch); call
    ``on_save(step, model, state)`` at every step of ``saved_steps()``.

    Deterministic for a given ``cfg`` on a given machine: one seed fixes the init and the batches.
    """
    model, opt, data, gen = init_training(cfg, model)
    saved = set(cfg.saved_steps())
    losses: list[float] = []
    for step in range(cfg.steps + 1):
        if step in saved:
            state = {"global_step": step, "lr": lr_at(min(step, cfg.steps - 1), cfg),
                     "train_loss": sum(losses) / len(losses) if losses else None}
            on_save(step, model, state)
            losses = []
        if step == cfg.steps:
            break
        losses.append(train_step(model, opt, data, gen, cfg, lr_at(step, cfg)))


def published(cache_dir: Path, repo_id: str) -> tuple[list[int], dict | None]:
    """The steps of ``repo_id`` already in the cache, and the training config its latest records."""
    repo = cache_dir / repo_folder_name(repo_id)
    steps = sorted(int(p.name[4:]) for p in (repo / "refs").glob("step*") if p.name[4:].isdigit())
    if not steps:
        return [], None
    commit = (repo / "refs" / f"step{steps[-1]}").read_text().strip()
    state = repo / "snapshots" / commit / "trainer_state.json"
    return steps, json.loads(state.read_text()).get("config") if state.is_file() else None


def publish_run(cfg: TrainConfig, repo_id: str, cache_dir: Path) -> None:
    """Train ``cfg`` and publish each checkpoint as ``stepN`` of ``repo_id``.

    A finished trajectory of the same config is reused; an unfinished one is trained again from
    scratch (training is deterministic, so the revisions it had come out the same); a repo that
    holds anything else is never touched.
    """
    wanted = json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as read back from JSON
    steps, found = published(cache_dir, repo_id)
    if steps and found != wanted:
        sys.exit(f"Error: {cache_dir / repo_folder_name(repo_id)} already holds revisions "
                 f"{', '.join(f'step{s}' for s in steps[:3])}{', ...' if len(steps) > 3 else ''} "
                 f"trained with other settings:\n  {found}\nHint: pass another --repo-id, "
                 f"or delete that folder to train it again.")
    if set(cfg.saved_steps()) <= set(steps):
        print(f"{repo_id}: reusing {len(cfg.saved_steps())} revisions in {cache_dir}", file=sys.stderr)
        return
    from transformers.utils import logging

    logging.disable_progress_bar()  # "Writing model shards" bars, one per checkpoint
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = cfg.seq_len
    dtype = getattr(torch, cfg.dtype)
    t0 = time.perf_counter()

    def save(step: int, model: torch.nn.Module, state: dict) -> None:
        with tempfile.TemporaryDirectory(prefix=f"tiny-pythia-step{step}-") as tmp:
            sd = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
            model.save_pretrained(tmp, state_dict=sd)
            config = json.loads(Path(tmp, "config.json").read_text())
            if config.get("dtype") != cfg.dtype:  # save_pretrained records the training dtype
                config["dtype"] = cfg.dtype
                Path(tmp, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
            state = {**state, "config": wanted, "repo_id": repo_id}
            Path(tmp, "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            write_cache_revision(cache_dir, repo_id, f"step{step}", tmp, move=True)
        loss = "" if state["train_loss"] is None else f"train_loss {state['train_loss']:.3f}"
        print(f"{repo_id} step{step:<4d} {loss:<16} {time.perf_counter() - t0:5.1f}s", file=sys.stderr)

    train(cfg, save)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[-3:]))
    ap.add_argument("--run", choices=["both", *RUNS], default="both",
                    help="high: local/tiny-pythia at a high LR; low: the low-LR control; both (default)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: 6e-3 high, 3e-4 low)")
    ap.add_argument("--repo-id", help="repo to publish as (default: local/tiny-pythia[-lowlr])")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=TrainConfig.dtype,
                    help="dtype of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="hub cache (default: $HF_HUB_CACHE or ~/.cache/huggingface/hub)")
    a = ap.parse_args(argv)
    runs = list(RUNS) if a.run == "both" else [a.run]
    if len(runs) > 1 and (a.lr is not None or a.repo_id is not None):
        ap.error("--lr and --repo-id need --run high or --run low")
    if a.cache_dir is None:
        from huggingface_hub import constants

        a.cache_dir = Path(constants.HF_HUB_CACHE)
    a.cache_dir.mkdir(parents=True, exist_ok=True)
    for run in runs:
        repo_id, lr = RUNS[run]
        cfg = TrainConfig(lr=a.lr or lr, steps=a.steps, save_every=a.save_every, dtype=a.dtype, seed=a.seed)
        publish_run(cfg, a.repo_id or repo_id, a.cache_dir)


if __name__ == "__main__":
    main()
