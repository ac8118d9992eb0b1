"""Reading input bytes: ``pread`` into caller buffers (no mmap, so RSS is the real working set).

:func:`read_extents` fills a buffer with tensor bytes ``start:stop`` from the extents that hold
them; :class:`FileHasher` computes each input file's sha256 from the bytes the merge reads anyway,
reading only the gaps between tensors (headers, zip records).
"""

from __future__ import annotations

import hashlib
import os

from merger.errors import CheckpointFormatError
from merger.formats.base import Extent, clip
from merger.units import SIZES



def truncated_error(path: str, at: int) -> CheckpointFormatError:
    """An input that ended before the bytes its header promised (read by either kernel)."""
    return CheckpointFormatError(f"{path}: file ended after {at} bytes while reading (truncated or changed "
                                 "during the merge?)", path=path, hint="re-download the file and run again")


def pread_into(fd: int, buf: memoryview, offset: int, *, path: str = "") -> None:
    """Fill ``buf`` with the bytes of ``fd`` at ``offset``, in ``SIZES.read_piece`` reads; short reads are retried."""
    done = 0
    n, piece = len(buf), SIZES.read_piece
    while done < n:
        k = os.preadv(fd, [buf[done: done + piece]], offset + done)
        if k <= 0:
            raise truncated_error(path, offset + done)
        done += k


def read_extents(fds: dict[str, int], extents: tuple[Extent, ...], start: int, buf: memoryview,
                 feed=None) -> None:
    """Fill ``buf`` with tensor bytes ``start:start + len(buf)``; ``feed(path, offset, data)`` sees each read.

    Strided extents are clipped ``SIZES.read_piece`` bytes of the tensor at a time, so the pieces held
    at once stay bounded however big ``buf`` is (a whole tensor cut along columns: a piece per row)."""
    window = SIZES.read_piece if any(e.rows > 1 for e in extents) else len(buf)
    for w in range(0, len(buf), max(window, 1)):
        part = buf[w: w + window]
        for e in clip(extents, start + w, start + w + len(part)):
            dst = part[e.start: e.start + e.nbytes]
            pread_into(fds[e.path], dst, e.offset, path=e.path)
            if feed is not None:
                feed(e.path, e.offset, dst)


class FileHasher:
    """sha256 of a file, fed with the byte ranges the merge reads, in increasing order.

    Gaps are read and hashed as they appear; a read out of order turns the hasher into a full
    re-read at :meth:`hexdigest`.
    """

    def __init__(self, fd: int, size: int, path: str):
        self.fd, self.size, self.path = fd, size, path
        self.h = hashlib.sha256()
        self.pos = 0
        self.in_order = True

    def feed(self, offset: int, data: memoryview) -> None:
        if not self.in_order:
            return
        if offset < self.pos:
            self.in_order = False
            return
        if offset > self.pos:
            self._read_range(self.pos, offset)
        self.h.update(data)
        self.pos = offset + len(data)

    def _read_range(self, start: int, stop: int, block: int = 1 << 23) -> None:
        while start < stop:
            buf = bytearray(min(block, stop - start))
            pread_into(self.fd, memoryview(buf), start, path=self.path)
            self.h.update(buf)
            start += len(buf)

    def hexdigest(self) -> str:
        if not self.in_order:
            self.h, self.pos, self.in_order = hashlib.sha256(), 0, True
        self._read_range(self.pos, self.size)
        self.pos = self.size
        return self.h.hexdigest()
