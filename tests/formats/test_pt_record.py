"""One ``torch.save`` record at a byte range of a file (``formats/pt_record.py``), the way DCP chunks
lie in ``.distcp`` files: read by its central directory, as torch's zip reader (miniz) reads it.

Records written by ``torch.save`` read back exactly, at the offsets ``zipfile`` finds, in at most
two reads; records rewritten by Python's ``zipfile`` with data descriptors (flag bit 3) or zip64
fields, and records hand-built (:func:`build`) so that their local headers disagree with their
central directory, read as ``torch.load`` reads the same bytes (DCP's reader calls
``torch.load(..., map_location="cpu", weights_only=True)`` on the record), or are refused with a
clear error; never read where torch refuses them, never read differently. Cases go through
merger's DCP reader on a one-chunk DCP folder whose ``.metadata`` is pickled from torch's own classes.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)

from helpers.crafted import build, members
from merger.errors import CheckpointFormatError
from merger.formats import pt_record
from merger.formats.dcp import read
from merger.formats.pt_header import TensorRef
from merger.formats.pt_record import read_record

A = b"archive/"


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def edit(ms: list[dict], member: bytes, **change) -> list[dict]:
    return [{**m, **change} if m["name"] == A + member else m for m in ms]


def torch_reads(record: bytes):
    """What DCP's reader gets from the record: a tensor, or the exception torch raises."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(record), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal counts
        return e


def dcp_folder(root: Path, record: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> Path:
    """A DCP folder of one tensor ``model.w`` in one chunk: ``record`` at byte 5 of ``__0_0.distcp``."""
    root.mkdir(parents=True)
    (root / "__0_0.distcp").write_bytes(b"junk!" + record + b"next record")
    at = torch.Size([0] * len(shape))
    md = Metadata(
        state_dict_metadata={"model.w": TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape),
                                                              [ChunkStorageMetadata(at, torch.Size(shape))])},
        storage_data={MetadataIndex("model.w", at): _StorageInfo("__0_0.distcp", 5, len(record))})
    (root / ".metadata").write_bytes(pickle.dumps(md))
    return root


def merger_reads(folder: Path):
    """The tensor merger's DCP reader finds, assembled from its extents, or the error it raises."""
    try:
        t = read(folder)["model.w"]
    except CheckpointFormatError as e:
        return e
    buf = bytearray(t.nbytes)
    with open(t.path, "rb") as f:
        for e in t.extents:
            f.seek(e.offset)
            buf[e.start: e.start + e.nbytes] = f.read(e.nbytes)
    return t.dtype, t.shape, bytes(buf)


def agree(tmp_path: Path, record: bytes, dtype=torch.float32, shape=(3, 4)) -> str:
    """"same" (merger reads what torch reads), "refused" (both refuse) or "refused, torch reads"."""
    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    ours, theirs = merger_reads(dcp_folder(folder, record, dtype, shape)), torch_reads(record)
    if isinstance(ours, CheckpointFormatError):
        assert str(ours).startswith(str(folder / "__0_0.distcp")) and ours.hint, ours
        return "refused" if isinstance(theirs, Exception) else "refused, torch reads"
    assert not isinstance(theirs, Exception), f"merger reads a record torch refuses ({theirs})"
    want = theirs.contiguous().view(torch.uint8).numpy().tobytes() if theirs.numel() else b""
    assert ours == (str(theirs.dtype).removeprefix("torch."), tuple(theirs.shape), want), "merger reads other bytes"
    return "same"


def refusal(tmp_path: Path, record: bytes) -> str:
    err = merger_reads(dcp_folder(tmp_path / "refused", record, torch.float32, (3, 4)))
    assert isinstance(err, CheckpointFormatError), "merger read it"
    return str(err)


T = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 1.5


# -- records torch and zipfile write -------------------------------------------------------------

def test_torch_save_records_read_back_exactly_where_zipfile_finds_their_storages(tmp_path, monkeypatch):
    objs = [T, torch.tensor(2.5, dtype=torch.bfloat16), torch.arange(7), torch.randn(300, 40).half(),
            torch.zeros(0, 3), torch.tensor([True, False]), {"a": torch.ones(5), "b": [torch.arange(3.0)]}]
    records = [saved(o) for o in objs]
    path = tmp_path / "x.distcp"
    path.write_bytes(b"junk" + b"".join(records))  # back to back, as DCP writes them
    reads = []
    real = os.pread
    monkeypatch.setattr(pt_record.os, "pread", lambda fd, n, at: reads.append((at, n)) or real(fd, n, at))
    fd = os.open(path, os.O_RDONLY)
    try:
        start = 4
        for obj, rec in zip(objs, records):
            reads.clear()
            tree, offsets, sizes = read_record(fd, start, len(rec), path)
            spans = sorted(reads)  # at most two reads, inside the record, none of a byte read before
            assert len(spans) <= 2 and start <= spans[0][0] and sum(spans[-1]) <= start + len(rec), spans
            assert len(spans) == 1 or sum(spans[0]) <= spans[1][0], spans
            z = zipfile.ZipFile(io.BytesIO(rec))
            tensors = {"": obj} if isinstance(obj, torch.Tensor) else {"a": obj["a"], "b": obj["b"][0]}
            refs = {"": tree} if isinstance(tree, TensorRef) else {"a": tree["a"], "b": tree["b"][0]}
            assert len(offsets) == len(sizes) == len(tensors)
            for k, t in tensors.items():
                ref = refs[k]
                assert (ref.storage.dtype, ref.shape) == (str(t.dtype).removeprefix("torch."), tuple(t.shape))
                info = z.getinfo(f"archive/data/{ref.storage.key}")
                n_name, n_extra = struct.unpack("<HH", rec[info.header_offset + 26: info.header_offset + 30])
                assert offsets[ref.storage.key] == start + info.header_offset + 30 + n_name + n_extra
                assert sizes[ref.storage.key] == info.file_size == t.numel() * t.element_size()
                want = t.reshape(-1).view(torch.uint8).numpy().tobytes()
                assert real(fd, info.file_size, offsets[ref.storage.key]) == want
            start += len(rec)
    finally:
        os.close(fd)


class _Stream(io.RawIOBase):
    """A write-only stream that can't seek: zipfile then writes data descriptors (flag bit 3)."""

    def __init__(self):
        self.buf = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.buf += b
        return len(b)


def rewritten(record: bytes, *, force_zip64: bool = False) -> bytes:
    """``record``'s members written again by Python's zipfile to a stream that can't seek."""
    out = _Stream()
    with zipfile.ZipFile(out, "w") as z:
        for m in members(record):
            with z.open(zipfile.ZipInfo(m["name"].decode()), "w", force_zip64=force_zip64) as f:
                f.write(m["data"])
    return bytes(out.buf)


@pytest.mark.parametrize("force_zip64", [False, True])
def test_records_with_data_descriptors_and_zip64_local_headers(tmp_path, force_zip64):
    rec = rewritten(saved(T), force_zip64=force_zip64)
    infos = zipfile.ZipFile(io.BytesIO(rec)).infolist()
    assert all(i.flag_bits & 8 for i in infos)  # local sizes 0, the truth in descriptors and the directory
    # data.pkl's local header: sizes 0, or 0xFFFFFFFF with the (zero) sizes in a zip64 extra field
    assert struct.unpack_from("<L", rec, 18)[0] == (0xFFFFFFFF if force_zip64 else 0)
    assert agree(tmp_path, rec) == "same"


@pytest.mark.parametrize("zip64_end", [True, False])
def test_zip64_central_directory_fields(tmp_path, zip64_end):
    """Every size and offset 0xFFFFFFFF in the directory, the values in zip64 extra fields."""
    rec = build([{**m, "zip64": True, "flags": 8} for m in members(saved(T))], zip64_end=zip64_end)
    assert rec.count(b"\xff\xff\xff\xff") >= 3 * 7
    assert agree(tmp_path, rec) == "same"


# -- local headers that disagree with the central directory: read as torch reads them ------------

@pytest.mark.parametrize("change", [
    {"lname": A + b"xxxx/0"},  # another name, same length
    {"lname": A + b"a/much/longer/name"},  # its data starts later: after the local name
    {"lextra": b"\x99\x99\x03\x00abc" * 5},  # an extra field only in the local header
    {"lsize": 5},  # sizes that lie
    {"lsize": 0xFFFFFFFF},
    {"flags": 8, "lsize": 0},  # a data descriptor: local sizes 0
])
def test_local_header_fields_are_read_as_torch_reads_them(tmp_path, change):
    ms = edit(members(saved(T)), b"data/0", **change)
    assert agree(tmp_path, build(ms)) == "same"


def test_storage_is_where_the_directory_says_not_where_the_local_headers_walk(tmp_path):
    """``data/0``'s directory entry points at a later member holding other bytes: torch reads those."""
    ms = members(saved(T))
    other = (T + 100).numpy().tobytes()
    at = build(ms + [{"name": A + b"zz", "data": other}]).index(A + b"zz") - 30  # its local header
    rec = build(edit(ms, b"data/0", local_at=at) + [{"name": A + b"zz", "data": other}])
    assert agree(tmp_path, rec) == "same"
    assert torch.equal(torch_reads(rec), T + 100)
    rec = build(edit(ms, b"data/0", local_at=0))  # at data.pkl's local header: torch reads its bytes
    assert agree(tmp_path, rec) == "same"


def test_end_records_are_found_as_torch_finds_them(tmp_path):
    ms = members(saved(T))
    assert agree(tmp_path, build(ms, comment=b"a comment")) == "same"
    assert agree(tmp_path, build(ms, comment=b"PK\x05\x06 short")) == "same"  # under 22 bytes after it
    assert agree(tmp_path, build(ms, zip64_end=False)) == "same"


# -- refused: what torch never writes, or reads in a way merger won't ---------------------------

@pytest.mark.parametrize("make, expected, torch_loads_it", [
    (lambda ms: build(ms, cd_at=10 ** 6), "bytes at byte 1000000) lies outside it", False),
    (lambda ms: build(ms, cd_at=100), "a corrupt central directory entry", False),
    (lambda ms: build(ms + [ms[4]]), "holds the zip member 'archive/data/0' twice", True),  # one of the two
    (lambda ms: build(ms + [{"name": A + b"DATA/0", "data": ms[4]["data"]}]),
     "holds the zip member 'archive/DATA/0' twice", True),  # miniz looks names up ignoring case
    (lambda ms: build(edit(ms, b"data/0", method=8, cdata=zlib.compress(ms[4]["data"])[2:-4])),
     "holds the compressed zip member 'archive/data/0'", True),  # torch inflates it
    (lambda ms: build(edit(ms, b"byteorder", data=b"big")), "big-endian", True),  # torch swaps the bytes
    (lambda ms: build(edit(ms, b"data/0", attrs=0x10)), "'archive/data/0' is marked as a folder",
     True),  # miniz copies nothing: torch returns uninitialised memory
    (lambda ms: build([m for m in ms if m["name"] != A + b"data.pkl"]), "no data.pkl", False),
    (lambda ms: build([m for m in ms if m["name"] != A + b"version"]), "no version record", False),
    (lambda ms: build(ms + [{"name": b"other/x", "data": b"1"}]), "is outside its folder 'archive/'", False),
    (lambda ms: build(edit(ms, b"data/0", flags=1)), "is encrypted", False),
    (lambda ms: build(edit(ms, b"data/0", data=ms[4]["data"] + b"1234")), "storage holds 52 bytes", False),
    (lambda ms: build(ms)[:-60], "no zip end record", False),
    (lambda ms: build(ms, comment=struct.pack("<4s4HLLH", b"PK\x05\x06", 0, 0, 7, 7, 46 * 7, 0, 0) + b"x" * 30),
     "a corrupt central directory entry", False),  # a false end record in the comment: the last one counts
    (lambda ms: b"XX" + build(ms), "no torch.save record starts at byte 5", False),
])
def test_records_torch_would_read_otherwise_are_refused(tmp_path, make, expected, torch_loads_it):
    rec = make(members(saved(T)))
    err = refusal(tmp_path, rec)
    assert "__0_0.distcp (tensor 'model.w', chunk at [0, 0]): " in err and expected in err, err
    assert isinstance(torch_reads(rec), torch.Tensor) == torch_loads_it


def test_only_a_record_without_end_record_raises_no_end_record(tmp_path):
    """``NoEndRecord`` (the one refusal ``pt_header.read_header`` turns into a walk of a cut file's
    local headers) is raised for a record cut before its end record, and for no other refusal."""
    rec = build(members(saved(T)))
    f = tmp_path / "records"
    f.write_bytes(rec + build(members(saved(T)), cd_at=100))
    fd = os.open(f, os.O_RDONLY)
    try:
        for length in (len(rec) - 60, 40):
            with pytest.raises(pt_record.NoEndRecord, match="no zip end record|too short"):
                read_record(fd, 0, length, f)
        with pytest.raises(CheckpointFormatError, match="a corrupt central directory entry") as e:
            read_record(fd, len(rec), f.stat().st_size - len(rec), f)
        assert not isinstance(e.value, pt_record.NoEndRecord)
        assert read_record(fd, 0, len(rec), f)[1] == {"0": rec.index(T.numpy().tobytes())}
    finally:
        os.close(fd)


def test_a_member_past_the_end_of_the_record_is_refused(tmp_path):
    rec = build(members(saved(T)))
    entry = rec.index(A + b"data/0", rec.index(b"PK\x01\x02")) - 46
    long = bytearray(rec)
    long[entry + 20: entry + 28] = struct.pack("<LL", 10 ** 6, 10 ** 6)  # its sizes in the directory
    assert "'archive/data/0' (1000000 bytes at byte" in refusal(tmp_path, bytes(long))
    assert isinstance(torch_reads(bytes(long)), Exception)


@pytest.mark.slow  # ~1500 records each, read by merger and by torch.load: 4-10 s on 2 cores
@pytest.mark.parametrize("kind", ["torch.save", "zip64 directory, data descriptors"])
def test_any_byte_changed_outside_the_storage_reads_as_torch_reads_or_is_refused(tmp_path, kind):
    """Every byte of a record but its tensor's, changed (0x00, 0xFF or one bit): merger reads exactly
    what torch reads, or refuses; never a record torch refuses, never other bytes."""
    rec = saved(T) if kind == "torch.save" else build([{**m, "zip64": True, "flags": 8} for m in members(saved(T))])
    data = rec.index(T.numpy().tobytes())
    seen: dict[str, int] = {}
    for p in (p for p in range(len(rec)) if not data <= p < data + T.nbytes):
        b = bytearray(rec)
        b[p] = (0x00, 0xFF, rec[p] ^ 1)[p % 3]
        r = agree(tmp_path, bytes(b))
        seen[r] = seen.get(r, 0) + 1
        if p % 64 == 0:
            for case in tmp_path.iterdir():
                for f in case.iterdir():
                    f.unlink()
                case.rmdir()
    assert seen.get("same", 0) > 300 and seen.get("refused", 0) > 300, seen  # both kinds really happen
