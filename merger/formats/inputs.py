"""Opening input files: the one place where merger opens what it reads, and checks that it is
still what the plan saw.

- Only regular files are read. A FIFO, socket, device or folder where a weights, index or side file
  should be is refused by name: it is checked with ``stat`` before the open, the open is
  ``O_NONBLOCK`` (a FIFO with no writer can't block it), and the open fd is checked with ``fstat``.
- Running out of file descriptors (``RLIMIT_NOFILE``) while opening every input of a merge gives a
  clear error with the limit and the number needed, and every fd already opened is closed.
- :func:`identity` is a file's (st_dev, st_ino, size, mtime_ns, ctime_ns), recorded in the plan
  for every input file; :func:`check_identity` compares an open fd's ``fstat`` to it, right after
  opening and again after reading, so that an input changed during a merge (even with the same
  size, or its mtime put back with ``touch -r``) is never published.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from pathlib import Path

from merger.errors import CheckpointFormatError, MergerError
from merger.formats.base import RESAVE, fail

Identity = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _not_regular(path, mode: int, what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path}: this {what} is {_kind(mode)}, not a regular file", path=str(path),
                                 hint=f"replace {Path(path).name} with the real file (merger reads only "
                                      "regular files, or links to them)")


def check_regular(path: str | Path, *, what: str = "input file") -> os.stat_result:
    """``stat`` of ``path`` (links followed) if it is a regular file.

    Raises:
        CheckpointFormatError: missing, unreadable, or not a regular file.
    """
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise CheckpointFormatError(f"{path}: can't read this {what}: {getattr(e, 'strerror', None) or e}",
                                    path=str(path),
                                    hint="check that the file exists and is readable") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode, what)
    return st


def too_many_files(needed: int) -> MergerError:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 64
    how = (f"raise it with `ulimit -n {want}` in this shell" if hard == resource.RLIM_INFINITY or want <= hard
           else f"the hard limit is {hard}: ask for a higher one, or merge fewer revisions")
    err = MergerError(f"this merge reads {needed} input files at once, more than the open-file limit allows "
                      f"(ulimit -n: {soft})", hint=f"{how}, then run again; or merge fewer revisions")
    err.needed = needed  # formats.read_checkpoints recounts it for the whole merge
    return err


def open_input(path: str | Path, *, what: str = "input file", needed: int = 1) -> int:
    """Open a regular file for reading without blocking; returns the fd (close it yourself).

    Raises:
        CheckpointFormatError: not a regular file, or can't be opened.
        MergerError: out of file descriptors (``needed``: how many the caller opens in all).
    """
    check_regular(path, what=what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise too_many_files(needed) from None
        raise CheckpointFormatError(f"{path}: can't open this {what}: {e.strerror or e}", path=str(path),
                                    hint="check that the file exists and is readable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
        os.close(fd)
        raise _not_regular(path, st.st_mode, what)
    return fd


def read_input(path: str | Path, *, what: str = "input file", limit: int = 1 << 30) -> bytes:
    """The bytes of a small regular file (an index, a config), at most ``limit``.

    Raises:
        CheckpointFormatError: not a regular file, unreadable, or larger than ``limit``.
    """
    fd = open_input(path, what=what)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise CheckpointFormatError(f"{path}: this {what} is {size} bytes, more than an {what} can be "
                                        f"({limit})", path=str(path), hint="re-download the file")
        with os.fdopen(os.dup(fd), "rb") as f:  # read(n) allocates n bytes first: ask for the size, not the limit
            data = f.read(size + 1)
            return data + f.read(limit + 1 - len(data)) if len(data) > size else data  # it grew meanwhile
    finally:
        os.close(fd)


def open_inputs(paths, *, what: str = "input file") -> dict[str, int]:
    """Open every path (see :func:`open_input`); on any error close the ones already opened.

    Raises:
        CheckpointFormatError, MergerError: as :func:`open_input`.
    """
    paths = list(paths)
    fds: dict[str, int] = {}
    try:
        for p in paths:
            fds[p] = open_input(p, what=what, needed=len(paths))
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def identity(path_or_fd) -> Identity:
    """(st_dev, st_ino, size, mtime_ns, ctime_ns) of a path (links followed) or an open fd."""
    st = os.fstat(path_or_fd) if isinstance(path_or_fd, int) else os.stat(path_or_fd)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def changed_error(path: str, when: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{path} changed {when} (its inode, size, mtime or ctime differ from when the "
                                 "merge was planned); nothing was published", path=path,
                                 hint="don't modify, copy over or re-download inputs during a merge; run again "
                                      "once they are stable")


def check_identity(fds: dict[str, int], planned: dict[str, Identity], *, when: str) -> None:
    """Every open fd must still be the file the plan saw (paths the plan didn't record are skipped).

    Raises:
        CheckpointFormatError: naming the first file that changed.
    """
    for path, fd in fds.items():
        want = planned.get(path)
        if want is not None and identity(fd) != tuple(want):
            raise changed_error(path, when)


def _roots(folder: Path) -> tuple[Path, ...]:
    """Where a checkpoint's files may really lie: the folder itself, or for a snapshot of the HF
    cache (``models--org--name/snapshots/<commit>/``, files linked into ``../../blobs``) its repo
    and the cache-wide Xet blob store (``<cache>/blobs/``, huggingface_hub >= 2.4)."""
    real = folder.resolve()
    for snap in (real, *real.parents):  # a checkpoint may be a subfolder of the snapshot
        if snap.parent.name == "snapshots":
            repo = snap.parent.parent
            return repo, repo.parent / "blobs"
    return (real,)


def contained(folder: str | Path, name: str, *, what: str = "file", hint: str = RESAVE) -> Path:
    """``folder / name``, checked: a relative name without ``..``, a regular file (links followed)
    that really lies inside the checkpoint (:func:`_roots`), never somewhere else on the machine.

    Raises:
        CheckpointFormatError: an absolute or escaping name, one with a NUL byte, a link out of the
            checkpoint, a folder or a device where a file should be.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise fail(folder, f"{what} {name!r} is not a file name inside the checkpoint", hint)
    if "\x00" in name:  # no file has one: os.stat and open raise ValueError on it
        raise fail(folder, f"{what} {name!r:.120} holds a NUL byte, which no file name can", hint)
    path = folder / name
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _roots(folder)):
        raise fail(path, f"is a link to {real}, outside the checkpoint; merger reads and copies only "
                          "the checkpoint's own files", "replace the link with the file itself")
    if path.exists():
        check_regular(path, what=what)  # a FIFO or a folder: refused, never opened
    return path
