"""Hugging Face checkpoint folders: ``model.safetensors`` or ``pytorch_model.bin``, single or
sharded with their ``*.index.json`` (each revision may have its own shard layout), plus config and
tokenizer files that the output copies byte for byte.

The format module of a checkpoint folder (see ``formats/__init__.py``): :func:`detect`,
:func:`read`, :func:`weight_files`, :func:`side_files`.
"""

from __future__ import annotations

import json
from pathlib import Path

from merger.errors import CheckpointFormatError, UsageError
from merger.formats.base import RESAVE as _RESAVE
from merger.formats.base import TensorInfo
from merger.formats.base import fail as _fail
from merger.formats.inputs import check_regular, contained, read_input
from merger.formats.safetensors import read_safetensors
from merger.formats.torch_zip import read_torch_zip

NAME = "hf"
OUTPUT = "hf"
# in transformers' order of precedence (from_pretrained): a folder holding model.safetensors and a
# stale index with shards is read as transformers reads it, from model.safetensors
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
              "added_tokens.json", "chat_template.jinja")


def detect(path: str | Path) -> bool:
    """A folder holding one of ``WEIGHT_FILES``."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in WEIGHT_FILES)


def weights_files(folder: str | Path) -> tuple[str, list[str]]:
    """The weight files of a checkpoint folder, in transformers' precedence: (kind, relative names).

    ``kind`` is the file that defines the layout (an index or a single weights file).

    Raises:
        CheckpointFormatError: no weights in the folder, an unreadable index, an index naming files
            outside the folder.
    """
    folder = Path(folder)
    for kind in WEIGHT_FILES:
        p = folder / kind
        if not p.exists():
            continue
        contained(folder, kind, what="weights file")
        if not kind.endswith(".index.json"):
            return kind, [kind]
        files = sorted(set(read_index(p).values()))
        for f in files:
            contained(folder, f, what=f"shard named in {kind},")
        return kind, files
    raise CheckpointFormatError(
        f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})", path=str(folder),
        hint="point at a Hugging Face checkpoint folder, or a folder of revision subfolders (step1000/ ...)")


def read_index(path: Path) -> dict[str, str]:
    """The ``weight_map`` of an index file: tensor name -> file name (both non-empty strings).

    Raises:
        CheckpointFormatError: not a regular file, not JSON, or a ``weight_map`` of another shape.
    """
    raw = read_input(path, what="index file", limit=1 << 28)
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:  # a NUL byte anywhere in it too: JSON has no raw control bytes
        raise _fail(path, f"corrupt index file (not JSON: {str(e)[:120]})", _RESAVE) from None
    try:
        wmap = doc["weight_map"]
    except (KeyError, TypeError, IndexError):
        raise _fail(path, "corrupt index file (no weight_map object)", _RESAVE) from None
    if not isinstance(wmap, dict):
        raise _fail(path, "corrupt index file (weight_map is not an object)", _RESAVE)
    for name, fname in wmap.items():
        if not isinstance(fname, str) or not fname:
            raise _fail(path, f"corrupt index file: weight_map[{name!r:.80}] is {fname!r:.80}, not a file name",
                        _RESAVE)
        if "\x00" in fname:  # os.stat and open raise ValueError on it
            raise _fail(path, f"corrupt index file: weight_map[{name!r:.80}] is {fname!r:.80}, a file name with a "
                              "NUL byte (no file can have one)", _RESAVE)
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise _fail(path, f"weight_map[{name!r:.80}] is {fname!r:.80}, a path outside the checkpoint folder; "
                              "merger reads only files inside it", _RESAVE)
    return wmap


def read_weights_file(path: str | Path) -> dict[str, TensorInfo]:
    """Dispatch on the file name: ``*.safetensors`` or a torch zip (``*.bin``, ``*.pt``)."""
    check_regular(path, what="weights file")
    if str(path).endswith(".safetensors"):
        return read_safetensors(path)
    return read_torch_zip(path)


def read(folder: str | Path, *, key: str | None = None) -> dict[str, TensorInfo]:
    """Tensor layout of a whole checkpoint folder (single file or shards with their index).

    Raises:
        UsageError: a ``key``: a Hugging Face folder holds the model alone.
        CheckpointFormatError: missing shard, a tensor the index lists but its shard lacks, or any
            file-level problem.
    """
    if key is not None:
        raise UsageError(f"--key {key}: {folder} is a Hugging Face checkpoint folder, which holds the model alone",
                         hint="drop --key (it selects the model inside a training checkpoint)")
    folder = Path(folder)
    kind, files = weights_files(folder)
    out: dict[str, TensorInfo] = {}
    for fname in files:
        fpath = folder / fname
        if not fpath.exists():
            raise _fail(folder, f"shard {fname} is listed in {kind} but missing",
                        "re-download the checkpoint (a shard is missing)")
        out.update(read_weights_file(fpath))
    if kind.endswith(".index.json"):
        wmap = read_index(folder / kind)
        for name, fname in wmap.items():
            if name not in out or Path(out[name].path).name != Path(fname).name:
                raise _fail(folder, f"{kind} says tensor {name!r} is in {fname}, but it isn't there", _RESAVE)
    return out


def weight_files(folder: str | Path) -> list[str]:
    """The files that hold the weights (and the index), relative to ``folder``."""
    kind, files = weights_files(folder)
    return files + ([kind] if kind.endswith(".index.json") else [])


def side_files(folder: str | Path) -> tuple[str, ...]:
    """Config and tokenizer files present in ``folder``, copied into the output byte for byte.

    Raises:
        CheckpointFormatError: one is a link out of the checkpoint, or not a regular file (a FIFO,
            a folder): refused, rather than blocking on it, copying outside data or leaving it out.
    """
    folder = Path(folder)
    return tuple(f for f in COPY_FILES
                 if (folder / f).exists() or (folder / f).is_symlink()
                 if contained(folder, f, what="side file").exists())
