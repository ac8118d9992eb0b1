"""Per-architecture rules for ``merger grow``: where each small tensor lands in the grown one.

Each tensor name matches one :class:`Rule`, which gives every axis a *kind*:

- ``vocab``, ``pos``, ``one``: unchanged by growth;
- ``hidden`` (d -> w·d) and ``ffn`` (f -> w·f): the small entries are the first ones. Heads are
  added and the head dimension kept, so head ``i`` of the small model is head ``i`` of the grown
  one, at the same offsets;
- ``qkv_heads``: GPT-NeoX's fused ``query_key_value`` output, laid out ``[heads, (q,k,v), head_dim]``
  (the model views it as ``(heads, 3·head_dim)``): heads are outermost, so the small heads' q/k/v
  rows are the first ``3·d`` rows of the grown ``3·w·d``;
- ``qkv_blocks``: GPT-2's ``c_attn`` output, ``[q | k | v]`` blocks of ``d`` each: block ``j`` of the
  small model lands at ``j·w·d`` of the grown one.

A rule also says how a fresh tensor is initialised (``role``, ``fan_in_axis``, see ``init.py``)
and whether it is a residual-branch output (zero in new layers, so they start as identities).
Buffers (causal masks, rotary ``inv_freq``) are rebuilt from the grown config, never padded.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from merger.errors import UsageError


@dataclass(frozen=True)
class Rule:
    """How one family of tensors grows. ``pattern`` matches the name with ``{L}`` as the layer index."""

    pattern: str
    axes: tuple[str, ...]
    role: str  # embedding | matrix | output | bias | norm_weight | norm_bias | buffer
    fan_in_axis: int | None = None  # for role matrix/output: which axis is the fan-in
    resid_out: bool = False  # output of a residual branch (attention out, MLP out)
    scaled: bool = False  # GPT-2's c_proj: standard init std / sqrt(2 · n_layer)


@dataclass(frozen=True)
class Arch:
    """One architecture: its config keys, its layer prefix and its rule table."""

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, ...]
    hidden: str  # config key of the hidden size
    ffn: str | None  # config key of the MLP size (None-valued means 4 x hidden, GPT-2's n_inner)
    heads: str
    layers: str
    layer_re: str  # regex of a layer's prefix, with one group: the layer index
    rules: tuple[Rule, ...]

    def rule(self, name: str) -> Rule | None:
        """The rule for a tensor name (layer index replaced), or None."""
        key = re.sub(self.layer_re, lambda m: m.group(0).replace(m.group(1), "{L}"), name, count=1)
        for r in self.rules:
            if re.fullmatch(r.pattern, key):
                return r
        return None

    def layer_of(self, name: str) -> int | None:
        m = re.match(self.layer_re, name)
        return int(m.group(1)) if m else None

    def rename_layer(self, name: str, new: int) -> str:
        m = re.match(self.layer_re, name)
        assert m is not None
        return name[: m.start(1)] + str(new) + name[m.end(1):]


_NEOX_L = r"gpt_neox\.layers\.\{L\}\."
GPT_NEOX = Arch(
    name="gpt_neox", model_types=("gpt_neox",), classes=("GPTNeoXForCausalLM",),
    hidden="hidden_size", ffn="intermediate_size", heads="num_attention_heads", layers="num_hidden_layers",
    layer_re=r"^gpt_neox\.layers\.(\d+)\.",
    rules=(  # nn.Linear weights are [out, in]: fan-in is axis 1
        Rule(r"gpt_neox\.embed_in\.weight", ("vocab", "hidden"), "embedding"),
        Rule(r"embed_out\.weight|lm_head\.weight", ("vocab", "hidden"), "output", fan_in_axis=1),
        Rule(r"gpt_neox\.final_layer_norm\.weight", ("hidden",), "norm_weight"),
        Rule(r"gpt_neox\.final_layer_norm\.bias", ("hidden",), "norm_bias"),
        Rule(_NEOX_L + r"(input|post_attention)_layernorm\.weight", ("hidden",), "norm_weight"),
        Rule(_NEOX_L + r"(input|post_attention)_layernorm\.bias", ("hidden",), "norm_bias"),
        Rule(_NEOX_L + r"attention\.query_key_value\.weight", ("qkv_heads", "hidden"), "matrix", fan_in_axis=1),
        Rule(_NEOX_L + r"attention\.query_key_value\.bias", ("qkv_heads",), "bias"),
        Rule(_NEOX_L + r"attention\.dense\.weight", ("hidden", "hidden"), "matrix", fan_in_axis=1, resid_out=True),
        Rule(_NEOX_L + r"attention\.dense\.bias", ("hidden",), "bias", resid_out=True),
        Rule(_NEOX_L + r"mlp\.dense_h_to_4h\.weight", ("ffn", "hidden"), "matrix", fan_in_axis=1),
        Rule(_NEOX_L + r"mlp\.dense_h_to_4h\.bias", ("ffn",), "bias"),
        Rule(_NEOX_L + r"mlp\.dense_4h_to_h\.weight", ("hidden", "ffn"), "matrix", fan_in_axis=1, resid_out=True),
        Rule(_NEOX_L + r"mlp\.dense_4h_to_h\.bias", ("hidden",), "bias", resid_out=True),
        # buffers of older checkpoints (Pythia on the Hub): rebuilt from the grown config
        Rule(_NEOX_L + r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)", (), "buffer"),
    ))

_GPT2_L = r"(transformer\.)?h\.\{L\}\."
GPT2 = Arch(
    name="gpt2", model_types=("gpt2",), classes=("GPT2LMHeadModel",),
    hidden="n_embd", ffn="n_inner", heads="n_head", layers="n_layer",
    layer_re=r"^(?:transformer\.)?h\.(\d+)\.",
    rules=(  # Conv1D weights are [in, out]: fan-in is axis 0
        Rule(r"(transformer\.)?wte\.weight", ("vocab", "hidden"), "embedding"),
        Rule(r"(transformer\.)?wpe\.weight", ("pos", "hidden"), "embedding"),
        Rule(r"lm_head\.weight", ("vocab", "hidden"), "output", fan_in_axis=1),  # only when saved untied
        Rule(r"(transformer\.)?ln_f\.weight", ("hidden",), "norm_weight"),
        Rule(r"(transformer\.)?ln_f\.bias", ("hidden",), "norm_bias"),
        Rule(_GPT2_L + r"ln_[12]\.weight", ("hidden",), "norm_weight"),
        Rule(_GPT2_L + r"ln_[12]\.bias", ("hidden",), "norm_bias"),
        Rule(_GPT2_L + r"attn\.c_attn\.weight", ("hidden", "qkv_blocks"), "matrix", fan_in_axis=0),
        Rule(_GPT2_L + r"attn\.c_attn\.bias", ("qkv_blocks",), "bias"),
        Rule(_GPT2_L + r"attn\.c_proj\.weight", ("hidden", "hidden"), "matrix", fan_in_axis=0, resid_out=True,
             scaled=True),
        Rule(_GPT2_L + r"attn\.c_proj\.bias", ("hidden",), "bias", resid_out=True),
        Rule(_GPT2_L + r"mlp\.c_fc\.weight", ("hidden", "ffn"), "matrix", fan_in_axis=0),
        Rule(_GPT2_L + r"mlp\.c_fc\.bias", ("ffn",), "bias"),
        Rule(_GPT2_L + r"mlp\.c_proj\.weight", ("ffn", "hidden"), "matrix", fan_in_axis=0, resid_out=True,
             scaled=True),
        Rule(_GPT2_L + r"mlp\.c_proj\.bias", ("hidden",), "bias", resid_out=True),
        Rule(_GPT2_L + r"attn\.(bias|masked_bias)", (), "buffer"),
    ))

ARCHS = (GPT_NEOX, GPT2)
SUPPORTED = ", ".join(f"{a.name} ({', '.join(a.classes)})" for a in ARCHS)


def detect(config: dict, *, where: str) -> Arch:
    """The architecture of a ``config.json``.

    Raises:
        UsageError: a model type merger grow has no rules for (the message lists the supported ones).
    """
    mt = config.get("model_type")
    for a in ARCHS:
        if mt in a.model_types:
            return a
    archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise UsageError(f"{where}: model_type {mt!r} ({archs}) is not supported by merger grow; "
                     f"supported: {SUPPORTED}",
                     hint="grow a supported model, or add a rule table for this one in merger/grow/arch.py")


@dataclass(frozen=True)
class Sizes:
    """The dimensions growth changes, small or grown."""

    hidden: int
    ffn: int
    heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def sizes(arch: Arch, config: dict, *, where: str) -> Sizes:
    """Read hidden size, MLP size, heads and layers from a config (GPT-2's n_inner None = 4 x n_embd).

    Raises:
        UsageError: a key is missing or the hidden size is not a multiple of the heads.
    """
    try:
        d, h, n = (int(config[k]) for k in (arch.hidden, arch.heads, arch.layers))
        f = config.get(arch.ffn) if arch.ffn else None
        f = int(f) if f is not None else 4 * d
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{where}: config.json lacks a usable {e} for a {arch.name} model",
                         hint="re-save the model with save_pretrained so that config.json is complete") from None
    if d % h:
        raise UsageError(f"{where}: hidden size {d} is not a multiple of {h} heads", hint="check config.json")
    return Sizes(d, f, h, n)


def _scaled(value: int, factor: float, what: str, flag: str) -> int:
    new = value * factor
    if abs(new - round(new)) > 1e-9:
        raise UsageError(f"{flag} {factor:g} gives {value} x {factor:g} = {new:g} {what}, not a whole number",
                         hint=f"pick a {flag} that makes {value} {what} a whole number, e.g. {flag} 2")
    return int(round(new))


def grown_sizes(small: Sizes, *, width: float, depth: float) -> Sizes:
    """The grown dimensions: heads and MLP x width (head dim kept), layers x depth.

    Raises:
        UsageError: shrinking (a factor below 1), or a factor that leaves a fraction of a head,
            of an MLP unit or of a layer.
    """
    for flag, v in (("--width", width), ("--depth", depth)):
        if not math.isfinite(v) or v < 1:
            raise UsageError(f"{flag} {v:g} would shrink the model; merger grow only grows",
                             hint=f"pass {flag} 1 or more (e.g. {flag} 2 doubles it)")
    heads = _scaled(small.heads, width, "attention heads (the head dimension is kept)", "--width")
    ffn = _scaled(small.ffn, width, "MLP units", "--width")
    layers = _scaled(small.layers, depth, "layers", "--depth")
    return Sizes(heads * small.head_dim, ffn, heads, layers)


def grown_config(arch: Arch, config: dict, big: Sizes) -> dict:
    """``config.json`` of the grown model: the four sizes replaced, everything else kept."""
    out = dict(config)
    out.update({arch.hidden: big.hidden, arch.heads: big.heads, arch.layers: big.layers})
    if arch.ffn and config.get(arch.ffn) is not None:
        out[arch.ffn] = big.ffn
    return out


def layer_map(small_layers: int, big_layers: int) -> list[int]:
    """Where each small layer goes: layer i -> floor(i · L'/L). New layers fill the gaps, each
    right after an old one (depth 2: old layers at 0, 2, 4, ...; new ones at 1, 3, 5, ...)."""
    return [i * big_layers // small_layers for i in range(small_layers)]


def axis_index(kind: str, n_small: int, small: Sizes, big: Sizes) -> torch.Tensor:
    """Positions, in the grown axis, of the ``n_small`` entries of a small axis of this kind."""
    if kind in ("hidden", "ffn", "qkv_heads"):  # prefixes (see the module docstring)
        return torch.arange(n_small)
    if kind == "qkv_blocks":  # [q | k | v], block j at j·D
        d = n_small // 3
        return torch.cat([torch.arange(d) + j * big.hidden for j in range(3)])
    return torch.arange(n_small)  # vocab, pos, one


def grown_shape(rule: Rule, shape: tuple[int, ...], small: Sizes, big: Sizes) -> tuple[int, ...]:
    """The shape of a tensor in the grown model.

    Raises:
        UsageError: the small tensor's shape disagrees with its config.
    """
    if rule.role == "buffer":  # rebuilt: its shape is the rebuilt one's (see plan_jobs)
        return shape
    want = {"hidden": small.hidden, "ffn": small.ffn, "qkv_heads": 3 * small.hidden, "qkv_blocks": 3 * small.hidden}
    new = {"hidden": big.hidden, "ffn": big.ffn, "qkv_heads": 3 * big.hidden, "qkv_blocks": 3 * big.hidden}
    if len(shape) != len(rule.axes):
        raise UsageError(f"a tensor matching {rule.pattern} has shape {list(shape)}, expected {len(rule.axes)} axes",
                         hint="the checkpoint does not match its config.json")
    out = []
    for kind, n in zip(rule.axes, shape):
        if kind in want and n != want[kind]:
            raise UsageError(f"a tensor matching {rule.pattern} has {n} entries along its {kind} axis, but "
                             f"config.json implies {want[kind]}", hint="the checkpoint does not match its config.json")
        out.append(new.get(kind, n))
    return tuple(out)


def rebuild_buffer(arch: Arch, name: str, like: torch.Tensor, config: dict, big: Sizes) -> torch.Tensor:
    """A buffer recomputed for the grown config (same dtype and, masks, same shape as ``like``)."""
    if name.endswith("inv_freq"):  # GPT-NeoX rotary: 1 / base^(2i / rotary_dims)
        rope = {**config, **(config.get("rope_parameters") or {})}  # transformers 5 nests them here
        pct = rope.get("partial_rotary_factor", rope.get("rotary_pct", 1.0))
        base = rope.get("rope_theta", rope.get("rotary_emb_base", 10000))
        rot = int(big.head_dim * pct)
        inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
        return inv.to(like.dtype)
    if name.endswith("masked_bias"):  # a constant (-1e9 NeoX, -1e4 GPT-2), independent of sizes
        return like.clone()
    n = like.shape[-1]  # causal mask over max positions, [1, 1, n, n]
    return torch.tril(torch.ones(n, n, dtype=torch.bool)).view(1, 1, n, n).to(like.dtype)
