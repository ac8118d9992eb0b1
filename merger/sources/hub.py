"""Hub sources: a repo id's branches as revisions, each pinned to its commit before any download.

Online, revisions are listed with ``HfApi.list_repo_refs`` and files (sizes, LFS sha256) with
``HfApi.model_info(files_metadata=True)``; offline (see ``hflocal.is_offline``) both come from the
local HF cache, read through huggingface_hub's ``scan_cache_dir`` (``merger/sources/hflocal.py``): a
weight file's sha256 is its per-repo blob name (the LFS etag). Only the files a merge needs are
downloaded (weights and index, config, tokenizer), with ``hf_hub_download`` at the pinned commit.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from merger.errors import SourceError, UsageError
from merger.formats.hf_folder import COPY_FILES
from merger.sources.hflocal import CachedRepo, cache_dir, cached_snapshot, delete_downloaded, is_offline, is_repo_id
from merger.sources.source import Source
from merger.sources.spec import parse_spec, parse_step, select

looks_like_repo_id = is_repo_id  # the package's one repo-id test (merger.sources.hflocal)


def repo_folder_name(repo_id: str, repo_type: str = "model") -> str:
    """``EleutherAI/pythia-70m`` -> ``models--EleutherAI--pythia-70m`` (the HF cache's folder name)."""
    return f"{repo_type}s--" + repo_id.replace("/", "--")


def needed_files(names: list[str]) -> list[str]:
    """The files a merge reads from one revision, in transformers' precedence (as
    ``formats.hf_folder.WEIGHT_FILES``): ``model.safetensors``, else the safetensors index and its
    shards, else ``pytorch_model.bin``, else its index and shards; plus config and tokenizer files."""
    st = [n for n in names if n.endswith(".safetensors") and "/" not in n]
    shards = [n for n in st if re.fullmatch(r"model-\d+-of-\d+\.safetensors", n)]
    bins = [n for n in names if re.fullmatch(r"pytorch_model-\d+-of-\d+\.bin", n)]
    if "model.safetensors" in names:
        weights = ["model.safetensors"]
    elif "model.safetensors.index.json" in names:
        weights = ["model.safetensors.index.json"] + shards
    elif "pytorch_model.bin" in names:
        weights = ["pytorch_model.bin"]
    elif "pytorch_model.bin.index.json" in names:
        weights = ["pytorch_model.bin.index.json"] + bins
    else:
        weights = st  # safetensors under other names: all of them
    return weights + [n for n in COPY_FILES if n in names]


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
    cache = CachedRepo(repo_id)
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
        listing = cache.files(commit) if offline else _online_files(repo_id, commit)
        files = needed_files(sorted(listing))
        if not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise SourceError(f"{repo_id}@{name} (commit {commit[:12]}) has no weights"
                              + (" in the local cache" if offline else ""),
                              hint="download it once without HF_HUB_OFFLINE" if offline else "pick another revision")
        path = cached_snapshot(repo_id, commit, files)
        if path and not offline:  # cached before, perhaps downloaded by sha: the branch now resolves offline too
            write_ref(repo_id, name, commit)
        sources.append(Source(name, available[name], path, repo_id=repo_id, revision=name, commit=commit,
                              files=tuple((f, listing[f][0], listing[f][1]) for f in files)))
    return sources


def _ref_path(repo_id: str, revision: str) -> Path:
    return cache_dir() / repo_folder_name(repo_id) / "refs" / revision


def write_ref(repo_id: str, revision: str, commit: str) -> None:
    """``refs/<revision>`` in the HF cache holding ``commit``, as huggingface_hub writes it when it
    downloads by branch name: merger downloads by commit sha, which leaves no ref, and an offline
    run later could not find the branch. Written only for a branch name (not a sha) the Hub
    resolved to ``commit``; atomically, so a reader never sees half a sha."""
    import os
    import tempfile

    if not revision or revision == commit or re.fullmatch(r"[0-9a-f]{40}", revision):
        return
    ref = _ref_path(repo_id, revision)
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=ref.parent, prefix=".ref-")
        with os.fdopen(fd, "w") as f:
            f.write(commit)
        os.replace(tmp, ref)
    except OSError:  # a read-only cache: the merge itself doesn't need the ref
        pass


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
        local = hf_hub_download(source.repo_id, f, revision=source.commit, cache_dir=str(cache_dir()),
                                local_files_only=is_offline())
        folder = Path(local).parent if "/" not in f else Path(local).parents[f.count("/")]
    if not is_offline():
        write_ref(source.repo_id, source.revision, source.commit)
    return Source(source.name, source.step, str(folder), repo_id=source.repo_id, revision=source.revision,
                  commit=source.commit, files=source.files)


def delete_revision(source: Source, downloaded) -> int:
    """Remove the files of ``source`` that this run downloaded (``downloaded``: their names) from the
    cache (``--no-keep``), through huggingface_hub (see :func:`merger.sources.hflocal.delete_downloaded`):
    files cached before the run, and blobs anything else references, stay; so do ``refs/`` files, but
    the revision's own (:func:`write_ref`) when nothing of its commit is left. Returns the bytes freed.
    """
    return delete_downloaded(source.repo_id, source.commit, downloaded, ref=source.revision)
