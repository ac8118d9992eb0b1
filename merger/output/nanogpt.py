"""The ``nanogpt`` output: ``OUT/ckpt.pt``, a ``torch.save`` training checkpoint like its inputs
(nanoGPT / LAWA ``ckpt_<step>.pt``, Lightning ``.ckpt``, flat state dicts), so that training and
sampling can resume from the average.

The file holds the averaged model where the latest input holds it (``model`` for nanoGPT, the
same key names, dtypes and tied tensors), and the latest input's plain top-level entries
(``model_args``, ``iter_num``, ``config``, Lightning's ``epoch``/``global_step``...), but no
optimizer or scheduler state. It loads with ``torch.load(path, weights_only=True)``.

Memory stays bounded: ``torch.save`` writes the zip's structure under
``torch.serialization.skip_data()`` over tensors made with ``torch.empty`` (never touched, so
never resident), which leaves each storage's bytes as a hole; the averaged bytes are then copied
into those holes from the engine's safetensors shards, ``SIZES.copy_piece`` bytes at a time. The holes are
found by reading the new file's header back with the same reader the inputs went through.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections import OrderedDict
from pathlib import Path

from merger.errors import OutputError
from merger.formats import read_checkpoint
from merger.formats.pt_header import read_header, to_plain
from merger.formats.reading import read_extents
from merger.formats.torch_pt import checkpoint_file, find_model, meta, model_entries
from merger.output.crc import region_crc
from merger.output.shards import pwrite_all
from merger.units import SIZES, itemsize

FILE = "ckpt.pt"


def _shard_files(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("model*.safetensors")) + sorted(tmp.glob("model.safetensors.index.json"))


def _source(plan):
    """The latest input's header, and where its model lies in it.

    Raises:
        OutputError: the latest input isn't a torch training checkpoint on disk.
    """
    src = plan.sources[-1].path
    if src is None or not Path(src).exists():
        raise OutputError("--to nanogpt needs the latest input on disk", hint="use --to hf")
    try:
        header = read_header(checkpoint_file(src))
        where, entries = model_entries(header, plan.options.key)
    except Exception as e:  # noqa: BLE001 - an input of another format
        raise OutputError(f"--to nanogpt: the latest input {src} is not a torch training checkpoint ({e})",
                          hint="use --to hf or --to safetensors for other inputs") from None
    return header, where, entries


def check(plan) -> None:
    """Before anything is read: the latest input is a torch training checkpoint.

    Raises:
        OutputError: it isn't.
    """
    _source(plan)


def write(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` as ``tmp/ckpt.pt`` (see the module docstring).

    Raises:
        OutputError: the latest input isn't a torch training checkpoint.
    """
    import torch
    from torch.serialization import skip_data

    from merger.units import dtype_from_name

    src = plan.sources[-1].path
    header, where, entries = _source(plan)
    merged = read_checkpoint(tmp)  # the engine's shards: name -> extents
    made: dict[str, torch.Tensor] = {}
    model = OrderedDict()
    for name, same in entries:
        if same not in made:
            t = merged[same]
            made[same] = torch.empty(t.shape, dtype=dtype_from_name(t.dtype))  # untouched: not resident
        model[name] = made[same]
    obj: object = model
    for k in reversed(where):
        obj = {k: obj}
    if where:
        obj = {**to_plain(meta(header, where)), **obj}
        order = list(header.tree)  # the input's top-level order
        obj = dict(sorted(obj.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    out = tmp / FILE
    with skip_data():
        torch.save(obj, out)
    written = read_header(out)
    sd = find_model(written.tree, ".".join(where) if where else None, out)[1]
    fds = {p: os.open(p, os.O_RDONLY) for p in {e.path for t in merged.values() for e in t.extents}}
    fd = os.open(out, os.O_RDWR)
    meant: list[tuple[str, int, int, int]] = []  # (tensor, offset, bytes, CRC-32 of what was written)
    try:
        for name in made:
            info, ref = merged[name], sd[name]
            at = written.offsets[ref.storage.key] + ref.storage_offset * itemsize(info.dtype)
            buf = bytearray(min(SIZES.copy_piece, max(info.nbytes, 1)))
            crc = 0
            for start in range(0, info.nbytes, len(buf)):
                n = min(len(buf), info.nbytes - start)
                view = memoryview(buf)[:n]
                read_extents(fds, info.extents, start, view)
                pwrite_all(fd, view, n, at + start)  # a short write (a full disk) is retried, or raises
                crc = zlib.crc32(view, crc)
            meant.append((name, at, info.nbytes, crc))
        for name, at, n, crc in meant:  # before publishing: the file holds what was meant, byte for byte
            if region_crc(fd, at, n) != crc:
                raise OutputError(f"{out}: tensor {name!r} reads back other bytes than were written into it "
                                  f"({n} bytes at {at}): the disk or filesystem lost a write",
                                  hint="check free disk space and the filesystem, then run again")
    finally:
        os.close(fd)
        for f in fds.values():
            os.close(f)
    for p in _shard_files(tmp):
        p.unlink()
    files = [FILE]
    side = _nanochat_meta(Path(src))
    if side is not None:
        shutil.copyfile(side, tmp / side.name)
        files.append(side.name)
    return files


def _nanochat_meta(src: Path) -> Path | None:
    """nanochat's ``meta_<step>.json`` next to ``model_<step>.pt`` (copied byte for byte)."""
    if src.is_file() and src.stem.startswith("model_"):
        m = src.with_name("meta_" + src.stem[len("model_"):] + ".json")
        return m if m.is_file() else None
    return None


__all__ = ["FILE", "write"]
