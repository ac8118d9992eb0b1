"""The output folder, written atomically.

:class:`OutputDir` is the atomic output: everything is written into the sibling folder
``.NAME.merger-partial`` (locked against a second run), renamed to ``NAME`` at the end; an existing
folder is replaced only with ``force``. ``progress.json`` in the partial folder lists the shards
already finished (with their CRC-32, see ``shards.py``), so that a killed run can be resumed (see
``engine/resume.py``). The shard files themselves are written by ``shards.ShardWriter``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator

from merger.errors import OutputError
from merger.output.owned import (PARTIAL_MARK, PROGRESS, check_not_a_revision, check_owned, check_partial_owned,
                                 open_partial)


def write_failed(what: str, e: OSError) -> OutputError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    why = " (disk full or file size limit reached)" if full else ""
    return OutputError(f"{what} failed: {e.strerror or e}{why}",
                       hint="free disk space (or raise the file size limit) and run again" if full else
                       "check that the output location is writable and healthy, and run again")


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write one file atomically: ``write(tmp)`` fills a hidden sibling, which is renamed to ``path``;
    on any error the sibling is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; renamed to ``folder`` when the block ends without error.

    For write-once folders (caches): if another process published ``folder`` first, its complete
    copy is kept and ours is dropped. Merge outputs use :class:`OutputDir` (lock, resume, force).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        yield tmp
        try:
            os.rename(tmp, folder)
        except OSError:  # another process won the race: its folder is complete, use it
            if not folder.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


class OutputDir:
    """The output folder, written atomically through a locked sibling ``.NAME.merger-partial``.

    The partial folder's name depends only on the output's, so a run killed half-way leaves it
    where the next run for the same output finds it: to resume it, or to remove it. An exclusive
    ``flock`` on it keeps two runs from writing the same output at once (the kernel drops the
    lock when a process dies, even with SIGKILL).

    Args:
        final: where the merged model should end up.
        inputs: input folders (and the HF cache) the output must not be inside of.
        force: replace an existing ``final``.

    Raises:
        OutputError: ``final`` exists (without ``force``, or with it but not written by merger),
            overlaps an input, would be taken for a revision, or can't be created because a parent
            is a file (``owned.py``: what merger may replace).
    """

    def __init__(self, final: str | Path, *, inputs: list[str] = (), force: bool = False):
        given = Path(final).expanduser().absolute()
        if given.is_symlink() and not given.exists():
            raise OutputError(f"output {given} is a symbolic link to a missing path ({os.readlink(given)})",
                              hint="remove the link, or choose another --output")
        # resolved once: every later step (partial sibling, replace, publish) uses the real path
        self.final = Path(os.path.realpath(given))
        self.partial = self.final.parent / f".{self.final.name}.merger-partial"
        self.force = force
        self.tmp: Path | None = None
        self.notes: list[str] = []  # what create() did that a person should know (a stale partial removed)
        self._lock_fd = -1
        if self.final.exists() and not force:
            raise OutputError(f"output folder {self.final} already exists",
                              hint="choose another --output, or pass --force to replace it")
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"output {self.final} exists and is not a folder", hint="choose another --output")
        real = self.final
        for inp in inputs:
            ip = Path(inp).resolve()
            if _is_within(real, ip) or _is_within(ip, real):
                raise OutputError(f"output folder {self.final} overlaps the input {inp}",
                                  hint="write the merged model somewhere outside the inputs")
        check_not_a_revision(self.final, inputs)
        if self.final.exists():
            check_owned(self.final)
        anc = self.final.parent
        while not anc.exists() and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            raise OutputError(f"can't create the output folder {self.final}: {anc} is a file, not a folder",
                              hint="choose an --output location whose parents are folders")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise OutputError(f"can't create the output folder {self.final}: {anc} is not writable",
                              hint="choose a writable --output location")

    def create(self, *, keep: bool = False) -> Path:
        """Create (or, with ``keep``, reuse) the locked partial folder and return it.

        Without ``keep``, whatever an earlier, interrupted run left there is removed (and said
        so in :attr:`notes`).

        Raises:
            OutputError: the folder can't be created, or another run holds it.
        """
        fd = open_partial(self.partial)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"another merger run is writing {self.final} (into {self.partial})",
                              hint="wait for it to finish, or choose another --output") from None
        self._lock_fd = fd
        self.tmp = self.partial
        try:
            check_partial_owned(self.partial, fd)
            (self.partial / PARTIAL_MARK).touch()
        except BaseException:
            self.release()
            raise
        if not keep and any(p.name != PARTIAL_MARK for p in self.partial.iterdir()):
            self.clear()
            self.notes.append(f"removed the unfinished output of an earlier, interrupted run ({self.partial}); "
                              "pass --resume to continue such a run instead")
        return self.partial

    def clear(self, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the partial folder except the names in ``keep``."""
        assert self.tmp is not None
        for p in self.tmp.iterdir():
            if p.name in keep or p.name == PARTIAL_MARK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    def read_progress(self) -> dict | None:
        """``progress.json`` of the partial folder, or None when absent or unreadable."""
        assert self.tmp is not None
        try:
            d = json.loads((self.tmp / PROGRESS).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) and isinstance(d.get("shards"), dict) else None

    def write_progress(self, state: dict) -> None:
        """Replace ``progress.json`` atomically (temp file, rename)."""
        assert self.tmp is not None
        try:
            write_atomic(self.tmp / PROGRESS, lambda p: p.write_text(json.dumps(state, indent=1)))
        except OSError as e:
            raise write_failed(f"writing {self.tmp / PROGRESS}", e) from e

    def publish(self) -> Path:
        """Rename the finished partial folder to its final name (replacing the old with force)."""
        assert self.tmp is not None
        (self.tmp / PROGRESS).unlink(missing_ok=True)
        (self.tmp / PARTIAL_MARK).unlink(missing_ok=True)
        old = None
        if os.path.lexists(self.final):
            if not self.force:
                raise OutputError(f"output folder {self.final} appeared while merging",
                                  hint="choose another --output, or pass --force to replace it")
            check_owned(self.final)
            old = self.final.parent / f".{self.final.name}.merger-old-{secrets.token_hex(3)}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        self.tmp = None
        self.release()
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def release(self) -> None:
        """Drop the lock, leaving the partial folder (if any) in place."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self.tmp = None

    def discard(self) -> None:
        """Remove the partial folder and drop the lock."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.release()
