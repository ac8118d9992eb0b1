"""Reading input bytes and writing the output folder.

Reader side: :func:`pread_into` fills a buffer from a file offset with ``os.preadv`` (no mmap,
so RSS is the real working set); :class:`FileHasher` computes each input file's sha256 from the
bytes the merge reads anyway, reading only the gaps between tensors (headers, zip records).

Writer side: :class:`OutputDir` is the atomic output (a temporary sibling folder, renamed at the
end; an existing folder is replaced only with ``force``); :class:`ShardWriter` owns one
safetensors shard (header first, then data with ``pwrite`` at planned offsets).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path

from merger.errors import MergerError, OutputError
from merger.units import ST_NAMES, dtype_from_name


def pread_into(fd: int, buf: memoryview, offset: int, *, path: str = "") -> None:
    """Fill ``buf`` with the bytes of ``fd`` at ``offset``; short reads are retried."""
    done = 0
    n = len(buf)
    while done < n:
        k = os.preadv(fd, [buf[done:]], offset + done)
        if k <= 0:
            raise MergerError(f"{path}: file ended after {offset + done} bytes while reading (truncated "
                              "or changed during the merge?)", hint="re-download the file and run again")
        done += k


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


def safetensors_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Header bytes (length prefix + JSON padded to 8) for (name, dtype, shape, nbytes) in data order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": ST_NAMES[dtype_from_name(dtype)], "shape": list(shape),
                        "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """One output ``.safetensors`` file: the header is written at open, data with pwrite."""

    def __init__(self, path: Path, header: bytes, data_bytes: int):
        self.path = path
        self.data_start = len(header)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.write(header, 0, absolute=True)
        self.size = self.data_start + data_bytes

    def write(self, data, offset: int, *, absolute: bool = False) -> None:
        pos = offset if absolute else self.data_start + offset
        mv = memoryview(data).cast("B")
        try:
            while len(mv):
                k = os.pwrite(self.fd, mv, pos)
                mv, pos = mv[k:], pos + k
        except OSError as e:
            raise OutputError(f"writing {self.path} failed: {e.strerror or e}",
                              hint="free disk space (or raise the file size limit) and run again") from e

    def close(self) -> None:
        if self.fd >= 0:
            try:
                if os.fstat(self.fd).st_size != self.size:
                    os.ftruncate(self.fd, self.size)
                os.fsync(self.fd)
            except OSError as e:
                raise OutputError(f"finishing {self.path} failed: {e.strerror or e}",
                                  hint="free disk space and run again") from e
            finally:
                os.close(self.fd)
                self.fd = -1


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


class OutputDir:
    """The output folder, written atomically.

    Args:
        final: where the merged model should end up.
        inputs: input folders (and the HF cache) the output must not be inside of.
        force: replace an existing ``final``.
    """

    def __init__(self, final: str | Path, *, inputs: list[str] = (), force: bool = False):
        self.final = Path(final).expanduser().absolute()
        self.force = force
        self.tmp: Path | None = None
        if self.final.exists() and not force:
            raise OutputError(f"output folder {self.final} already exists",
                              hint="choose another --output, or pass --force to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"output {self.final} exists and is not a folder", hint="choose another --output")
        real = self.final.resolve()
        for inp in inputs:
            ip = Path(inp).resolve()
            if _is_within(real, ip) or _is_within(ip, real):
                raise OutputError(f"output folder {self.final} overlaps the input {inp}",
                                  hint="write the merged model somewhere outside the inputs")

    def create(self) -> Path:
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = parent / f".{self.final.name}.merger-tmp-{os.getpid()}-{secrets.token_hex(3)}"
            tmp.mkdir()
        except OSError as e:
            raise OutputError(f"can't create the output folder in {parent}: {e.strerror or e}",
                              hint="choose a writable --output location") from e
        self.tmp = tmp
        return tmp

    def publish(self) -> Path:
        """Rename the finished temporary folder to its final name (replacing the old with force)."""
        assert self.tmp is not None
        old = None
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.merger-old-{secrets.token_hex(3)}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
