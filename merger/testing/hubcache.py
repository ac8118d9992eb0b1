"""Write checkpoints into a Hugging Face hub cache, laid out exactly as huggingface_hub does.

``<cache>/models--ORG--NAME/refs/<revision>`` holds a 40-hex commit sha (no newline),
``snapshots/<sha>/<file>`` is a relative symlink to ``blobs/<etag>``; weight files (LFS on the
Hub) are named by their sha256, small files by their git blob sha1. merger then reads such a repo
offline (``HF_HUB_OFFLINE=1``) through the same code path as a real Hub download. Used by the
tests' offline Pythia cache and by ``examples/`` to publish a locally trained trajectory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from merger.sources.hub import repo_folder_name

LFS_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".model", ".gguf", ".h5", ".msgpack")


def file_sha256(path: str | Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: str | Path) -> str:
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_cache_revision(cache_dir: str | Path, repo_id: str, revision: str, folder: str | Path,
                         *, commit: str | None = None, move: bool = False) -> str:
    """Publish the files of ``folder`` as ``revision`` of ``repo_id`` in the cache; return the commit.

    Args:
        cache_dir: the hub cache (``HF_HUB_CACHE``).
        repo_id: e.g. ``EleutherAI/pythia-70m`` or ``local/tiny-pythia``.
        revision: a branch name such as ``step1000``; written to ``refs/<revision>``.
        folder: a checkpoint folder (flat files).
        commit: the commit sha to use; by default derived from the revision name and file hashes.
        move: move the files into ``blobs/`` instead of copying them.
    """
    repo = Path(cache_dir) / repo_folder_name(repo_id)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    etags = {p.name: (file_sha256(p) if p.name.endswith(LFS_SUFFIXES) else git_blob_sha1(p)) for p in files}
    if commit is None:
        h = hashlib.sha1(revision.encode())
        for name, etag in etags.items():
            h.update(f"{name}:{etag}\n".encode())
        commit = h.hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        blob = repo / "blobs" / etags[p.name]
        if not blob.exists():
            tmp = blob.with_suffix(".incomplete")
            (shutil.move if move else shutil.copyfile)(p, tmp)
            os.replace(tmp, blob)
        link = snap / p.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit
