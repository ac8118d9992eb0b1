"""One ``torch.save`` record lying at a byte range of a file, read the way torch reads it: a DCP
chunk (``__<rank>_<i>.distcp`` holds one record per chunk, back to back).

A record is a small stored zip: ``<archive>/data.pkl``, ``byteorder``, ``data/<key>``, ``version``
... and, at its end, the central directory and the end records (zip64 ones too: torch always
writes them). We read its tail (the end records and the central directory: a few hundred bytes)
and its head (the local headers, ``data.pkl``), so two ``pread`` s per record, and then find each
member as torch's zip reader (miniz) finds it:

- the end record is the last ``PK\\x05\\x06`` with 22 bytes after it; a zip64 locator right before
  it, pointing at a zip64 end record, overrides its counts, size and offset;
- members come from the central directory only, offsets relative to the record's first byte;
  the local header at a member's offset gives only its name and extra lengths (the data starts
  after them). Local sizes, CRCs and data descriptors (flag bit 3, torch's way: local sizes 0)
  are never used, so a local header that disagrees with the directory reads as torch reads it;
- the archive folder is the first member's name up to its ``/``; every member must be under it
  and named in UTF-8; names are looked up ignoring ASCII case, as miniz does, so names equal that
  way are refused;
- the small records ``torch.load`` reads besides ``data.pkl`` and the storages (``version``,
  ``.format_version``, ``.storage_alignment``, ``.data/serialization_id``, ``byteorder``) are
  located the same way and checked as it checks them (a version above what the installed torch
  supports is the one refusal of torch's that merger doesn't know of).

Anything torch would read differently, or that only another zip reader would accept (compressed
members, encrypted or multi-disk zips, folder entries, members or a directory outside the
record), is refused. A whole ``torch.save`` file is one record over all its bytes
(``pt_header.read_header``); a file without an end record (cut short) is refused with
:class:`NoEndRecord`, which ``read_header`` alone turns into a walk of the local headers.

The pickle is read by the restricted unpicklers of ``pt_pickle`` (:class:`StateDictUnpickler`,
:class:`TreeUnpickler`): torch's grammar, torch's globals as inert records, no class imported, no code run.
"""

from __future__ import annotations

import os
import re
import struct

from merger.errors import CheckpointFormatError
from merger.formats.base import fail
from merger.formats.pt_pickle import (RESAVE_PLAIN, STORAGE_DTYPES, StateDictUnpickler, StorageRef, TensorRef,
                                      TreeUnpickler, storages, unpickle)
from merger.units import SIZES

__all__ = ["MAX_PICKLE", "RESAVE_PLAIN", "STORAGE_DTYPES", "NoEndRecord", "StateDictUnpickler", "StorageRef",
           "TensorRef", "TreeUnpickler", "check_byteorder", "read_record", "storages", "unpickle"]

MAX_DIRECTORY = 64 << 20  # a central directory larger than this is not a torch.save record's

RESAVE_RECORD = "the file is corrupt or was not written by torch.save: save it again"

_LOCAL = b"PK\x03\x04"
_EOCD = struct.Struct("<4s4HLLH")  # sig, disk, directory's disk, entries here, entries, size, offset, comment
_LOCATOR = struct.Struct("<4sLQL")  # zip64 locator: sig, disk, offset of the zip64 end record, disks
_EOCD64 = struct.Struct("<4sQ2H2L4Q")  # sig, record size, versions, disks, entries here, entries, size, offset
_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory header: 46 bytes, then name, extra, comment
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # local file header: sig, ..., name and extra lengths (30 bytes)
_MAX32 = 0xFFFFFFFF
_SMALL = (b"version", b".data/version", b".format_version", b".storage_alignment", b".data/serialization_id",
          b"byteorder")  # the records torch.load reads besides data.pkl and the storages
_VERSION = re.compile(rb"\s*\+?0*[1-9]")  # what C++'s stoull reads as a number >= 1
_NUMBER = re.compile(rb"\s*[+-]?\d+(_\d+)*\s*")  # what Python's int() reads


MAX_PICKLE = 256 << 20  # bytes of data.pkl: a state dict's names and records, even for optimizer state


def check_byteorder(record: bytes, path) -> None:
    """torch writes ``byteorder`` = ``little`` or ``big``; merger reads little-endian bytes only."""
    if not record.startswith(b"little"):
        raise fail(path, f"was saved with byte order {record[:8]!r} (a big-endian machine?); merger "
                         "reads little-endian checkpoints only", "load and re-save it with torch.save on a "
                                                                 "little-endian machine (x86, ARM)")


# -- the zip, as torch reads it -------------------------------------------------------------------

class NoEndRecord(CheckpointFormatError):
    """The record has no zip end record (no end signature where miniz looks: :func:`eocd_window`, or
    too short for one): a zip cut short, whose central directory never got written (or not a zip at all)."""


def _zip64_extra(extra: bytes, usize: int, csize: int, local: int, bad) -> tuple[int, int, int]:
    """Sizes and local header offset from the first zip64 extra field, for the fields that are 0xFFFFFFFF."""
    at = 0
    while at + 4 <= len(extra):
        kind, n = struct.unpack_from("<HH", extra, at)
        if at + 4 + n > len(extra):
            break
        if kind == 1:
            values, field = [usize, csize, local], extra[at + 4: at + 4 + n]
            pos = 0
            for i, v in enumerate(values):
                if v == _MAX32:
                    if pos + 8 > len(field):
                        raise bad("a zip64 field is too short")
                    values[i] = struct.unpack_from("<Q", field, pos)[0]
                    pos += 8
            return values[0], values[1], values[2]
        at += 4 + n
    if at != len(extra):
        raise bad("a malformed extra field in its central directory")
    return usize, csize, local


def eocd_window(length: int) -> int:
    """How many bytes before the end miniz (torch's zip reader) looks for the end record: it scans
    4096-byte windows back from the end, each starting 4093 bytes before the last, and stops after
    the first that starts at least 65535 + 22 bytes before the end (69584 bytes in a large file)."""
    at = max(length - 4096, 0)
    while at and length - at < 0xFFFF + _EOCD.size:
        at = max(at - 4093, 0)
    return length - at


def read_record(fd: int, start: int, length: int, path, *, what: str = "the record", hint: str = RESAVE_RECORD,
                unpickler: type | None = None, memo: dict[bytes, object] | None = None
                ) -> tuple[object, dict[str, int], dict[str, int]]:
    """The pickle tree of the ``torch.save`` record at bytes ``[start, start + length)`` of ``fd``,
    and where its storages lie.

    Args:
        fd: an open file.
        start, length: the record's byte range (the caller checks it lies inside the file).
        path: where errors say they are (the file, and what the record is).
        what: how errors name the record (``"the chunk's record"``).
        hint: how errors about the zip say to fix it.
        unpickler: the restricted unpickler (default :class:`TreeUnpickler`).
        memo: trees already unpickled, by their data.pkl bytes, for a caller that reads many records
            with one unpickler and changes no tree (DCP: a chunk's pickle names no tensor, so the
            same-shaped chunks of every layer and revision share one).

    Returns:
        ``(tree, offsets, sizes)``: the unpickled tree (inert records), and for each storage it
        names that the record holds: the absolute file offset of its first byte, its member's bytes.

    Raises:
        NoEndRecord: no zip end record (cut short), or too short to hold one.
        CheckpointFormatError: not a zip record, end records or a directory outside the record,
            compressed, encrypted or duplicate members, a member past the record's end, no
            ``data.pkl`` or ``version``, a member outside the archive folder, a big-endian
            record, a pickle that needs a class or is corrupt.
    """
    def bad(reason: str):
        return fail(path, f"{what} is unreadable ({reason})", hint)

    def pread(at: int, n: int) -> bytes:
        data = os.pread(fd, n, start + at)
        if len(data) != n:
            raise bad(f"the file ends inside it, at byte {start + at + len(data)}")
        return data

    def no_end(reason: str):
        return NoEndRecord(f"{path}: {what} is unreadable ({reason})", path=str(path), hint=hint)

    if length < _EOCD.size + 30:
        raise no_end(f"{length} bytes is too short for a torch.save record")
    # the head holds data.pkl, byteorder and the storage's local header; the tail the central directory
    # (~470 bytes for torch's 7 members) and the end records (SIZES.record_head/record_tail)
    head_n, tail_n = SIZES.record_head, SIZES.record_tail
    if length <= head_n + tail_n:  # small: one read
        head = tail = pread(0, length)
    else:
        head, tail = pread(0, head_n), pread(length - tail_n, tail_n)
    tail_at = length - len(tail)

    def get(at: int, n: int) -> bytes:
        """Bytes ``[at, at + n)`` of the record: from the head or the tail when they hold them."""
        if at + n <= len(head):
            return head[at: at + n]
        if at >= tail_at:
            return tail[at - tail_at: at - tail_at + n]
        return pread(at, n)

    if head[:4] != _LOCAL:  # torch.load checks this first too
        raise bad(f"no torch.save record starts at byte {start}: no zip local header there")
    # -- end records: the last end signature with room for the record after it, as miniz finds it
    i = tail.rfind(b"PK\x05\x06", 0, len(tail) - _EOCD.size + 4)
    if i < 0 and len(tail) < length:
        n = eocd_window(length)
        tail, tail_at = pread(length - n, n), length - n
        i = tail.rfind(b"PK\x05\x06", 0, len(tail) - _EOCD.size + 4)
    if i < 0:
        raise no_end("no zip end record at its end: cut short, or not a torch.save record")
    eocd = tail_at + i
    _, disk, cd_disk, n_here, n_files, cd_size, cd_at, _ = _EOCD.unpack_from(tail, i)
    if eocd >= _LOCATOR.size + _EOCD64.size:
        sig, _, at64, disks = _LOCATOR.unpack(get(eocd - _LOCATOR.size, _LOCATOR.size))
        if sig == b"PK\x06\x07":
            if at64 > length - _EOCD64.size:
                raise bad("its zip64 end record lies outside it")
            rec = _EOCD64.unpack(get(at64, _EOCD64.size))
            if rec[0] == b"PK\x06\x06":
                if rec[1] < _EOCD64.size - 12 or disks != 1:
                    raise bad("a malformed zip64 end record")
                disk, cd_disk, n_here, n_files, cd_size, cd_at = rec[4:]
    if n_files != n_here or ((disk | cd_disk) != 0 and (disk != 1 or cd_disk != 1)):
        raise bad("a multi-disk zip")
    if cd_size < n_files * _ENTRY.size or cd_at + cd_size > eocd or cd_size > MAX_DIRECTORY:
        raise bad(f"its central directory ({cd_size} bytes at byte {cd_at}) lies outside it")
    # -- the central directory: every member, by name
    cd = get(cd_at, cd_size)
    members: dict[bytes, tuple[int, int]] = {}  # name, ASCII lower-cased -> (local header offset, bytes)
    names: list[bytes] = []  # as written, in directory order
    at = 0
    for _ in range(n_files):
        if at + _ENTRY.size > cd_size:
            raise bad("its central directory is cut short")
        (sig, _, _, flags, method, _, _, _, csize, usize, n_name, n_extra, n_comment, disk_at, _, attrs,
         local) = _ENTRY.unpack_from(cd, at)
        end = at + _ENTRY.size + n_name + n_extra + n_comment
        if sig != b"PK\x01\x02" or end > cd_size:
            raise bad("a corrupt central directory entry")
        name = cd[at + _ENTRY.size: at + _ENTRY.size + n_name]
        try:
            name.decode("utf-8")  # torch.load decodes every name: it refuses what isn't UTF-8
        except UnicodeDecodeError:
            raise bad(f"the zip member name {name[:80]!r} is not UTF-8") from None
        if _MAX32 in (usize, csize, local):
            usize, csize, local = _zip64_extra(cd[at + _ENTRY.size + n_name: end - n_comment], usize, csize,
                                               local, bad)
        if (method or flags & 0x2061 or attrs & 0x10 or name.endswith(b"/") or (disk_at != disk and disk_at != 1)
                or csize != usize or local + 30 + csize > length):
            shown = name.decode()
            if method:
                raise fail(path, f"{what} holds the compressed zip member {shown!r}; torch.save stores members "
                                 "uncompressed and merger reads only stored bytes", hint)
            if attrs & 0x10 or name.endswith(b"/"):  # miniz extracts nothing from a folder: torch reads garbage
                raise bad(f"its member {shown!r} is marked as a folder")
            if csize == usize and local + 30 + csize > length:
                raise bad(f"its member {shown!r} ({csize} bytes at byte {local}) runs past its end")
            raise bad(f"its member {shown!r} is encrypted, patch data, on another disk or of two sizes")
        key = name.lower()  # miniz finds names ignoring ASCII case
        if key in members:
            raise fail(path, f"{what} holds the zip member {name.decode()!r} twice: which one a reader takes is "
                             "undefined", hint)
        members[key] = (local, csize)
        names.append(name)
        at = end
    # -- the archive folder, as torch finds it: the first member's, and every member is under it
    if not names or b"/" not in names[0]:
        raise bad("its first zip member is not in a folder: not a torch.save record")
    folder = names[0][: names[0].index(b"/") + 1]
    outside = next((n for n in names if not n.startswith(folder)), None)
    if outside is not None:
        raise bad(f"its zip member {outside.decode()!r} is outside its folder {folder.decode()!r}")
    prefix = folder.lower()
    if prefix + b"data.pkl" not in members:
        raise bad("no data.pkl in its zip: not a torch.save record")
    if prefix + b"constants.pkl" in members:
        raise bad("a TorchScript archive, not a torch.save record")

    def member(name: bytes) -> tuple[int, int] | None:
        """(offset of member ``prefix + name``'s first byte in the record, its bytes), from its local header."""
        found = members.get(prefix + name)
        if found is None:
            return None
        local, size = found
        sig, n_name, n_extra = _LOCAL_HEADER.unpack(get(local, 30))
        at = local + 30 + n_name + n_extra
        if sig != _LOCAL or at + size > length:
            raise bad(f"no local header where its central directory puts {name.decode()!r}, or its data runs "
                      "past its end")
        return at, size

    # -- the small records torch.load reads (each through its local header), checked as it checks them
    small: dict[bytes, bytes] = {}
    for name in _SMALL:
        found = member(name)
        if found is not None:
            if found[1] > 1 << 16:  # torch writes a few bytes; a crafted size must not make us read gigabytes
                raise bad(f"its {name.decode()} record holds {found[1]} bytes")
            small[name] = get(*found)
    version = small.get(b".data/version", small.get(b"version"))
    if version is None or not _VERSION.match(version):
        raise bad("no version record, or not a positive number (torch.load refuses it too)")
    alignment = small.get(b".storage_alignment")
    if alignment is not None and not _NUMBER.fullmatch(alignment):
        raise bad(f"its .storage_alignment record {alignment[:16]!r} is not a number")
    try:
        small.get(b".data/serialization_id", b"").decode("utf-8")
    except UnicodeDecodeError:
        raise bad("its .data/serialization_id record is not UTF-8 (torch.load refuses it too)") from None
    order = small.get(b"byteorder")
    if order is not None and order != b"little":
        check_byteorder(order, path)  # big-endian
        raise bad(f"byteorder record {order[:16]!r} (torch writes 'little' or 'big')")
    at, size = member(b"data.pkl")
    if size > MAX_PICKLE:
        raise bad(f"its data.pkl holds {size} bytes, more than the {MAX_PICKLE >> 20} MB merger reads: "
                  "torch.save writes a state dict's names and records in far less")
    pkl = get(at, size)
    tree = memo.get(pkl) if memo is not None else None
    if tree is None:
        tree, _ = unpickle(pkl, path, unpickler or TreeUnpickler)
        if memo is not None:
            memo[pkl] = tree
    offsets: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for key in storages(tree):
        found = member(b"data/" + key.encode("utf-8", "surrogatepass").lower())
        if found is not None:
            offsets[key], sizes[key] = start + found[0], found[1]
    return tree, offsets, sizes
