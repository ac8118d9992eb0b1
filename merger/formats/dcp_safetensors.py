"""torch.distributed.checkpoint saved as sharded safetensors: ``HuggingFaceStorageWriter(path,
save_distributed=True)`` without consolidation, as NeMo AutoModel saves and as torchtitan's HF
saves leave in ``sharded/``.

Every rank writes ``shard-<rank>-model-<i>-of-<n>.safetensors``: its slices of the tensors, under
their full names, with ``__metadata__["DCP_SHARDING_INFO"]`` (JSON) giving each slice's offsets in
the whole tensor. There is no ``.metadata`` and no index. merger reads such a folder as torch's
``HuggingFaceStorageReader`` does: every ``*.safetensors`` file in it; a tensor's size is the
furthest any of its slices reaches; a file without sharding info holds whole tensors. Each slice
is read where it lies (its rows are byte runs of its file), and the slices must tile the tensor:
a gap, an overlap or slices of different dtypes is a clear error (torch would leave the gap
uninitialised, or convert the dtype silently).

The model part: every tensor but the training state's groups (``optim.``, ... as in ``dcp.py``);
``--key`` picks prefixes. The default output is flat safetensors with the same names (consolidated:
what ``consolidate_safetensors_files`` makes, which transformers, ``HuggingFaceStorageReader`` and
the frameworks' converters read).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from merger.errors import UsageError
from merger.formats.base import TensorInfo, check_extents, fail
from merger.formats.dcp import NOT_MODEL, chunk_extents, coalesce, group
from merger.formats.dcp_metadata import Chunk
from merger.formats.inputs import contained
from merger.formats.safetensors import read_safetensors_header
from merger.units import itemsize

NAME = "dcp_safetensors"
OUTPUT = "safetensors"
INFO = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
SAVED_OFFSETS = "saved_offsets"
SUFFIX = ".safetensors"
SHARD_FILE = re.compile(r"^shard-(\d+)-model-\d+-of-\d+\.safetensors$")  # shard-<rank + 1>-model-<i>-of-<n>
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model")
RESAVE = "the checkpoint is incomplete or corrupt: copy it again, or re-save it with dcp.save"


def detect(path: str | Path) -> bool:
    """A folder of ``shard-*-model-*-of-*.safetensors`` files and no Hugging Face index or weights."""
    from merger.formats.hf_folder import WEIGHT_FILES

    p = Path(path)
    if not p.is_dir() or any((p / f).exists() for f in WEIGHT_FILES):
        return False
    return any(SHARD_FILE.match(f.name) for f in p.iterdir())


def _files(folder: Path) -> list[str]:
    """Every ``*.safetensors`` file of the folder, as torch's reader takes them (not only shard-*).

    Raises:
        CheckpointFormatError: the ranks' numbers have a gap (a rank's file is missing: torch's
            reader would leave its slices uninitialised). A missing last rank can't be told from
            the files; the tensors' shapes then differ from the other revisions', which is refused.
    """
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(SUFFIX))
    ranks = {int(m.group(1)) for m in map(SHARD_FILE.match, names) if m}
    gap = next((r for r in range(1, max(ranks, default=0)) if r not in ranks), None)
    if gap is not None:
        raise fail(folder, f"has no shard-{gap:05d}-model-*.safetensors file, though rank files up to "
                           f"shard-{max(ranks):05d} are there: a rank's file is missing",
                   "copy the whole checkpoint folder, every rank's shard-*.safetensors file")
    return names


def _offsets(meta: dict[str, str], path: Path) -> dict | None:
    if INFO not in meta:
        return None
    try:
        info = json.loads(meta[INFO])
    except ValueError as e:
        raise fail(path, f"its {INFO} metadata is not JSON ({e})", RESAVE) from None
    if not isinstance(info, dict):
        raise fail(path, f"its {INFO} metadata is not a JSON object", RESAVE)
    return info


def _slice_offsets(info: dict | None, name: str, shape: tuple[int, ...], path: Path) -> tuple[int, ...]:
    if info is None:
        return (0,) * len(shape)
    entry = info.get(name)
    offs = entry.get(SAVED_OFFSETS) if isinstance(entry, dict) else None
    if not isinstance(offs, list) or len(offs) != len(shape) or not all(type(o) is int and o >= 0 for o in offs):
        raise fail(path, f"tensor {name!r}: its {INFO} entry {entry!r:.80} gives no saved_offsets for its "
                         f"{len(shape)} dims (torch's reader fails on it too)", RESAVE)
    return tuple(offs)


def _wanted(name: str, keys: list[str] | None) -> bool:
    if keys is None:
        return group(name) not in NOT_MODEL
    return any(name == k or name.startswith(k + ".") for k in keys)


def read(path: str | Path, *, key: str | None = None) -> dict[str, TensorInfo]:
    """The model part of a sharded-safetensors DCP folder, each tensor as the extents of its slices.

    Raises:
        CheckpointFormatError: a broken file or sharding info, slices that miss, overlap or disagree
            on dtype, no tensors.
        UsageError: a ``key`` with no tensor under it.
    """
    folder = Path(path)
    keys = [k.strip().rstrip(".") for k in key.split(",") if k.strip()] if key is not None else None
    slices: dict[str, list[tuple[str, str, tuple[int, ...], tuple[int, ...], int]]] = {}
    names: list[str] = []
    for f in _files(folder):
        fpath = contained(folder, f, what="shard file", hint=RESAVE)
        tensors, meta = read_safetensors_header(fpath)
        info = _offsets(meta, fpath)
        for name, t in tensors.items():
            names.append(name)
            if _wanted(name, keys):
                slices.setdefault(name, []).append((str(fpath), t.dtype, t.shape,
                                                    _slice_offsets(info, name, t.shape, fpath), t.extents[0].offset))
    if keys is not None:
        for k in keys:
            if not any(n == k or n.startswith(k + ".") for n in names):
                groups = list(dict.fromkeys(group(n) for n in names))
                raise UsageError(f"--key {key}: no tensor of {folder} starts with {k + '.'!r}",
                                 hint=f"its top-level groups are: {', '.join(groups[:12])}")
    if not slices:
        raise fail(folder, "holds no model tensors in its .safetensors files", RESAVE)
    return {name: _tensor(name, parts) for name, parts in slices.items()}


def _tensor(name: str, parts) -> TensorInfo:
    dtypes = {dt for _, dt, _, _, _ in parts}
    where = ", ".join(sorted({Path(p).name for p, *_ in parts}))
    if len(dtypes) > 1:
        raise fail(Path(parts[0][0]).parent, f"tensor {name!r} has slices of different dtypes "
                                             f"({', '.join(sorted(dtypes))}) in {where}", RESAVE)
    ranks = {len(shape) for _, _, shape, _, _ in parts}
    if len(ranks) > 1:
        raise fail(Path(parts[0][0]).parent, f"tensor {name!r} has slices of different ranks in {where}", RESAVE)
    dtype = dtypes.pop()
    size = tuple(max(offs[d] + shape[d] for _, _, shape, offs, _ in parts) for d in range(ranks.pop()))
    isize = itemsize(dtype)
    extents = []
    for path, _, shape, offs, data in parts:
        extents += chunk_extents(path, data, size, Chunk(offs, shape, None), isize)
    t = TensorInfo(name, dtype, size, coalesce(extents))
    check_extents(t, f"{Path(parts[0][0]).parent} ({where})")
    return t


def weight_files(path: str | Path) -> list[str]:
    """The ``.safetensors`` files (each holds slices of the model)."""
    return _files(Path(path))


def side_files(path: str | Path) -> tuple[str, ...]:
    """Config and tokenizer files beside the shards, copied as they are."""
    return tuple(f for f in COPY_FILES if (Path(path) / f).is_file())
