"""Seeded checkpoint trajectories written by the real writers (``merger.testing.synth``)."""

from __future__ import annotations

from pathlib import Path

import torch

from merger.testing import synth


def make_run(root: Path, *, shape="tiny", steps=(1000, 2000, 3000), fmt="safetensors", dtype=torch.float16,
             max_shard_size=None, seed=0, name="step{step}"):
    """Write a trajectory and return (root, [state dicts])."""
    shape_ = synth.SHAPES[shape] if isinstance(shape, str) else shape
    sds = []
    for s in steps:
        sds.append(synth.pythia_state_dict(shape_, seed=seed, step=s, dtype=dtype))
        synth.save_checkpoint(Path(root) / name.format(step=s), sds[-1], fmt=fmt,
                              max_shard_size=max_shard_size, config=shape_.config(dtype))
    return root, sds


# a shape whose embedding (8192 x 128 = 4 CHUNKs) is cut into element ranges by small budgets
WIDE = synth.Shape(hidden=128, layers=1, heads=4, vocab=8192, max_pos=64)


def files_equal(a: Path, b: Path, pattern: str = "*.safetensors") -> bool:
    fa, fb = sorted(Path(a).glob(pattern)), sorted(Path(b).glob(pattern))
    return [f.name for f in fa] == [f.name for f in fb] and \
        all(x.read_bytes() == y.read_bytes() for x, y in zip(fa, fb))
