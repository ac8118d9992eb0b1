"""Output shards: the safetensors header of a planned shard, and :class:`ShardWriter`, which
writes one shard (header first, then data at planned offsets) and checksums it as it goes.

Writes go out with O_DIRECT in pieces of ``SIZES.stage`` from a background thread (buffered writes
through the page cache were slower and far less steady), or straight from the caller's pages
(:meth:`ShardWriter.write_owned`, no copy). Nothing is fsynced: a killed process loses nothing
the page cache holds, and after a power loss ``--resume`` re-checks every finished shard's CRC-32
(an fsync cost more than the whole merge). CRC-32 rather than sha256: it guards against torn or
lost writes, not against an adversary, and is several times faster. The measurements behind each
choice: bench/README.md, "Measurements behind the code".
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import mmap
import os
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from merger.output.convert import in_place
from merger.output.crc import crc32_combine, file_checksum
from merger.output.folder import write_failed
from merger.units import SIZES, ST_NAMES

if TYPE_CHECKING:
    from merger.plan import Plan

DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses are multiples of this


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Header bytes (length prefix + JSON padded to 8) for (name, dtype, shape, nbytes) in data order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def shard_header(plan: Plan, k: int) -> bytes:
    """The header of the plan's shard ``k``: its tensors, in data order, in their output dtypes
    (nothing for a format that frames each tensor instead: :func:`shard_frames`)."""
    if in_place(plan.output_format):
        return b""
    ts = [plan.tensors[i] for i in plan.shards[k].tensors]
    return safetensors_header([(t.name, t.out_dtype, t.shape, t.numel * t.out_itemsize) for t in ts])


@dataclass(frozen=True)
class Frames:
    """The bytes an output format writes around each tensor of a shard (a DCP record's zip headers):
    ``heads[i]`` ends where tensor ``i``'s data starts (``starts[i]``, in file order) and
    ``tail(i, crc)`` starts where it ends; the tail holds the data's CRC-32, so it is written once
    the tensor's last byte is, and its length never depends on the CRC."""

    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    heads: tuple[bytes, ...]
    tail: Callable[[int, int], bytes]


def shard_frames(plan: Plan, k: int) -> Frames | None:
    """The frames of shard ``k`` when its format frames each tensor (output/convert.py), else None."""
    module = in_place(plan.output_format)
    return module.frames(plan, k) if module else None


def open_shard(plan: Plan, k: int, folder: Path, **kwargs) -> ShardWriter:
    """A :class:`ShardWriter` for the plan's shard ``k`` in ``folder``."""
    sp = plan.shards[k]
    return ShardWriter(folder / sp.filename, shard_header(plan, k), sp.data_bytes + sp.framing,
                       frames=shard_frames(plan, k), **kwargs)


def pwrite_all(fd: int, buf, n: int, offset: int) -> None:
    """Write ``buf[:n]`` at ``offset``, retrying short writes: every raw write of every writer goes
    through here, so a write is whole, or raises (a write that makes no progress is ENOSPC)."""
    view = memoryview(buf)
    try:
        done = 0
        while done < n:
            k = os.pwrite(fd, view[done:n], offset + done)
            if k <= 0:
                raise OSError(errno.ENOSPC, f"no space left: wrote {done} of {n} bytes at {offset}, then no more")
            done += k
    finally:
        view.release()


def _io_write(fd: int, buf, n: int, offset: int) -> None:
    """:func:`pwrite_all` for the background writer: where O_DIRECT turns out to be refused
    (EINVAL: some filesystems accept the flag at open, then not the write), the file leaves
    O_DIRECT and the write is redone through the page cache, as every later one will be."""
    try:
        pwrite_all(fd, buf, n, offset)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        pwrite_all(fd, buf, n, offset)


class ShardWriter:
    """One output shard: the header is written at open, data with pwrite.

    With ``hash``, the bytes are hashed as they are written (they arrive in file order);
    :meth:`finish` makes the file durable and returns its checksum. With ``frames``, each
    tensor's head is written before its data and its tail (with the data's CRC-32, taken as the
    data arrives) right after its last byte, so a file written in order stays written in order.

    Args:
        path: the file to create.
        header: from :func:`safetensors_header`.
        data_bytes: bytes of the data section (the framing included).
        label: how errors name the file (default: ``path``).
        hash: compute the CRC-32 while writing.
        frames: the bytes around each tensor, for a format that frames them (:class:`Frames`).
    """

    def __init__(self, path: Path, header: bytes, data_bytes: int, *, label: str | None = None,
                 hash: bool = False, direct: bool = True, frames: Frames | None = None):
        self.path = path
        self.frames = frames
        n = len(frames.starts) if frames else 0
        self._fcrc = [0] * n  # per framed tensor: CRC-32 of its first _fdone bytes
        self._fdone = [0] * n  # bytes of it written in order so far (-1: a write came out of order)
        self._heads = [False] * n  # written yet
        self._tails = [False] * n
        self.label = label or str(path)
        self.data_start = len(header)
        self.size = self.data_start + data_bytes
        # CRC-32 of bytes 0.._hpos, while writes come in file order; -1: finish() re-reads the file
        self._crc, self._hpos = (0, 0) if hash else (None, -1)
        # O_DIRECT: writes arrive in file order and go out in aligned pieces of ``SIZES.stage``, skipping
        # the page cache (bench/README.md: 4x faster on the bench disk). Two stages: one
        # is written by a background thread while the other fills (the disk and the copy overlap)
        self._stages: list[mmap.mmap] = []
        self._stage: mmap.mmap | None = None  # the one filling
        self._staged = 0  # bytes in the stage; the file holds everything before _flushed
        self._flushed = 0
        self._io: ThreadPoolExecutor | None = None
        self._pending: tuple[Future, mmap.mmap] | None = None  # the background write of a stage
        self._stage_size = SIZES.stage  # bytes staged per O_DIRECT write (a multiple of DIRECT_ALIGN)
        flags = (os.O_RDWR if frames else os.O_WRONLY) | os.O_CREAT | os.O_TRUNC
        try:
            self.fd = -1
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    self.fd = os.open(path, flags | os.O_DIRECT, 0o644)
                    self._stages = [mmap.mmap(-1, self._stage_size), mmap.mmap(-1, self._stage_size)]  # page-aligned
                    self._stage = self._stages[0]
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                        raise
            if self.fd < 0:
                self.fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise write_failed(f"creating {self.label}", e) from e
        self.write(header, 0, absolute=True)
        if n:
            self._frame_after(-1)

    # -- framing (frames): heads and tails around each tensor's data ----------------------------
    def _frame(self, mv: memoryview, pos: int) -> int:
        """Take the CRC of data ``mv`` written at ``pos``; the index of its tensor."""
        f = self.frames
        i = bisect.bisect_right(f.starts, pos) - 1
        if i < 0 or pos + len(mv) > f.starts[i] + f.sizes[i]:
            raise ValueError(f"internal error: a write at {pos}..{pos + len(mv)} of {self.label} is not "
                             "inside one tensor's data")
        if self._fdone[i] >= 0 and pos == f.starts[i] + self._fdone[i]:
            self._fcrc[i] = zlib.crc32(mv, self._fcrc[i])
            self._fdone[i] += len(mv)
        elif len(mv):
            self._fdone[i] = -1
        return i

    def _frame_after(self, i: int) -> None:
        """Tensor ``i``'s data may be complete: if it came in order, write its tail; then, while the
        tensors before are closed, the next heads (and the tails of empty tensors, which no data
        write announces)."""
        f = self.frames
        if i >= 0 and not self._tails[i] and self._fdone[i] == f.sizes[i]:
            self._tails[i] = True
            if self._hpos == f.starts[i]:  # the file's CRC goes on from the tensor's (its bytes once)
                self._crc = crc32_combine(self._crc, self._fcrc[i], f.sizes[i])
                self._hpos += f.sizes[i]
            else:
                self._hpos = -1
            self.write(f.tail(i, self._fcrc[i]), f.starts[i] + f.sizes[i], absolute=True)
        while i + 1 < len(f.starts) and (i < 0 or self._tails[i]):
            i += 1
            if not self._heads[i]:
                self._heads[i] = True
                self.write(f.heads[i], f.starts[i] - len(f.heads[i]), absolute=True)
            if not f.sizes[i] and not self._tails[i]:
                self._tails[i] = True
                self.write(f.tail(i, 0), f.starts[i], absolute=True)

    def _frame_rest(self) -> None:
        """At close: the heads and tails that out-of-order writes left out, the data's CRC read back."""
        f = self.frames
        for i in range(len(f.starts)):
            if not self._heads[i]:
                self._heads[i] = True
                self.write(f.heads[i], f.starts[i] - len(f.heads[i]), absolute=True)
            if not self._tails[i]:
                crc, at, end = 0, f.starts[i], f.starts[i] + f.sizes[i]
                while at < end:
                    piece = os.pread(self.fd, min(self._stage_size, end - at), at)
                    if not piece:
                        raise OSError(errno.EIO, f"{self.label} is shorter than its data")
                    crc, at = zlib.crc32(piece, crc), at + len(piece)
                self._tails[i] = True
                self.write(f.tail(i, crc), end, absolute=True)

    def _checksum(self, mv: memoryview, pos: int) -> None:
        if self._hpos == pos:
            self._crc = zlib.crc32(mv, self._crc)
            self._hpos += len(mv)
        elif len(mv):
            self._hpos = -1

    def write(self, data, offset: int, *, absolute: bool = False) -> None:
        pos = offset if absolute else self.data_start + offset
        mv = memoryview(data).cast("B")
        framed = self._frame(mv, pos) if self.frames and not absolute and len(mv) else None
        if framed is None:
            self._checksum(mv, pos)
        try:
            if self._stage is not None and pos == self._flushed + self._staged:
                self._stage_write(mv, pos)
            else:
                self._buffered()
                pwrite_all(self.fd, mv, len(mv), pos)
        except OSError as e:
            raise write_failed(f"writing {self.label}", e) from e
        if framed is not None:
            self._frame_after(framed)

    def write_owned(self, data: memoryview, offset: int, address: int) -> Future | None:
        """Like :meth:`write`, but the whole pages of ``data`` go to the disk straight from it, with
        no copy: ``data`` must stay unchanged until the returned future is done (:meth:`wait`).

        ``address`` is where ``data`` lies in memory; only when it is congruent to the file
        position modulo DIRECT_ALIGN (and writes are sequential, with O_DIRECT) can the pages be
        written in place. Otherwise, and for the partial pages at both ends, the bytes are copied
        into the stage as :meth:`write` does, and None is returned for an all-copied write.
        """
        pos = self.data_start + offset
        mv = memoryview(data).cast("B")
        if (self._stage is None or pos != self._flushed + self._staged
                or (address - pos) % DIRECT_ALIGN or len(mv) < 2 * DIRECT_ALIGN):
            self.write(mv, offset)
            return None
        framed = self._frame(mv, pos) if self.frames else None
        if framed is None:
            self._checksum(mv, pos)
        head = -pos % DIRECT_ALIGN
        try:
            self._stage_write(mv[:head], pos)  # the stage now ends on a page boundary
            if self._stage is None:  # O_DIRECT refused on the way: page cache from here on
                pwrite_all(self.fd, mv[head:], len(mv) - head, pos + head)
                fut = None
            else:
                if self._staged:
                    self._flush(self._staged)
                mid = (len(mv) - head) // DIRECT_ALIGN * DIRECT_ALIGN
                fut = self._executor().submit(_io_write, self.fd, mv[head: head + mid], mid, pos + head)
                self._flushed += mid
                self._stage_write(mv[head + mid:], pos + head + mid)
        except OSError as e:
            raise write_failed(f"writing {self.label}", e) from e
        if framed is not None:
            self._frame_after(framed)
        return fut

    def wait(self, fut: Future | None) -> None:
        """Wait for a :meth:`write_owned` write; its error is raised here."""
        if fut is None:
            return
        try:
            fut.result()
        except OSError as e:
            raise write_failed(f"writing {self.label}", e) from e

    def _stage_write(self, mv: memoryview, pos: int) -> None:
        while len(mv):
            if self._stage is None:  # O_DIRECT refused on the way
                pwrite_all(self.fd, mv, len(mv), pos)
                return
            n = min(len(mv), self._stage_size - self._staged)
            self._stage[self._staged: self._staged + n] = mv[:n]
            self._staged += n
            mv, pos = mv[n:], pos + n
            if self._staged == self._stage_size:
                self._flush(self._stage_size)

    def _flush(self, n: int) -> None:
        """Start writing the first ``n`` staged bytes (a multiple of DIRECT_ALIGN) with O_DIRECT, in
        the background; the bytes after them move to the other stage, which fills next."""
        self._wait()
        if self._stage is None:  # O_DIRECT was refused: the page cache from now on
            return
        stage, other = self._stage, self._stages[1] if self._stage is self._stages[0] else self._stages[0]
        left = self._staged - n
        other[:left] = stage[n: self._staged]
        self._pending = (self._executor().submit(_io_write, self.fd, stage, n, self._flushed), stage)
        self._stage, self._staged, self._flushed = other, left, self._flushed + n

    def _executor(self) -> ThreadPoolExecutor:
        """The one background writer thread: writes go out in the order they were submitted."""
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix="merger-io")
        return self._io

    def _wait(self) -> None:
        """Wait for the background write of the other stage (its error is raised here)."""
        if self._pending is not None:
            fut, self._pending = self._pending[0], None
            fut.result()

    def _buffered(self) -> None:
        """Leave O_DIRECT: write out what is staged and go on through the page cache."""
        if self._stage is None:
            return
        self._wait()
        if self._stage is None:
            return
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        stage, self._stage = self._stage, None
        pwrite_all(self.fd, stage, self._staged, self._flushed)
        self._flushed += self._staged
        self._staged = 0
        self._release_stages()

    def _release_stages(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        self._pending = None
        self._stage = None
        for st in self._stages:
            st.close()
        self._stages = []

    def abandon(self) -> None:
        """Stop without finishing (an error elsewhere): wait for the background writes, close."""
        self._release_stages()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Write what is staged, set the final size and close; idempotent."""
        if self.fd >= 0:
            try:
                if self.frames and not all(self._tails):
                    self._buffered()  # read back through the page cache, not O_DIRECT
                    self._frame_rest()
                if self._stage is not None:  # the staged tail is written here
                    self._flush(self._staged // DIRECT_ALIGN * DIRECT_ALIGN)
                    self._buffered()
            except OSError as e:
                self.abandon()
                raise write_failed(f"writing {self.label}", e) from e
            try:
                have = os.fstat(self.fd).st_size
                if have < self.size:  # the end was never written: extending the file would publish a hole
                    raise OSError(errno.EIO, f"{self.label} holds {have} of its {self.size} bytes after every write")
                if have != self.size:  # O_DIRECT wrote the last page whole
                    os.ftruncate(self.fd, self.size)
            except OSError as e:
                raise write_failed(f"finishing {self.label}", e) from e
            finally:
                os.close(self.fd)
                self.fd = -1

    def finish(self) -> str:
        """Close and return the file's checksum (:func:`file_checksum`)."""
        self.close()
        if self._crc is not None and self._hpos == self.size:
            return f"crc32:{self._crc:08x}"
        return file_checksum(self.path)


def write_index(plan: Plan, folder: Path) -> None:
    """``model.safetensors.index.json``: total size and tensor -> shard file (a format with its own
    index writes it after the merge: output/convert.py)."""
    if in_place(plan.output_format):
        return
    wmap = {t.name: plan.shards[t.shard].filename for t in plan.tensors}
    index = {"metadata": {"total_size": plan.out_bytes}, "weight_map": dict(sorted(wmap.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
