"""Local runs: a folder of revisions, selected with ``--revisions``: subfolders (``step1000/``,
``checkpoint-1000/``, ``iter_0001000/``, nanoGPT ``out-*/ckpt.pt`` with its ``iter_num`` inside) or
checkpoint files (``ckpt_3000.pt``, ``model_000100.pt``, ``iter_500.pt``, ``epoch=1-step=500.ckpt``), or
explicit checkpoint folders or files merged as given (a revision folder whose checkpoint lies in a
subfolder, such as a Trainer's ``checkpoint-1000/pytorch_model_fsdp_0/``, too).
"""

from __future__ import annotations

from pathlib import Path

from merger.errors import MergerError, SourceError, UsageError
from merger.formats import detect
from merger.sources.source import Source
from merger.sources.spec import RevisionSpec, parse_spec, parse_step, select


def has_weights(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of a registered format."""
    return detect(path) is not None


def checkpoint_dir(path: Path) -> Path | None:
    """``path`` if it holds a checkpoint, else its one subfolder that does, preferring a name with "model"
    (OLMo-core's ``step1000/model_and_optim/``, Accelerate's ``pytorch_model_fsdp_0/``); else None."""
    if has_weights(path):
        return path
    subs = [c for c in sorted(path.iterdir()) if c.is_dir() and has_weights(c)]
    subs = [c for c in subs if "model" in c.name] if len(subs) > 1 else subs
    return subs[0] if len(subs) == 1 else None


def revision_dir(path: Path) -> Path | None:
    """The checkpoint of a folder given as one revision: ``path`` if it holds one; for a folder named by
    step whose checkpoint lies in a subfolder not named by step (HF Trainer's ``checkpoint-1000/`` with
    Accelerate's ``pytorch_model_fsdp_0/`` beside ``optimizer_0/``, OLMo-core's ``step1000/``), that
    subfolder; else None (a run folder of revisions)."""
    if has_weights(path):
        return path
    if not path.is_dir() or parse_step(path.name) is None:
        return None
    sub = checkpoint_dir(path)
    return sub if sub is not None and parse_step(sub.name) is None else None


def step_of(p: Path) -> int | None:
    """The step in a revision's name (a file's without its suffix); for a folder without one, the
    step its checkpoint records (nanoGPT's ``iter_num``), if its format can tell."""
    step = parse_step(p.stem if p.is_file() else p.name)
    inside = getattr(detect(p), "step_inside", None) if step is None and p.is_dir() else None
    if inside is not None:
        try:
            step = inside(p)
        except MergerError:  # unreadable: reported if it is selected
            step = None
    return step


def revision_name(p: Path) -> str:
    """A revision's name: a folder's name, a file's without its suffix (``ckpt_3000``)."""
    return p.stem if p.is_file() else p.name


def _explicit(p: Path) -> Source:
    """A checkpoint folder given by path. One not named by step inside a folder that is (OLMo-core's
    ``step1000/model_and_optim``, torchtitan's ``step-1000/sharded``, Accelerate's
    ``checkpoint-10/pytorch_model_fsdp_0``) takes its parent's name and step."""
    if p.is_dir() and step_of(p) is None and parse_step(p.parent.name) is not None:
        return Source(p.parent.name, parse_step(p.parent.name), str(revision_dir(p)))
    return Source(revision_name(p), step_of(p), str(revision_dir(p)))


def revision_paths(root: Path) -> dict[str, Path]:
    """Subfolders and files of ``root`` that hold a checkpoint (a folder: in itself or in one
    subfolder, see :func:`checkpoint_dir`), by revision name."""
    return {revision_name(p): p for p in sorted(root.iterdir())
            if (checkpoint_dir(p) is not None if p.is_dir() else has_weights(p))}


def local_revisions(root: Path) -> dict[str, int | None]:
    """Subfolders and files of ``root`` that hold a checkpoint: name -> step (None if unnamed by step)."""
    return {n: step_of(p) for n, p in revision_paths(root).items()}


def resolve_local(models: list[str], revisions: str | None, every: int | None) -> list[Source]:
    """Sources from local paths: one root of revision folders, or explicit checkpoint folders.

    Raises:
        SourceError: a path that doesn't exist or holds no checkpoints.
        UsageError / RevisionNotFoundError: see :func:`select`.
    """
    paths = [Path(m).expanduser() for m in models]
    for p in paths:
        if not p.exists():
            raise SourceError(f"{p}: no such folder or file", hint="give a checkpoint folder, a folder of revision "
                              "subfolders (step1000/ ...) or a Hub repo id such as EleutherAI/pythia-70m")
    if len(paths) == 1 and revision_dir(paths[0]) is None:
        root = paths[0].resolve()
        available = local_revisions(root)
        if not available:
            raise SourceError(f"{root}: no checkpoint folders inside (no step1000/, checkpoint-1000/ ... "
                              "holding model.safetensors or pytorch_model.bin)",
                              hint="point at the folder that holds the revision subfolders")
        if revisions is None:
            if every is not None:
                raise UsageError("--every needs --revisions A..B", hint="e.g. --revisions ..step9000 --every 1000")
            names = select(available, RevisionSpec(is_range=True), None, where=str(root)) \
                if any(s is not None for s in available.values()) else sorted(available)
        else:
            names = select(available, parse_spec(revisions), every, where=str(root))
        paths = revision_paths(root)
        return [Source(n, available[n], str(checkpoint_dir(paths[n]) if paths[n].is_dir() else paths[n]))
                for n in names]
    if revisions is not None or every is not None:
        raise UsageError("--revisions/--every select subfolders of one folder; explicit checkpoint folders "
                         "are merged as given", hint="drop --revisions, or give the parent folder")
    for p in paths:
        if revision_dir(p) is None:
            raise SourceError(f"{p}: no checkpoint inside (no model.safetensors, pytorch_model.bin or their index)",
                              hint="give checkpoint folders, or one folder of revision subfolders")
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise UsageError("the same checkpoint folder is given twice", hint="list each checkpoint once")
    srcs = [_explicit(p) for p in resolved]
    if all(s.step is not None for s in srcs):
        srcs.sort(key=lambda s: s.step)
    return srcs
