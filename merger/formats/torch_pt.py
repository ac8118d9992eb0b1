"""Training checkpoints saved with ``torch.save``: nanoGPT / LAWA ``ckpt_<step>.pt``, nanochat
``model_<step>.pt``, Lightning ``.ckpt``, and home-grown ``{'model': ..., 'optimizer': ...}`` files.

The format module (see ``formats/__init__.py``) of a single file (``.pt``, ``.pth``, ``.ckpt``),
or of a nanoGPT ``out/`` folder holding one ``ckpt.pt``. The header (``pt_header.py``) is read
without building an object; the model is the state dict under ``model``, ``state_dict``,
``module``, ``net`` or ``model_state_dict`` (or the top level when that is a flat tensor dict), or
where ``--key a.b`` says. Only the model's storages become extents: the optimizer's moments (twice
the model, in AdamW) are never read.

**Shared storages.** nanoGPT ties ``lm_head.weight`` to ``transformer.wte.weight``: both entries
name one storage with the same offset, shape and stride. Such an entry is an *alias*: :func:`read`
leaves it out, so the plan and the engine see one tensor, average it once and read its bytes
once; :func:`model_entries` keeps every name in the checkpoint's order with the tensor each one
aliases, and the ``nanogpt`` output writer (``output/nanogpt.py``) points the alias at the same
storage again, so the output is tied like the input. Two entries that use different parts of one
storage (a fused weight split into views) are separate tensors, each read from its own bytes;
entries that overlap without being the same view are refused.

**Declared shapes.** DeepSpeed's ``engine.save_checkpoint`` records each parameter's real shape
in ``param_shapes`` (a list of ``{name: torch.Size}``, one per parameter group) beside ``module``.
Under ZeRO-3 the ``module`` state dict holds only placeholders (shape ``(0,)``: the weights lie
partitioned across the ``*_optim_states.pt`` files), so a tensor whose stored shape disagrees
with ``param_shapes`` (or, without ``param_shapes``, an empty parameter under ``ds_config``'s
``zero_optimization.stage`` 3) is refused, with the fix: DeepSpeed's ``zero_to_fp32.py``. A
``global_stepN/`` folder of ``zero_pp_rank_R_mp_rank_00_model_states.pt`` files is detected as a
checkpoint so that this is what such a run gets (reading those runs is the formats' work).

**Views.** A tensor with a storage offset is read from that offset. A tensor with strides is read
as one extent per contiguous run (a column slice: one per row); a view whose runs are too short
(a transpose) is refused with the fix (``.contiguous()``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from merger.errors import UsageError
from merger.formats.base import TensorInfo, fail
from merger.formats.pt_header import Header, StorageRef, TensorRef, plain, read_header, signature, tensor_extents

NAME = "torch_pt"
OUTPUT = "nanogpt"
HF_OUTPUT = "gpt2"  # what --to hf writes for these inputs: a GPT2LMHeadModel folder (output/gpt2.py)
SUFFIXES = (".pt", ".pth", ".ckpt")
FOLDER_FILE = "ckpt.pt"  # nanoGPT's out/ckpt.pt
MODEL_KEYS = ("model", "state_dict", "module", "net", "model_state_dict")
PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DDP: stripped by --to hf, kept by the own format
_STEP_FILE = re.compile(r"^(?:ckpt|model|iter)_\d+$|^epoch=\d+-step=\d+$")
_ZERO3_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_\d+_model_states\.pt$")  # DeepSpeed ZeRO-3, per rank
ZERO_TO_FP32 = ("consolidate each revision with DeepSpeed's zero_to_fp32.py (saved in the checkpoint folder): "
                "python zero_to_fp32.py CHECKPOINT_DIR OUTPUT, then merge the outputs")


def _zero3_files(p: Path) -> list[Path]:
    """A folder's DeepSpeed ZeRO-3 model-states files, rank 0 first."""
    found = [(int(m.group(1)), q) for q in p.iterdir() if (m := _ZERO3_FILE.match(q.name))]
    return [q for _, q in sorted(found)]


def checkpoint_file(path: str | Path) -> Path:
    """The ``torch.save`` file of a revision: the file itself, or ``out/ckpt.pt``."""
    p = Path(path)
    if p.is_dir() and not (p / FOLDER_FILE).is_file() and (zero := _zero3_files(p)):
        return zero[0]  # refused by read() with the fix (see the module docstring)
    return p / FOLDER_FILE if p.is_dir() else p


def detect(path: str | Path) -> bool:
    """A ``.pt``/``.pth``/``.ckpt`` file, or a folder with one ``ckpt.pt`` and no step-named files."""
    p = Path(path)
    if p.is_file():
        return p.suffix in SUFFIXES
    if p.is_dir() and (p / FOLDER_FILE).is_file():
        return not any(_STEP_FILE.match(q.stem) for q in p.iterdir() if q.suffix in SUFFIXES)
    return p.is_dir() and bool(_zero3_files(p))


def weight_files(path: str | Path) -> list[str]:
    """The checkpoint file (relative to the folder for ``out/ckpt.pt``)."""
    return [checkpoint_file(path).name] if Path(path).is_dir() else [Path(path).name]


def side_files(path: str | Path) -> tuple[str, ...]:
    """None: a training file carries no config or tokenizer files (``--to hf`` writes a config)."""
    return ()


def _is_state_dict(x) -> bool:
    return isinstance(x, dict) and bool(x) and all(isinstance(k, str) and isinstance(v, TensorRef)
                                                   for k, v in x.items())


def _describe(x) -> str:
    if isinstance(x, TensorRef):
        return "a tensor"
    if isinstance(x, StorageRef):
        return "a bare storage (torch.save of t.storage() or t.untyped_storage(), not of tensors)"
    if isinstance(x, dict):
        return f"a dict of {len(x)} entries"
    return f"a {type(x).__name__}"


def find_model(tree, key: str | None, path) -> tuple[tuple[str, ...], dict]:
    """Where the model's state dict lies in ``tree`` (a key path, () for the top level) and the dict.

    Raises:
        UsageError: ``key`` doesn't lead to a state dict.
        CheckpointFormatError: no state dict found without ``key``.
    """
    if key is not None:
        node, where = tree, ()
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                have = ", ".join(map(repr, list(node)[:12])) if isinstance(node, dict) else _describe(node)
                raise UsageError(f"--key {key}: {path} has no {part!r} under {'.'.join(where) or 'the top level'}",
                                 hint=f"the keys there are {have}")
            node, where = node[part], where + (part,)
        if not _is_state_dict(node):
            bad = next((f"{k!r} is {_describe(v)}" for k, v in node.items() if not isinstance(v, TensorRef)),
                       "it is empty") if isinstance(node, dict) else f"it is {_describe(node)}"
            raise UsageError(f"--key {key}: {path} holds no state dict of tensors there ({bad})",
                             hint="point --key at the dict of parameter tensors (e.g. model, or state_dict)")
        return where, node
    if isinstance(tree, dict):
        for k in MODEL_KEYS:
            if _is_state_dict(tree.get(k)):
                return (k,), tree[k]
        if _is_state_dict(tree):
            return (), tree
        top = ", ".join(f"{k!r} ({_describe(v)})" for k, v in list(tree.items())[:12])
        raise fail(path, f"no model state dict found (looked under {', '.join(MODEL_KEYS)} and at the top "
                         f"level; it holds {top})", "say where the model is with --key, e.g. --key model")
    raise fail(path, f"holds {_describe(tree)}, not a checkpoint dict",
               "save a dict such as {'model': model.state_dict(), ...}, or model.state_dict() alone")


def model_entries(header: Header, key: str | None = None) -> tuple[tuple[str, ...], list[tuple[str, str]]]:
    """The model's key path and every entry in order as (name, name of the tensor it is): an
    alias of a tied tensor names the first entry that has its storage view (but an ``lm_head.weight``
    is the alias of the embedding it is tied to, whichever was saved first); others name themselves."""
    where, sd = find_model(header.tree, key, header.path)
    first: dict[tuple, str] = {}
    for name, t in sd.items():
        held = first.setdefault(signature(t), name)
        if held != name and _is_head(held) and not _is_head(name):  # a head saved before its embedding
            first[signature(t)] = name
    return where, [(name, first[signature(t)]) for name, t in sd.items()]


def _is_head(name: str) -> bool:
    """An output head tied to an embedding: the tensor is the embedding's, in either saved order."""
    return name.rsplit(".", 2)[-2:] == ["lm_head", "weight"]


def read(path: str | Path, *, key: str | None = None) -> dict[str, TensorInfo]:
    """The model's tensors (aliases left out, see the module docstring) as byte extents.

    Raises:
        CheckpointFormatError: see :func:`pt_header.read_header`; no model found; a model tensor
            whose bytes the file lacks (truncated); an unreadable view; overlapping tensors.
        UsageError: a ``key`` that leads to no state dict.
    """
    f = checkpoint_file(path)
    header = read_header(f)
    where, entries = model_entries(header, key)
    sd = find_model(header.tree, key, f)[1]
    check_declared_shapes(header.tree, sd, f)
    names = [name for name, same in entries if same == name]
    return tensor_extents(header, sd, names, f)


# the training counters a checkpoint dict records at its top level: Lightning and HF (global_step),
# DeepSpeed (global_steps), litgpt (step_count, the optimizer steps its step-N folders are named by),
# nanoGPT (iter_num); the first one present wins
STEP_COUNTERS = ("global_step", "global_steps", "step_count", "iter_num", "step")


def _count(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _zero_stage(tree: dict) -> int | None:
    zero = tree.get("ds_config", {}).get("zero_optimization") if isinstance(tree.get("ds_config"), dict) else None
    stage = zero.get("stage") if isinstance(zero, dict) else None
    return stage if isinstance(stage, int) else None


def check_declared_shapes(tree, sd: dict, path) -> None:
    """Refuse model tensors whose stored shape disagrees with the checkpoint's own record of them
    (DeepSpeed's ``param_shapes``; ZeRO-3 placeholders: see the module docstring).

    Raises:
        CheckpointFormatError: naming one such tensor, its stored and real shapes, and the fix.
    """
    if not isinstance(tree, dict):
        return
    groups = tree.get("param_shapes")
    groups = [groups] if isinstance(groups, dict) else groups if isinstance(groups, (list, tuple)) else []
    declared = {n: tuple(s) for g in groups if isinstance(g, dict) for n, s in g.items()
                if isinstance(s, (tuple, list)) and all(type(d) is int for d in s)}
    stage = _zero_stage(tree)
    bad = [(n, tuple(sd[n].shape), s) for n, s in declared.items()
           if isinstance(sd.get(n), TensorRef) and tuple(sd[n].shape) != s]
    if not declared and stage == 3:  # saved without param_shapes: ZeRO-3's placeholders hold no element
        bad = [(n, tuple(t.shape), None) for n, t in sd.items()
               if isinstance(t, TensorRef) and t.storage.dtype.startswith(("float", "bfloat"))
               and not math.prod(t.shape)]
    if not bad:
        return
    name, stored, real = bad[0]
    real_s = f"its real shape is {list(real)} (param_shapes)" if real is not None else "it holds no element"
    what = (f"a DeepSpeed ZeRO-{stage or 3} model-states file: its model tensors are placeholders, "
            "the weights lie partitioned across the ranks' *_optim_states.pt files"
            if all(math.prod(st) == 0 for _, st, _ in bad) else
            "model tensors disagree in size with the checkpoint's own param_shapes")
    raise fail(path, f"{what} ({len(bad)} of {len(sd)} tensors, e.g. {name!r} is stored as {list(stored)}, "
                     f"{real_s})", ZERO_TO_FP32)


def step_inside(path: str | Path) -> int | None:
    """The step a checkpoint records, read from its pickle (no object built): the first of
    :data:`STEP_COUNTERS` at the top level that is a plain int, else Composer's
    ``state.timestamp.batch`` when that is one; None if it records none."""
    tree = read_header(checkpoint_file(path)).tree
    if not isinstance(tree, dict):
        return None
    for k in STEP_COUNTERS:
        if _count(tree.get(k)) is not None:
            return tree[k]
    state = tree.get("state")
    timestamp = state.get("timestamp") if isinstance(state, dict) else None
    return _count(timestamp.get("batch")) if isinstance(timestamp, dict) else None


def meta(header: Header, where: tuple[str, ...]) -> dict:
    """The top-level entries to carry into an output: plain values (no tensor), except optimizer,
    scheduler and scaler state and the model itself."""
    if not isinstance(header.tree, dict) or not where:
        return {}
    skip = re.compile(r"optim|sched|scaler", re.I)
    return {k: v for k, v in header.tree.items() if k != where[0] and not skip.search(str(k)) and plain(v)}


def plain_prefix(names) -> str:
    """The ``_orig_mod.`` / ``module.`` prefix every name carries ('' if none)."""
    names = list(names)
    prefix = ""
    changed = True
    while changed and names:
        changed = False
        for p in PREFIXES:
            if all(n.startswith(prefix + p) for n in names):
                prefix += p
                changed = True
    return prefix
