"""Hub sources: a repo id's branches as revisions, each pinned to its commit before any download.

Online, revisions are listed with ``HfApi.list_repo_refs`` and files (sizes, LFS sha256) with
``HfApi.model_info(files_metadata=True)``; offline (``HF_HUB_OFFLINE=1``) both come from the local
HF cache: ``refs/<branch>`` holds the commit, ``snapshots/<commit>/`` the files, and a weight file's
blob is named by its sha256. Only the files a merge needs are downloaded (weights and index,
config, tokenizer), with ``hf_hub_download`` at the pinned commit.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from merger.errors import SourceError, UsageError
from merger.formats.hf_folder import COPY_FILES
from merger.sources.source import Source
from merger.sources.spec import parse_spec, parse_step, select

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``EleutherAI/pythia-70m`` -> ``models--EleutherAI--pythia-70m`` (the HF cache's folder name)."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


def looks_like_repo_id(text: str) -> bool:
    return bool(_REPO_ID.match(text)) and ".." not in text


def cache_dir() -> Path:
    """The hub cache in force now (``HF_HUB_CACHE``, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()


def is_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().lower() in ("1", "true", "yes", "on")
    return bool(constants.HF_HUB_OFFLINE)


def needed_files(names: list[str]) -> list[str]:
    """The files a merge reads from one revision: safetensors if present, else ``pytorch_model*.bin``,
    with their index, plus config and tokenizer files."""
    st = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    st_index = [n for n in names if n == "model.safetensors.index.json"]
    bins = [n for n in names if re.fullmatch(r"pytorch_model(-\d+-of-\d+)?\.bin", n)]
    bin_index = [n for n in names if n == "pytorch_model.bin.index.json"]
    weights = (st_index + [n for n in st if n.startswith("model")]) if st else (bin_index + bins)
    if st and not [n for n in st if n.startswith("model")]:
        weights = st
    return weights + [n for n in COPY_FILES if n in names]


class _Cache:
    """Read-only view of one repo in the local HF cache."""

    def __init__(self, repo_id: str):
        self.root = cache_dir() / repo_folder_name(repo_id)

    def refs(self) -> dict[str, str]:
        refs = self.root / "refs"
        if not refs.is_dir():
            return {}
        out = {}
        for p in sorted(refs.rglob("*")):
            name = p.relative_to(refs).as_posix()
            if p.is_file() and not name.startswith("pr/"):
                out[name] = p.read_text().strip()
        return out

    def files(self, commit: str) -> dict[str, tuple[int, str | None]]:
        snap = self.root / "snapshots" / commit
        out = {}
        if snap.is_dir():
            for p in sorted(snap.rglob("*")):
                if p.is_file():
                    blob = Path(os.path.realpath(p)).name
                    out[p.relative_to(snap).as_posix()] = (p.stat().st_size, blob if _SHA256.match(blob) else None)
        return out


def _online_refs(repo_id: str) -> dict[str, str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        refs = HfApi().list_repo_refs(repo_id)
    except RepositoryNotFoundError:
        raise SourceError(f"{repo_id}: no such model repo on the Hub (or it is private)",
                          hint="check the repo id, or log in with `hf auth login` for private repos") from None
    return {b.name: b.target_commit for b in refs.branches}


def _online_files(repo_id: str, commit: str) -> dict[str, tuple[int, str | None]]:
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=commit, files_metadata=True)
    return {s.rfilename: (s.size or 0, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []}


def resolve_hub(repo_id: str, revisions: str | None, every: int | None) -> list[Source]:
    """Pinned sources for ``repo_id``'s revisions; ``path`` is set where the cache holds every file.

    Raises:
        SourceError: unknown repo, repo not cached while offline, a revision without weights.
        RevisionNotFoundError / UsageError: see :func:`merger.sources.select`.
    """
    cache = _Cache(repo_id)
    offline = is_offline()
    if offline:
        refs = cache.refs()
        if not refs:
            raise SourceError(
                f"{repo_id} is not in the local HF cache ({cache_dir()}), and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it, or set HF_HUB_CACHE to a cache that holds it")
    else:
        try:
            refs = _online_refs(repo_id)
        except SourceError:
            raise
        except Exception as e:  # no connection: fall back to what the cache knows
            refs = cache.refs()
            if not refs:
                raise SourceError(f"can't reach the Hub to list {repo_id}'s revisions ({type(e).__name__})",
                                  hint="check the network, or set HF_HUB_OFFLINE=1 to use the local cache") from None
            offline = True
    where = f"{repo_id}" + (" (local HF cache)" if offline else "")
    available = {name: parse_step(name) for name in refs}
    if revisions is None:
        steps = sorted(s for s in available.values() if s is not None)
        if len(steps) > 1:
            hint = f"e.g. --revisions step{steps[0]}..step{steps[-1]} --every {max(1, (steps[-1] - steps[0]) // 8)}"
        else:
            hint = f"available: {', '.join(sorted(refs)[:10])}"
        raise UsageError(f"which revisions of {repo_id}? --revisions is required for a Hub repo", hint=hint)
    names = select(available, parse_spec(revisions), every, where=where)
    sources = []
    for name in names:
        commit = refs[name]
        cached = cache.files(commit)
        listing = cached if offline else _online_files(repo_id, commit)
        files = needed_files(sorted(listing))
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise SourceError(f"{repo_id}@{name} (commit {commit[:12]}) has no weights"
                              + (" in the local cache" if offline else ""),
                              hint="download it once without HF_HUB_OFFLINE" if offline else "pick another revision")
        complete = all(f in cached for f in files)
        path = str(cache.root / "snapshots" / commit) if complete else None
        sources.append(Source(name, available[name], path, repo_id=repo_id, revision=name, commit=commit,
                              files=tuple((f, listing[f][0], listing[f][1]) for f in files)))
    return sources


def identical_revisions(sources: list[Source]) -> list[tuple[str, str]]:
    """Pairs (first, other) of revisions whose weight files have the same sha256s (LFS or blob name)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for s in sources:
        key = tuple(sorted((f, sha) for f, _, sha in s.files if f.endswith((".bin", ".safetensors"))))
        if key and all(sha for _, sha in key):
            groups[key].append(s.name)
    return [(names[0], n) for names in groups.values() for n in names[1:]]


def fetch(source: Source) -> Source:
    """Download ``source``'s files at its commit (no-op for cached files); returns it with ``path``."""
    from huggingface_hub import hf_hub_download

    folder = None
    for f, _, _ in source.files:
        local = hf_hub_download(source.repo_id, f, revision=source.commit, cache_dir=str(cache_dir()))
        folder = Path(local).parent if "/" not in f else Path(local).parents[f.count("/")]
    return Source(source.name, source.step, str(folder), repo_id=source.repo_id, revision=source.revision,
                  commit=source.commit, files=source.files)


def delete_revision(source: Source) -> int:
    """Remove a downloaded revision's files from the cache (``--no-keep``).

    Blobs that any other snapshot of the repo links to (an identical config.json, a revision that
    was in the cache before) stay. Returns the bytes freed.
    """
    if not source.path:
        return 0
    snap = Path(source.path)
    kept = set()
    for other in snap.parent.iterdir():
        if other != snap and other.is_dir():
            kept.update(os.path.realpath(p) for p in other.rglob("*") if p.is_symlink())
    freed = 0
    for f, _, _ in source.files:
        link = snap / f
        blob = os.path.realpath(link)
        if link.is_symlink() and blob not in kept and os.path.isfile(blob):
            freed += os.path.getsize(blob)
            os.remove(blob)
        if link.is_symlink() or link.exists():
            link.unlink()
    try:
        snap.rmdir()
    except OSError:
        pass
    return freed
