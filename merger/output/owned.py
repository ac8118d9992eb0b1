"""What merger may replace, empty or publish over: only what it wrote itself.

:class:`~merger.output.folder.OutputDir` calls these checks; each refuses with an
:class:`~merger.errors.OutputError` that names the path and says what to do.

- The partial folder ``.NAME.merger-partial`` is opened with ``O_NOFOLLOW``: a symbolic link
  there (to an input, to a home folder) is refused, never followed or emptied, and never
  removed either: merger didn't make it, and a person may rely on it. A partial folder that holds
  files but neither merger's marker (:data:`PARTIAL_MARK`) nor ``progress.json`` is refused too.
- ``--force`` replaces an existing output only when it holds a ``merger.json`` that merger wrote
  (a regular file, a JSON object with ``merger_version``): ``-o . --force`` in a home folder is
  refused.
- An output whose name reads as a step (``step999``, ``checkpoint-5``) placed next to an input
  revision would be taken for a revision by the next merge of that run: refused.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from merger.errors import OutputError
from merger.sources.spec import parse_step

PARTIAL_MARK = ".merger-partial"  # written into the partial folder as soon as it is locked
PROGRESS = "progress.json"
MAX_MANIFEST = 64 << 20


def open_partial(partial: Path) -> int:
    """Create ``partial`` if needed and open it without following a symbolic link; returns the fd.

    Raises:
        OutputError: ``partial`` is a link, not a folder, or can't be created.
    """
    try:
        partial.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(partial)
    except FileExistsError:
        pass
    except OSError as e:
        raise OutputError(f"can't create the output folder {partial}: {e.strerror or e}",
                          hint="choose a writable --output location") from e
    try:
        return os.open(partial, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        if os.path.islink(partial):
            raise OutputError(f"{partial} (merger's partial folder for this output) is a symbolic link to "
                              f"{os.readlink(partial)}; merger never follows or empties it",
                              hint=f"remove the link {partial} yourself (its target is left alone), or choose "
                                   "another --output") from None
        if e.errno in (errno.ENOTDIR, errno.ELOOP):
            raise OutputError(f"{partial} (merger's partial folder for this output) exists and is not a folder",
                              hint=f"move or remove {partial}, or choose another --output") from None
        raise OutputError(f"can't open the output folder {partial}: {e.strerror or e}",
                          hint="choose a writable --output location") from e


def check_partial_owned(partial: Path, fd: int) -> None:
    """The locked partial folder (open as ``fd``) must be ours: our uid, still the same folder at
    that path, and empty or marked by merger (a marker file or ``progress.json``).

    Raises:
        OutputError: naming the folder and what is wrong.
    """
    st = os.fstat(fd)
    lst = os.lstat(partial)
    if (lst.st_dev, lst.st_ino) != (st.st_dev, st.st_ino):
        raise OutputError(f"{partial} was replaced while merger opened it",
                          hint="make sure nothing else writes next to the output, and run again")
    if st.st_uid != os.getuid():
        raise OutputError(f"{partial} belongs to another user (uid {st.st_uid}); merger won't write into it",
                          hint=f"remove {partial}, or choose another --output")
    names = set(os.listdir(fd))
    if names and PARTIAL_MARK not in names and PROGRESS not in names:
        shown = ", ".join(sorted(names)[:5]) + (" ..." if len(names) > 5 else "")
        raise OutputError(f"{partial} holds files merger didn't write ({shown}); merger won't empty it",
                          hint=f"move those files away or remove {partial} yourself, or choose another --output")


def is_merger_output(folder: Path) -> bool:
    """Whether ``folder`` holds a ``merger.json`` written by merger (a regular file, a JSON object
    with ``merger_version``)."""
    f = folder / "merger.json"
    try:
        st = os.lstat(f)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST:
            return False
        d = json.loads(f.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "merger_version" in d


def check_owned(final: Path) -> None:
    """``--force`` may replace ``final`` only if merger wrote it.

    Raises:
        OutputError: ``final`` is a link, or holds no ``merger.json`` of merger's.
    """
    if os.path.islink(final) or not final.is_dir() or not is_merger_output(final):
        raise OutputError(f"output folder {final} exists and is not a merger output (no merger.json of "
                          "merger's in it); --force replaces only folders merger wrote",
                          hint=f"choose another --output, or move {final} away yourself")


def check_not_a_revision(final: Path, inputs) -> None:
    """Refuse an output named like a revision (``step999``) beside an input revision: the next
    merge of that run would average it in.

    Raises:
        OutputError: naming the output and the run folder.
    """
    if parse_step(final.name) is None:
        return
    for inp in inputs:
        if inp and Path(os.path.realpath(inp)).parent == final.parent:
            raise OutputError(f"output folder {final} would sit among the revisions of {final.parent} "
                              f"(beside {Path(inp).name}): a later merge of that run would take it for a revision",
                              hint="write the merged model outside the run folder, or give it a name that "
                                   "is not a step (e.g. merged-lawa)")
