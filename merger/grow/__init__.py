"""``merger grow``: warmstart a wider (and deeper) model from a trained smaller checkpoint.

Shrink the small weights by λ, zero-pad them into the larger shapes, add σ × a fresh (μP or
standard) initialisation of the larger model (Mallik et al. 2024). ``arch.py`` holds one rule
table per architecture, ``init.py`` the fresh initialisation, ``run.py`` the operation.

To add an architecture: write its rule table in ``arch.py`` (a regex per tensor name giving each
axis a kind: vocab/pos/hidden/ffn/qkv_heads/qkv_blocks, the init role, the fan-in axis, and which
tensors are residual outputs), name its config keys for hidden size, MLP size, heads and layers,
and add it to ``ARCHS``; then add it to the exact-embedding and transformers-loading tests.
"""

from merger.grow.run import GrowOptions, GrowResult, grow

__all__ = ["GrowOptions", "GrowResult", "grow"]
