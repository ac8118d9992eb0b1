"""The ``gpt2`` output (what ``--to hf`` writes for a nanoGPT input): a transformers
``GPT2LMHeadModel`` folder, so that ``merger eval`` and ``merger sweep`` run on LAWA-style runs.

nanoGPT's GPT is GPT-2's architecture with ``nn.Linear`` where GPT-2 has ``Conv1D``: the four
projection weights (``c_attn``, ``attn.c_proj``, ``c_fc``, ``mlp.c_proj``) are transposed; the
head is tied to ``wte`` (``tie_word_embeddings``; an untied ``lm_head.weight`` is kept and the
tie switched off); a model trained with ``bias=False`` gets zero biases (the same function);
nanoGPT's causal-mask buffer ``attn.bias`` is dropped. ``_orig_mod.`` / ``module.`` prefixes are
stripped. ``config.json`` comes from the latest input's ``model_args`` (nanoGPT's ``nn.GELU`` is
the exact ``gelu``; LayerNorm eps 1e-5). No tokenizer is written: training checkpoints carry none
(``merger eval --tokenizer``).

``model.safetensors`` is written one tensor at a time (header first, from the shapes), so memory
stays at one tensor.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from merger.errors import OutputError
from merger.formats import read_checkpoint
from merger.formats.pt_header import read_header
from merger.formats.reading import read_extents
from merger.formats.torch_pt import checkpoint_file, plain_prefix

FILE = "model.safetensors"
_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_TRANSPOSED = re.compile(r"^transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_BIASED = re.compile(r"^transformer\.(h\.\d+\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                     r"|ln_f)\.weight$")
NEEDED = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def _model_args(src: str) -> dict:
    tree = read_header(checkpoint_file(src)).tree
    args = tree.get("model_args") if isinstance(tree, dict) else None
    if isinstance(args, dict) and all(k in args for k in NEEDED):
        return args
    raise OutputError(f"--to hf: {src} has no nanoGPT model_args ({', '.join(NEEDED)})",
                      hint="--to hf converts nanoGPT GPT-2 checkpoints; use --to safetensors (keys as "
                           "in the input) or the default output for other models")


def config(args: dict, *, tied: bool, dtype: str) -> dict:
    """A GPT2Config dict for nanoGPT's ``model_args``."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": args["vocab_size"],
            "n_positions": args["block_size"], "n_ctx": args["block_size"], "n_embd": args["n_embd"],
            "n_layer": args["n_layer"], "n_head": args["n_head"], "n_inner": None,
            "activation_function": "gelu", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": args.get("dropout", 0.0), "embd_pdrop": args.get("dropout", 0.0),
            "attn_pdrop": args.get("dropout", 0.0), "initializer_range": 0.02,
            "tie_word_embeddings": tied, "torch_dtype": dtype, "bos_token_id": args["vocab_size"] - 1,
            "eos_token_id": args["vocab_size"] - 1}


_KNOWN = re.compile(r"^(transformer\.(wte|wpe|ln_f)\.(weight|bias)|lm_head\.weight|transformer\.h\.\d+\."
                    r"(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias))$")


def _names(merged, src) -> dict[str, str]:
    """GPT-2 name -> the merge's name, for every tensor but the causal-mask buffers.

    Raises:
        OutputError: tensors nanoGPT's GPT doesn't have, or no ``transformer.wte.weight``.
    """
    prefix = plain_prefix(merged)
    names = {n[len(prefix):]: n for n in merged if not n.endswith(".attn.bias")}
    odd = [n for n in names if not _KNOWN.match(n)]
    if odd or "transformer.wte.weight" not in names:
        raise OutputError(f"--to hf: {src} is not a nanoGPT GPT-2 model (unexpected tensors: "
                          f"{', '.join(odd[:5]) or 'no transformer.wte.weight'})",
                          hint="use --to safetensors (keys as in the input) or the default output")
    return names


def layout(names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str | None, tuple, bool]]:
    """The GPT-2 tensors, in order, as ``(hf name, source name or None, shape, transpose)``: None
    is a zero bias (``bias=False``); ``names`` from :func:`_names`, ``shapes`` by source name."""
    out: list[tuple[str, str | None, tuple, bool]] = []
    for name, full in names.items():
        shape = tuple(shapes[full])
        t = bool(_TRANSPOSED.match(name))
        out.append((name, full, shape[::-1] if t else shape, t))
        if _BIASED.match(name) and name[: -len("weight")] + "bias" not in names:
            out.append((name[: -len("weight")] + "bias", None, (shape[0],), False))
    return out


def hf_model(src: str, names: list[str], *, dtype: str = "float32") -> tuple[dict, Callable[[dict], dict]]:
    """For scoring a nanoGPT run in memory (``merger sweep``): the GPT2Config dict of ``src`` (its
    ``model_args``) and a function from a state dict with the run's ``names`` (torch tensors) to
    GPT2LMHeadModel's, renamed and transposed as :func:`write` writes them; ``dtype`` goes into the
    config (``torch_dtype``: what ``from_pretrained(dtype="auto")`` loads as).

    Raises:
        OutputError: ``src`` is not a nanoGPT GPT-2 model (no ``model_args``, unknown tensors).
    """
    args = _model_args(src)
    hf = _names(dict.fromkeys(names), src)

    def convert(state: dict) -> dict:
        out = {}
        for name, full, shape, transpose in layout(hf, {n: state[n].shape for n in hf.values()}):
            if full is None:
                out[name] = state[hf[name[: -len("bias")] + "weight"]].new_zeros(shape)
            else:
                out[name] = state[full].t().contiguous() if transpose else state[full]
        return out

    return config(args, tied="lm_head.weight" not in hf, dtype=dtype), convert


def check(plan) -> None:
    """Before anything is read: the merge is of a nanoGPT GPT-2 model (``model_args``, its tensors).

    Raises:
        OutputError: it isn't.
    """
    src = plan.sources[-1].path
    _model_args(src)
    _names({t.name: t for t in plan.tensors}, src)


def write(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` as a GPT2LMHeadModel folder.

    Raises:
        OutputError: the input is not a nanoGPT GPT-2 model (no ``model_args``, unknown tensors).
    """
    src = plan.sources[-1].path
    args = _model_args(src)
    merged = read_checkpoint(tmp)
    names = _names(merged, src)
    tied = "lm_head.weight" not in names
    wte = merged[names["transformer.wte.weight"]]
    dtype = wte.dtype
    plan_out = layout(names, {n: t.shape for n, t in merged.items()})
    header, at = {}, 0
    for name, full, shape, _ in plan_out:
        dt = merged[full].dtype if full else dtype
        n = int(np.prod(shape)) * np.dtype(_np(dt)).itemsize
        header[name] = {"dtype": _ST[dt], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fds = {p: os.open(p, os.O_RDONLY) for p in {e.path for t in merged.values() for e in t.extents}}
    try:
        with open(tmp / f".{FILE}.partial", "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name, full, _, transpose in plan_out:
                if full is None:
                    f.write(bytes(header[name]["data_offsets"][1] - header[name]["data_offsets"][0]))
                    continue
                info = merged[full]
                buf = np.empty(info.nbytes, dtype=np.uint8)
                read_extents(fds, info.extents, 0, memoryview(buf))
                x = buf.view(_np(info.dtype)).reshape(info.shape)
                f.write(np.ascontiguousarray(x.T if transpose else x).tobytes())
    finally:
        for fd in fds.values():
            os.close(fd)
    for p in list(tmp.glob("model*.safetensors")) + list(tmp.glob("model.safetensors.index.json")):
        p.unlink()
    os.replace(tmp / f".{FILE}.partial", tmp / FILE)
    (tmp / "config.json").write_text(json.dumps(config(args, tied=tied, dtype=dtype), indent=2) + "\n")
    return [FILE, "config.json"]


def _np(dtype: str):
    if dtype == "bfloat16":  # numpy has no bfloat16: its bytes move as uint16
        return np.uint16
    return np.dtype(dtype)
