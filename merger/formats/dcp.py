"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` + ``__<rank>_<i>.distcp`` files, as
torchtitan (``step-N/``), OLMo-core (``stepN/model_and_optim/``), Megatron's ``torch_dist`` and
Accelerate's FSDP ``SHARDED_STATE_DICT`` save them.

A tensor is saved as chunks (FSDP / tensor-parallel shards) spread over the rank files. Each
chunk is one ``torch.save`` record (a small zip) at a byte range of its ``.distcp`` file; we read
that record's central directory and ``data.pkl`` (``pt_record``: two reads, restricted unpickler,
no object built) to find where the chunk's storage bytes start, and turn the chunk into byte
extents of the global tensor: one extent for a chunk cut along dim 0 (FSDP), one strided extent
(its rows, a fixed stride apart) for a chunk cut along later dims (tensor parallel). Only the
model part is read (``--key``, ``model.`` by default when present): optimizer, scheduler,
dataloader and train-state entries are never touched.

The format module (see ``formats/__init__.py``): :func:`detect`, :func:`read`,
:func:`weight_files`, :func:`side_files`; the output is written back as DCP (``output/dcp.py``).
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

from merger.errors import UsageError
from merger.formats.base import Extent, TensorInfo, check_extents, fail, strided
from merger.formats.inputs import contained, open_input
from merger.formats.dcp_metadata import METADATA, RESAVE, Chunk, DcpMetadata, Entry, read_metadata
from merger.formats.pt_header import StateDictUnpickler, StorageRef, TensorRef, is_contiguous
from merger.formats.pt_record import read_record
from merger.units import SIZES, itemsize

NAME = "dcp"
OUTPUT = "dcp"
# top-level groups of a training state dict that are not the model (torchtitan, OLMo-core, Megatron, Accelerate)
NOT_MODEL = ("optim", "optimizer", "optimizers", "lr_scheduler", "lr_schedulers", "scheduler", "schedulers",
             "dataloader", "data_loader", "train_state", "trainer", "rng_state", "rng", "rng_states", "args",
             "checkpoint_version", "iteration", "num_floating_point_operations_so_far", "opt_param_scheduler",
             "common_state", "rerun_state_machine", "rerun_state_machine_state")
OWN_FILES = ("metadata.json", "common.pt")  # Megatron-Core's: its loader needs them beside .metadata (DCP output only)
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", *OWN_FILES)
# objects (not averaged) a framework's loader needs back: Megatron-Core's common state, in the DCP
# from 0.14 on (common.pt before)
CARRIED = ("common_state",)


def detect(path: str | Path) -> bool:
    """A folder holding a DCP ``.metadata`` file."""
    return (Path(path) / METADATA).is_file()


def group(fqn: str) -> str:
    """The top-level group of an entry: ``model`` for ``model.x.weight``; ``rng_state`` for Megatron's
    ShardedObject ``rng_state/shard_0.0_1.2`` (``<key>/shard_<offsets>_<shape>``)."""
    return fqn.split("/", 1)[0].split(".", 1)[0]


def extra_state(fqn: str) -> bool:
    """A module's ``_extra_state`` (Transformer Engine, Megatron-Core's linears: ``…._extra_state`` or,
    as a Megatron ShardedObject, ``…._extra_state/shard_0_2``): an object, not a weight."""
    return fqn.split("/", 1)[0].endswith("._extra_state")


def _under(fqn: str, key: str) -> bool:
    return fqn == key or fqn.startswith((key + ".", key + "/"))


def model_entries(md: DcpMetadata, key: str | None, where: str | Path) -> list[Entry]:
    """The tensor entries of the model part: under ``key.`` (``--key``; several prefixes separated by
    commas, e.g. Megatron's ``embedding,decoder,output_layer``), else under ``model.`` when there is
    such an entry, else every top-level group but the training state (:data:`NOT_MODEL`). Modules'
    ``_extra_state`` objects in the model part are skipped (there is nothing to average in them).

    Raises:
        UsageError: a ``key`` with no entry under it (names the groups there are).
        CheckpointFormatError: another non-tensor entry inside the model part.
    """
    groups = list(dict.fromkeys(group(f) for f in md.entries))
    if key is not None:
        keys = [k.strip().rstrip(".") for k in key.split(",")]
        for k in keys:
            if not k or not any(_under(f, k) for f in md.entries):
                raise UsageError(f"--key {key}: no entry of {where} starts with {k + '.'!r}",
                                 hint=f"its top-level groups are: {', '.join(groups[:12])}")
        picked = [e for f, e in md.entries.items() if any(_under(f, k) for k in keys)]
    elif any(f.startswith("model.") for f in md.entries):
        picked = [e for f, e in md.entries.items() if f.startswith("model.")]
    else:
        picked = [e for f, e in md.entries.items() if group(f) not in NOT_MODEL]
    picked = [e for e in picked if e.is_tensor or not extra_state(e.fqn)]
    for e in picked:
        if not e.is_tensor:
            raise fail(Path(where) / METADATA, f"entry {e.fqn!r} of the model part is a pickled object, not a "
                                               "tensor; merger averages tensors only",
                       f"choose the part that holds the model's tensors with --key (groups: {', '.join(groups[:12])})")
    if not picked:
        raise fail(Path(where) / METADATA, "holds no model tensors",
                   f"choose the part that holds the model with --key (groups: {', '.join(groups[:12])})")
    return picked


def carried_objects(md: DcpMetadata, key: str | None, where: str | Path) -> list[Entry]:
    """The entries an output carries over as they are (from ``md``, the latest input's metadata,
    read from ``where``): the model part's ``_extra_state`` objects and :data:`CARRIED` groups,
    which a framework's loader asks for (Megatron-Core's ``dist_checkpointing.load`` wants every
    ``_extra_state`` its model has). Pickled bytes with one record each; nothing to average in them."""
    model = {e.fqn for e in model_entries(md, key, where)}
    prefixes = {f.split("/", 1)[0].rsplit(".", 2)[0] for f in model}  # the modules the model part has
    return [e for f, e in md.entries.items() if not e.is_tensor and len(e.chunks) == 1 and e.chunks[0].file
            and (group(f) in CARRIED or extra_state(f) and any(f.startswith(p) for p in prefixes))]


def _chunk_data(fd: int, path: str, chunk: Chunk, name: str, dtype: str, memo: dict[bytes, object]) -> int:
    """File offset of the chunk's first storage byte, read from its ``torch.save`` record
    (``pt_record``: its end records, central directory and data.pkl, two reads).

    Raises:
        CheckpointFormatError: not a torch zip record (or one torch would read otherwise: see
            ``pt_record``), another dtype or shape than the metadata says, a non-contiguous chunk,
            a storage member of another size than its record says, a chunk that ends past it.
    """
    where = f"{path} (tensor {name!r}, chunk at {list(chunk.offsets)})"
    ref, offsets, sizes = read_record(fd, chunk.offset, chunk.length, where, what="the chunk's record", hint=RESAVE,
                                      unpickler=StateDictUnpickler, memo=memo)
    if not isinstance(ref, TensorRef) or not isinstance(ref.storage, StorageRef):
        raise fail(where, "the chunk's record holds no tensor", RESAVE)
    if ref.storage.key not in offsets:
        raise fail(where, "the chunk's storage is missing inside its record", RESAVE)
    if ref.storage.dtype != dtype or tuple(ref.shape) != chunk.sizes:
        raise fail(where, f"the record holds a {ref.storage.dtype} {list(ref.shape)}, the metadata says "
                          f"{dtype} {list(chunk.sizes)}", RESAVE)
    if math.prod(ref.shape) > 1 and not is_contiguous(ref.shape, ref.stride):
        raise fail(where, f"the chunk is not contiguous (stride {list(ref.stride)})",
                   "re-save the checkpoint from contiguous tensors")
    isize = itemsize(dtype)
    held = sizes[ref.storage.key]
    if held != ref.storage.numel * isize:  # torch.load refuses such a record too
        raise fail(where, f"the chunk's storage holds {held} bytes, its record says {ref.storage.numel * isize}",
                   RESAVE)
    data = offsets[ref.storage.key] + ref.storage_offset * isize
    if (ref.storage_offset + math.prod(chunk.sizes)) * isize > held \
            or data + math.prod(chunk.sizes) * isize > chunk.offset + chunk.length:
        raise fail(where, "the chunk's bytes run past the end of its record", RESAVE)
    return data


def chunk_extents(path: str, data: int, size: tuple[int, ...], chunk: Chunk, isize: int) -> list[Extent]:
    """The extents of a chunk of the global tensor ``size`` whose C-contiguous bytes start at ``data``.

    A chunk whose dims after ``d`` are whole is ``prod(sizes[:d])`` runs of ``prod(sizes[d:])``
    elements: one run for a chunk cut along dim 0; for a chunk cut along columns, one strided extent
    (a run per row, a fixed stride apart) for each index of the dims before the last cut dim ``k < d``
    (one extent for a 2-d tensor, or when the dims between ``k`` and ``d`` are whole).
    """
    nd = len(size)
    if nd == 0:
        return [Extent(path, data, 0, isize)]
    if math.prod(chunk.sizes) == 0:
        return []
    d = _cut_dim(size, chunk)
    run = math.prod(chunk.sizes[d:]) * isize
    tstride = [math.prod(size[j + 1:]) * isize for j in range(nd)]
    base = sum(chunk.offsets[j] * tstride[j] for j in range(d, nd))
    if d == 0:
        return [Extent(path, data, base, run)]
    k = d - 1  # dims k..d-1 are the rows of one strided extent: those after k are whole
    while k > 0 and chunk.offsets[k] == 0 and chunk.sizes[k] == size[k]:
        k -= 1
    rows = math.prod(chunk.sizes[k:d])
    base += sum(chunk.offsets[j] * tstride[j] for j in range(k, d))
    out = []
    for i, idx in enumerate(itertools.product(*(range(chunk.sizes[j]) for j in range(k)))):
        start = base + sum((chunk.offsets[j] + idx[j]) * tstride[j] for j in range(k))
        out.append(strided(path, data + i * rows * run, start, run, rows, tstride[d - 1]))
    return out


def _cut_dim(size: tuple[int, ...], chunk: Chunk) -> int:
    """``d``: the chunk holds every element of the dims after ``d``, so it is ``prod(sizes[:d])``
    runs of bytes in the whole C-contiguous tensor (``size``: at least one dim)."""
    d = len(size) - 1
    while d > 0 and chunk.offsets[d] == 0 and chunk.sizes[d] == size[d]:
        d -= 1
    return d


def coalesce(extents: list[Extent]) -> tuple[Extent, ...]:
    out: list[Extent] = []
    for e in sorted(extents, key=lambda e: (e.start, e.nbytes)):
        p = out[-1] if out else None
        if p and p.rows == e.rows == 1 and p.path == e.path and p.offset + p.nbytes == e.offset \
                and p.start + p.nbytes == e.start:
            out[-1] = Extent(p.path, p.offset, p.start, p.nbytes + e.nbytes)
        else:
            out.append(e)
    return tuple(out)


def _open(folder: Path, file: str, name: str, needed: int = 1) -> tuple[int, int, str]:
    """(fd, size, path) of the ``.distcp`` file that tensor ``name`` has a chunk in: a regular file
    inside the checkpoint (the metadata names it; a name or link that leads elsewhere is refused).
    ``needed``: how many files are open at once with it (out of file descriptors, the error says)."""
    fpath = contained(folder, file, what="storage file", hint=RESAVE)
    if not fpath.exists():
        raise fail(fpath, f"is missing: tensor {name!r} has a chunk in it (a rank's file was not copied or was "
                          "deleted)", "copy the whole checkpoint folder, every __<rank>_<i>.distcp file")
    fd = open_input(fpath, what="storage file", needed=needed)
    return fd, os.fstat(fd).st_size, str(fpath)


def _chunk_at(folder: Path, e: Entry, c: Chunk, files: dict[str, tuple[int, int, str]], ends: dict[str, int],
              memo: dict[bytes, object], needed: int = 1) -> tuple[str, int] | None:
    """(file, offset of its first byte) of chunk ``c`` of tensor ``e``, checked; None for an empty chunk."""
    if len(c.offsets) != len(e.shape) or len(c.sizes) != len(e.shape) or any(
            o < 0 or s < 0 or o + s > n for o, s, n in zip(c.offsets, c.sizes, e.shape)):
        raise fail(folder / METADATA, f"tensor {e.fqn!r}: chunk at {list(c.offsets)} size {list(c.sizes)} lies "
                                      f"outside its shape {list(e.shape)}", RESAVE)
    if math.prod(c.sizes) == 0 and e.shape:
        return None
    if c.file is None:
        raise fail(folder / METADATA, f"tensor {e.fqn!r}: chunk at {list(c.offsets)} has no storage record",
                   RESAVE)
    if c.transforms:
        raise fail(folder / c.file, f"tensor {e.fqn!r} is stored with DCP transforms "
                                    f"({', '.join(c.transforms)}, e.g. zstd compression), which merger "
                                    "doesn't decode", "re-save the checkpoint without compression "
                                                      "(FileSystemWriter without _extensions)")
    if c.file not in files:
        files[c.file] = _open(folder, c.file, e.fqn, needed)
    fd, size, fpath = files[c.file]
    if c.offset < 0 or c.length <= 0 or c.offset + c.length > size:
        raise fail(fpath, f"is shorter than the metadata says: tensor {e.fqn!r} has a chunk at bytes "
                          f"{c.offset}..{c.offset + c.length}, the file has {size} bytes "
                          "(truncated, or a partial copy)", "copy the checkpoint again, or re-save it")
    if size < ends.get(c.file, 0):  # any record, the optimizer's too: checked, never read
        raise fail(fpath, f"is shorter than the metadata says: it has {size} bytes, its records "
                          f"(tensor {e.fqn!r} has a chunk in it) end at byte {ends[c.file]} (truncated, "
                          "or a partial copy)", "copy the checkpoint again, or re-save it")
    return fpath, _chunk_data(fd, fpath, c, e.fqn, e.dtype, memo)


def chunk_name(fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> str:
    """How a chunk merged on its own is named: ``model.w[0:6,4:8]``."""
    return f"{fqn}[{','.join(f'{o}:{o + s}' for o, s in zip(offsets, sizes))}]"


def _tensors(folder: Path, e: Entry, split: bool, files: dict[str, tuple[int, int, str]], ends: dict[str, int],
             memo: dict[bytes, object], needed: int = 1) -> list[TensorInfo]:
    """Tensor ``e`` as the extents of its chunks; with ``split``, each chunk as a tensor of its own
    (one extent: its record's storage). Either way the chunks must tile ``e`` exactly."""
    if e.dtype is None:
        raise fail(folder / METADATA, f"tensor {e.fqn!r} has a dtype merger doesn't know", RESAVE)
    isize = itemsize(e.dtype)
    extents: list[Extent] = []
    out = []
    for c in e.chunks:
        at = _chunk_at(folder, e, c, files, ends, memo, needed)
        if at is None:
            continue
        if split:
            sizes, offsets = tuple(c.sizes), tuple(c.offsets)
            extent = Extent(at[0], at[1], 0, math.prod(sizes) * isize)
            out.append(TensorInfo(chunk_name(e.fqn, offsets, sizes), e.dtype, sizes, (extent,),
                                  chunk=(e.fqn, offsets, e.shape)))
        else:
            extents += chunk_extents(at[0], at[1], e.shape, c, isize)
    if split:
        _check_grid(folder, e)
        return out
    t = TensorInfo(e.fqn, e.dtype, e.shape, coalesce(extents))
    check_extents(t, f"{folder} ({', '.join(sorted({c.file for c in e.chunks if c.file}))})")
    return [t]


def _check_grid(folder: Path, e: Entry) -> None:
    """The chunks of ``e`` tile it exactly: every cell of the grid their edges make is in one chunk."""
    nd = len(e.shape)
    cuts = [sorted({0, n, *(c.offsets[d] for c in e.chunks), *(c.offsets[d] + c.sizes[d] for c in e.chunks)})
            for d, n in enumerate(e.shape)]
    index = [{v: i for i, v in enumerate(cd)} for cd in cuts]
    seen: set[tuple[int, ...]] = set()
    for c in e.chunks:
        if math.prod(c.sizes) == 0:
            continue
        for cell in itertools.product(*(range(index[d][c.offsets[d]], index[d][c.offsets[d] + c.sizes[d]])
                                        for d in range(nd))):
            if cell in seen:
                raise fail(folder / METADATA, f"tensor {e.fqn!r}: its chunk at {list(c.offsets)} overlaps another "
                                              "(chunks don't tile the tensor)", RESAVE)
            seen.add(cell)
    if len(seen) != math.prod(len(cd) - 1 for cd in cuts):
        missing = next(cell for cell in itertools.product(*(range(len(cd) - 1) for cd in cuts)) if cell not in seen)
        raise fail(folder / METADATA, f"tensor {e.fqn!r}: elements from {[cuts[d][i] for d, i in enumerate(missing)]} "
                                      "are missing (chunks don't tile the tensor)", RESAVE)


def _runs(shape: tuple[int, ...], c: Chunk) -> int:
    """How many runs of bytes chunk ``c`` is in the whole C-contiguous tensor (see :func:`chunk_extents`)."""
    if not shape or math.prod(c.sizes) == 0:
        return 1
    return math.prod(c.sizes[:_cut_dim(shape, c)])


def strided_grids(path: str | Path, key: str | None = None) -> dict[str, tuple]:
    """The model tensors with a chunk that is more than one run of bytes in the whole tensor (cut
    along an inner dim, as tensor parallelism cuts): fqn -> (shape, dtype, the chunks' (offsets,
    sizes), sorted). Merging such a tensor chunk by chunk (``read(split=...)``) reads each chunk as one
    run of bytes, where the whole tensor is read a row of every chunk at a time (strided extents)."""
    folder = Path(path)
    entries, ends = _model_part(folder, key)
    if (identity := _identity(folder)) is not None:
        _PARTS[(identity, key)] = entries, ends  # the read() that follows parses it no more
    return {e.fqn: (e.shape, e.dtype, tuple(sorted((tuple(c.offsets), tuple(c.sizes)) for c in e.chunks)))
            for e in entries if e.is_tensor and any(_runs(e.shape, c) > 1 for c in e.chunks)}


def _prefetch(folder: Path, entries: list[Entry], files: dict[str, tuple[int, int, str]], needed: int) -> None:
    """Ask the kernel for every chunk record's head and tail at once (``POSIX_FADV_WILLNEED``), before
    they are read one by one: from a cold disk the reads overlap instead of each waiting its turn."""
    if not hasattr(os, "posix_fadvise"):
        return
    for e in entries:
        for c in e.chunks:
            if not c.file or c.length <= 0 or c.offset < 0:
                continue
            if c.file not in files:
                files[c.file] = _open(folder, c.file, e.fqn, needed)
            fd = files[c.file][0]
            head, tail = SIZES.record_head, SIZES.record_tail  # what read_record reads first
            os.posix_fadvise(fd, c.offset, min(c.length, head), os.POSIX_FADV_WILLNEED)
            if c.length > head:
                os.posix_fadvise(fd, c.offset + c.length - tail, tail, os.POSIX_FADV_WILLNEED)


def read(path: str | Path, *, key: str | None = None, split: frozenset[str] = frozenset()) -> dict[str, TensorInfo]:
    """The model part of a DCP folder, each tensor as the extents of its chunks.

    Args:
        path: the folder holding ``.metadata``.
        key: the prefix of the model's entries (``model``); None: ``model.`` when present, else every
            group but the training state.
        split: tensors given chunk by chunk, each chunk a tensor of its own (:func:`chunk_name`,
            ``TensorInfo.chunk``): for a DCP output of inputs that share their chunks
            (:func:`strided_grids`, ``plan/build.py``).

    Raises:
        CheckpointFormatError: an unsafe or broken ``.metadata``, a missing or short ``.distcp`` file,
            chunks that miss or overlap, compressed chunks.
        UsageError: a ``key`` with no entry under it.
    """
    folder = Path(path)
    identity = _identity(folder)
    entries, ends = _PARTS.pop((identity, key), None) or _model_part(folder, key)
    files: dict[str, tuple[int, int, str]] = {}  # .distcp file -> (fd, size, path), each opened once
    needed = len({c.file for e in entries for c in e.chunks if c.file})  # open at once: every rank's file
    try:
        _prefetch(folder, entries, files, needed)
        memo: dict[bytes, object] = {}
        out = {t.name: t for e in entries for t in _tensors(folder, e, e.fqn in split, files, ends, memo, needed)}
    finally:
        for fd, _, _ in files.values():
            os.close(fd)
    if identity is not None:
        _READ_FILES[identity] = [METADATA, *sorted({c.file for e in entries for c in e.chunks if c.file})]
    return out


# folder's .metadata identity -> the files its last read() took chunks from: weight_files() answers
# from it instead of parsing .metadata again (0.02 s a revision at 410m with AdamW state)
_READ_FILES: dict[tuple, list[str]] = {}
# (identity, key) -> the model part strided_grids() parsed, taken by the read() that follows it
_PARTS: dict[tuple, tuple[list[Entry], dict[str, int]]] = {}


def _model_part(folder: Path, key: str | None) -> tuple[list[Entry], dict[str, int]]:
    """The model part's entries and where each ``.distcp`` file's records end."""
    md = read_metadata(folder)
    return model_entries(md, key, folder), md.file_ends


def _identity(folder: Path) -> tuple | None:
    """Which ``.metadata`` this is (path, inode, size, mtime); None if it can't be stat'ed (then
    nothing is cached for it, and reading it says why)."""
    try:
        st = os.stat(folder / METADATA)
    except OSError:
        return None
    return os.path.realpath(folder), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def weight_files(path: str | Path) -> list[str]:
    """``.metadata`` and the ``.distcp`` files that hold model chunks, relative to ``path``: those
    :func:`read` took chunks from (its ``key``) when it read this ``.metadata``, else those of the
    default model part."""
    known = _READ_FILES.get(_identity(Path(path)))
    if known is not None:
        return list(known)
    md = read_metadata(path)
    files = {c.file for e in model_entries(md, None, path) for c in e.chunks if c.file}
    return [METADATA, *sorted(files)]


def storage_files(path: str | Path, key: str | None = None) -> list[str]:
    """The ``.distcp`` files that hold the model part (``key``): what reading it opens at once."""
    md = read_metadata(path)
    return sorted({c.file for e in model_entries(md, key, path) for c in e.chunks if c.file})


def side_files(path: str | Path) -> tuple[str, ...]:
    """Config and tokenizer files next to ``.metadata`` (some exports keep them there), copied as they are."""
    return tuple(f for f in COPY_FILES if (Path(path) / f).is_file())
