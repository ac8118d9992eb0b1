"""Synthetic Pythia-shaped checkpoints and trajectories, for tests, benchmarks and demos.

Tensors carry Pythia's real names, shapes and buffers (uint8 causal-mask ``attention.bias``,
``attention.masked_bias`` = -inf in fp16, ``rotary_emb.inv_freq``, head ``embed_out.weight``), so
they exercise every tensor rule; values follow a random walk, like a training trajectory.

    python -m merger.testing.synth OUT_DIR --shape 70m --revisions 9 --every 1000   # writes OUT_DIR/stepN/
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """A GPT-NeoX architecture (the fields of its config.json that fix the tensor shapes)."""

    hidden: int
    layers: int
    heads: int
    vocab: int = 50304
    max_pos: int = 2048
    rotary_pct: float = 0.25

    @property
    def intermediate(self) -> int:
        return 4 * self.hidden

    @property
    def rotary_dims(self) -> int:
        return int(self.hidden // self.heads * self.rotary_pct)

    def config(self, dtype: torch.dtype = torch.float16) -> dict:
        """config.json contents that transformers' GPTNeoXForCausalLM loads."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.max_pos,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": 10000,
            "use_parallel_residual": True,
            "layer_norm_eps": 1e-5,
            "hidden_act": "gelu",
            "bos_token_id": 0,
            "eos_token_id": 0,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }


SHAPES: dict[str, Shape] = {
    "tiny": Shape(hidden=64, layers=2, heads=4, vocab=512, max_pos=128),
    "70m": Shape(hidden=512, layers=6, heads=8),
    "160m": Shape(hidden=768, layers=12, heads=12),
    "410m": Shape(hidden=1024, layers=24, heads=16),
    "1b": Shape(hidden=2048, layers=16, heads=8),
}


def pythia_names(shape: Shape) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor name -> (shape, kind) in Pythia's file order; kind is weight|bias|norm|mask|masked|rope."""
    h, f = shape.hidden, shape.intermediate
    out: dict[str, tuple[tuple[int, ...], str]] = {"gpt_neox.embed_in.weight": ((shape.vocab, h), "weight")}
    for i in range(shape.layers):
        p = f"gpt_neox.layers.{i}."
        out.update({
            p + "input_layernorm.weight": ((h,), "norm"),
            p + "input_layernorm.bias": ((h,), "bias"),
            p + "post_attention_layernorm.weight": ((h,), "norm"),
            p + "post_attention_layernorm.bias": ((h,), "bias"),
            p + "attention.bias": ((1, 1, shape.max_pos, shape.max_pos), "mask"),
            p + "attention.masked_bias": ((), "masked"),
            p + "attention.rotary_emb.inv_freq": ((shape.rotary_dims // 2,), "rope"),
            p + "attention.query_key_value.weight": ((3 * h, h), "weight"),
            p + "attention.query_key_value.bias": ((3 * h,), "bias"),
            p + "attention.dense.weight": ((h, h), "weight"),
            p + "attention.dense.bias": ((h,), "bias"),
            p + "mlp.dense_h_to_4h.weight": ((f, h), "weight"),
            p + "mlp.dense_h_to_4h.bias": ((f,), "bias"),
            p + "mlp.dense_4h_to_h.weight": ((h, f), "weight"),
            p + "mlp.dense_4h_to_h.bias": ((h,), "bias"),
        })
    out["gpt_neox.final_layer_norm.weight"] = ((h,), "norm")
    out["gpt_neox.final_layer_norm.bias"] = ((h,), "bias")
    out["embed_out.weight"] = ((shape.vocab, h), "weight")
    return out


def pythia_state_dict(shape: Shape | str, *, seed: int = 0, step: int = 0,
                      dtype: torch.dtype = torch.float16, noise: float = 0.002) -> dict[str, torch.Tensor]:
    """One checkpoint of a synthetic trajectory: ``base(seed) + noise * walk(seed, step)``.

    Trainable tensors move with ``step`` (revisions with different steps differ everywhere);
    buffers are identical at every step, as in real Pythia files.
    """
    shape = SHAPES[shape] if isinstance(shape, str) else shape
    sd: dict[str, torch.Tensor] = {}
    bases = _base(shape, seed)
    g_step = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
    rope = 1.0 / (10000 ** (torch.arange(0, shape.rotary_dims, 2, dtype=torch.float32) / shape.rotary_dims))
    mask = None
    for name, (dims, kind) in pythia_names(shape).items():
        if kind == "mask":
            if mask is None:
                mask = torch.tril(torch.ones(dims[-2:], dtype=torch.uint8)).view(dims)
            sd[name] = mask.clone()
        elif kind == "masked":
            sd[name] = torch.tensor(-math.inf, dtype=dtype)
        elif kind == "rope":
            sd[name] = rope.to(dtype).clone()
        else:
            walk = torch.randn(dims, generator=g_step)
            sd[name] = walk.mul_(noise).add_(bases[name]).to(dtype)
    return sd


@functools.lru_cache(maxsize=2)
def _base(shape: Shape, seed: int) -> dict[str, torch.Tensor]:
    """The trajectory's starting point (float32), shared by all its steps."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (dims, kind) in pythia_names(shape).items():
        if kind in ("weight", "bias", "norm"):
            out[name] = torch.randn(dims, generator=g).mul_(0.02 if kind == "weight" else 0.01)
            if kind == "norm":
                out[name] += 1.0
    return out


def save_checkpoint(folder: str | Path, sd: dict[str, torch.Tensor], *, fmt: str = "safetensors",
                    max_shard_size: int | None = None, config: dict | None = None) -> Path:
    """Write ``sd`` as a Hugging Face checkpoint folder: safetensors or pytorch_model.bin,
    one file or shards of at most ``max_shard_size`` bytes plus the ``*.index.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_size and shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"{stem}.{ext}" if n == 1 else f"{stem}-{i:05d}-of-{n:05d}.{ext}"
        if fmt == "safetensors":
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / fname)
        weight_map.update({k: fname for k in shard})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def write_trajectory(root: str | Path, *, shape: str | Shape = "tiny", steps: list[int],
                     fmt: str = "safetensors", dtype: torch.dtype = torch.float16, seed: int = 0,
                     max_shard_size: int | None = None, name: str = "step{step}") -> list[Path]:
    """Write one checkpoint folder per step under ``root`` (``root/step1000/`` ...)."""
    shape_ = SHAPES[shape] if isinstance(shape, str) else shape
    out = []
    for step in steps:
        sd = pythia_state_dict(shape_, seed=seed, step=step, dtype=dtype)
        out.append(save_checkpoint(Path(root) / name.format(step=step), sd, fmt=fmt,
                                   max_shard_size=max_shard_size, config=shape_.config(dtype)))
    return out


def main() -> None:  # pragma: no cover - thin script wrapper
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="70m", choices=sorted(SHAPES))
    ap.add_argument("--revisions", type=int, default=9)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--start", type=int, default=1000)
    ap.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--max-shard-size", type=int, default=None)
    a = ap.parse_args()
    steps = [a.start + i * a.every for i in range(a.revisions)]
    write_trajectory(a.out, shape=a.shape, steps=steps, fmt=a.format, dtype=getattr(torch, a.dtype),
                     max_shard_size=a.max_shard_size)


if __name__ == "__main__":  # pragma: no cover
    main()
