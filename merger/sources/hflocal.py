"""The local Hugging Face cache, read and pruned through huggingface_hub's own API.

merger never walks ``refs/``, ``snapshots/`` or ``blobs/`` itself: huggingface_hub 2.4 keeps Xet
downloads in a cache-wide shared store (``<cache>/blobs/<xx>/<xet-hash>``, per-repo
``blobs/<etag>`` symlinks into it, ``.refs`` manifests), and only the library knows which entry
another repo still references. So:

- offline resolution reads ``scan_cache_dir`` (a repo's refs and each revision's files, the blob
  entry's *first* symlink hop kept) and ``try_to_load_from_cache`` (is one file cached at a commit);
- a weight file's ``sha256`` is its etag, the name of the per-repo ``blobs/<etag>`` entry (the LFS
  sha256), never the name of the store file it points to (the Xet hash);
- ``--no-keep`` deletes through ``HFCacheInfo.delete_files(...).execute()``, which keeps blobs any
  other cached file references and sweeps the shared store by its manifests.

Also here: the package's one offline check (:func:`is_offline`) and one repo-id test
(:func:`is_repo_id`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from merger.errors import SourceError

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = ("1", "true", "yes", "on")


def is_offline() -> bool:
    """Whether the Hub must not be contacted, by huggingface_hub's own rule, read at call time.

    huggingface_hub sets ``HF_HUB_OFFLINE = HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE`` (a non-empty
    ``HF_HUB_OFFLINE`` wins, ``TRANSFORMERS_OFFLINE`` is only its fallback), so
    ``HF_HUB_OFFLINE=0 TRANSFORMERS_OFFLINE=1`` is online, as it is for transformers and for the
    downloads themselves. The library freezes that at import: merger re-reads the environment, and
    falls back to the frozen ``constants.HF_HUB_OFFLINE`` when neither variable is set.
    """
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return env.strip().lower() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_repo_id(text: str) -> bool:
    """``namespace/name`` that huggingface_hub's ``validate_repo_id`` accepts (merger needs the
    namespace: a bare ``name`` is read as a local path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def cache_dir() -> Path:
    """The hub cache in force now (``HF_HUB_CACHE``, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def _scan():
    """``scan_cache_dir`` of :func:`cache_dir`, or None when there is no cache yet."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return scan_cache_dir(cache_dir())
    except CacheNotFound:
        return None


def _repo(info, repo_id: str):
    """``repo_id``'s ``CachedRepoInfo`` in the scan ``info``; SourceError if the scan found it corrupted."""
    from huggingface_hub.file_download import repo_folder_name

    if info is None:
        return None
    for repo in info.repos:
        if repo.repo_type == "model" and repo.repo_id == repo_id:
            return repo
    path = str(info.cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model"))
    for w in info.warnings:
        if re.search(re.escape(path) + r"(?=[/)]|$)", str(w)):
            raise SourceError(f"{repo_id}: huggingface_hub reports its cache folder as corrupted: {w}",
                              hint="repair or delete that folder (`hf cache rm`), then download it again")
    return None


def _rel(revision, file) -> str:
    return file.file_path.relative_to(revision.snapshot_path).as_posix()


def _etag_sha256(file) -> str | None:
    """The LFS sha256 of a cached file: its per-repo blob entry's name (the first symlink hop,
    which ``scan_cache_dir`` keeps), whatever store file that entry points to."""
    name = file.blob_path.name
    return name if file.blob_path != file.file_path and _SHA256.fullmatch(name) else None


class CachedRepo:
    """One scan of the cache, seen from one repo: its branches and each commit's files.

    Raises:
        SourceError: huggingface_hub's scan reports this repo's folder as corrupted.
    """

    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self._info, self._scanned = None, False

    @property
    def info(self):
        """The repo's ``CachedRepoInfo`` (None if not cached); the cache is scanned on first use."""
        if not self._scanned:
            self._info, self._scanned = _repo(_scan(), self.repo_id), True
        return self._info

    def refs(self) -> dict[str, str]:
        """Branch or tag name -> commit, as huggingface_hub reads ``refs/`` (PR refs left out)."""
        if self.info is None:
            return {}
        return {ref: rev.commit_hash for ref, rev in self.info.refs.items() if not ref.startswith("refs/")}

    def files(self, commit: str) -> dict[str, tuple[int, str | None]]:
        """File name (relative to the snapshot) -> (size, LFS sha256 or None) of ``commit``."""
        if self.info is None:
            return {}
        for rev in self.info.revisions:
            if rev.commit_hash == commit:
                return {_rel(rev, f): (f.size_on_disk, _etag_sha256(f)) for f in rev.files}
        return {}


def present_files(repo_id: str, commit: str, names) -> frozenset[str]:
    """Those of ``names`` that the cache already holds at ``commit`` (``try_to_load_from_cache``)."""
    from huggingface_hub import try_to_load_from_cache

    return frozenset(n for n in names if isinstance(
        try_to_load_from_cache(repo_id, n, cache_dir=str(cache_dir()), revision=commit), str))


def cached_snapshot(repo_id: str, commit: str, names) -> str | None:
    """The snapshot folder of ``commit`` if the cache holds every one of ``names`` there, else None."""
    from huggingface_hub import try_to_load_from_cache

    names = list(names)
    paths = [try_to_load_from_cache(repo_id, n, cache_dir=str(cache_dir()), revision=commit) for n in names]
    if not names or not all(isinstance(p, str) for p in paths):
        return None
    return str(Path(paths[0]).parents[names[0].count("/")])


def delete_downloaded(repo_id: str, commit: str, names, *, ref: str | None = None) -> int:
    """Remove ``names`` of ``commit`` from the cache (files this run downloaded); return bytes freed.

    Through ``HFCacheInfo.delete_files(...).execute()``: a blob that any other cached file (another
    revision, another repo through the shared store) still references stays, and the shared store
    is swept by its ``.refs`` manifests. Refs and other files of the snapshot are never touched.
    What the library lacks, and merger does here: ``delete_files`` keeps the snapshot folder even
    when it is left empty, while ``delete_revisions`` would remove the whole repo folder (partial
    downloads and refs that merger doesn't own) when it is the repo's only revision; so an empty
    snapshot folder that no ref names is removed with ``os.rmdir`` (which never removes content).
    A repo the scan reports as corrupted is left alone: nothing is deleted. ``ref``: the branch this
    revision was fetched as; when every file of the commit goes and that ref is the only one naming
    it, the ref goes too (merger writes it, ``hub.write_ref``: a ref to nothing cached helps no one).
    """
    names = set(names)
    info = _scan()  # one scan: delete_files matches the CachedFileInfo values of this same scan
    try:
        repo = _repo(info, repo_id)
    except SourceError:
        return 0
    rev = next((r for r in repo.revisions if r.commit_hash == commit), None) if repo else None
    if rev is None:
        return 0
    ours = [f for f in rev.files if _rel(rev, f) in names]
    if not ours:
        return 0
    strategy = info.delete_files(*ours)
    strategy.execute()
    refs = set(rev.refs)
    if len(ours) == len(rev.files) and ref and refs == {ref}:
        path = Path(repo.repo_path) / "refs" / ref
        try:
            if path.read_text().strip() == commit:
                path.unlink()
                refs = set()
        except OSError:
            pass
    if len(ours) == len(rev.files) and not refs:
        try:
            os.rmdir(rev.snapshot_path)
        except OSError:  # not empty (a file appeared meanwhile): keep it
            pass
    return strategy.expected_freed_size
