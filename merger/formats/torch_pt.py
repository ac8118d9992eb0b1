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

**Views.** A tensor with a storage offset is read from that offset. A tensor with strides is read
as one extent per contiguous run (a column slice: one per row); a view whose runs are too short
(a transpose) is refused with the fix (``.contiguous()``).
"""

from __future__ import annotations

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


def checkpoint_file(path: str | Path) -> Path:
    """The ``torch.save`` file of a revision: the file itself, or ``out/ckpt.pt``."""
    p = Path(path)
    return p / FOLDER_FILE if p.is_dir() else p


def detect(path: str | Path) -> bool:
    """A ``.pt``/``.pth``/``.ckpt`` file, or a folder with one ``ckpt.pt`` and no step-named files."""
    p = Path(path)
    if p.is_file():
        return p.suffix in SUFFIXES
    if p.is_dir() and (p / FOLDER_FILE).is_file():
        return not any(_STEP_FILE.match(q.stem) for q in p.iterdir() if q.suffix in SUFFIXES)
    return False


def weight_files(path: str | Path) -> list[str]:
    """The checkpoint file (relative to the folder for ``out/ckpt.pt``)."""
    return [FOLDER_FILE] if Path(path).is_dir() else [Path(path).name]


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
    names = [name for name, same in entries if same == name]
    return tensor_extents(header, sd, names, f)


def step_inside(path: str | Path) -> int | None:
    """The step a checkpoint records (``iter_num``, ``global_step`` or ``step``), read from its pickle."""
    tree = read_header(checkpoint_file(path)).tree
    if isinstance(tree, dict):
        for k in ("iter_num", "global_step", "step"):
            v = tree.get(k)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


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
