"""Local runs: a folder of revisions, selected with ``--revisions``: subfolders (``step1000/``,
``checkpoint-1000/``, ``iter_0001000/``, torchtune's ``epoch_3/``, nanoGPT ``out-*/ckpt.pt`` with its
``iter_num`` inside) or checkpoint files (``ckpt_3000.pt``, ``model_000100.pt``, ``iter_500.pt``,
``epoch=1-step=500.ckpt``, Composer's ``ep0-ba500-rank0.pt``), or explicit checkpoint folders or files
merged as given (a revision folder whose checkpoint lies in a subfolder, such as a Trainer's
``checkpoint-1000/pytorch_model_fsdp_0/``, or in a file, such as litgpt's ``step-00000060/lit_model.pth``
or DeepSpeed's ``global_step40/mp_rank_00_model_states.pt``, too).

A revision's step comes from its name; for a checkpoint whose name has none (``lit_model.pth``,
``sharded/``), from the folder it lies in, named by step; else from the counters its file records
(``torch_pt.step_inside``). A symlink to another revision of the folder (Composer's
``latest-rank0.pt``) is not a revision of its own; a copy of one (Lightning's ``last.ckpt``) has no step
of its own (:func:`local_revisions`).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from merger.errors import MergerError, SourceError, UsageError
from merger.formats import detect
from merger.sources.source import Source
from merger.sources.spec import RevisionSpec, name_order, parse_spec, parse_step, select


def has_weights(path: Path) -> bool:
    """Whether ``path`` is a checkpoint of a registered format."""
    return detect(path) is not None


_NOT_MODEL = re.compile(r"optim|sched|rng|scaler|training_args")  # a trainer's other torch.save files


def _prefer_model(found: list[Path]) -> Path | None:
    found = [c for c in found if "model" in c.name] if len(found) > 1 else found
    return found[0] if len(found) == 1 else None


def checkpoint_dir(path: Path) -> Path | None:
    """``path`` if it holds a checkpoint, else its one subfolder that does, preferring a name with "model"
    (OLMo-core's ``step1000/model_and_optim/``, Accelerate's ``pytorch_model_fsdp_0/``); else, where no
    subfolder does, its one checkpoint file whose name carries no step and isn't an optimizer's, a
    scheduler's or RNG state, preferring a name with "model" (litgpt's ``lit_model.pth``, DeepSpeed's
    ``mp_rank_00_model_states.pt`` beside ``*_optim_states.pt``); else None (a folder of step-named
    files is a run folder)."""
    if has_weights(path):
        return path
    children = sorted(path.iterdir())
    subs = [c for c in children if c.is_dir() and has_weights(c)]
    if subs:
        return _prefer_model(subs)
    return _prefer_model([c for c in children if c.is_file() and parse_step(c.stem) is None
                          and not _NOT_MODEL.search(c.name) and has_weights(c)])


def revision_dir(path: Path) -> Path | None:
    """The checkpoint of a folder given as one revision: ``path`` if it holds one; for a folder named by
    step whose checkpoint lies in a subfolder or file not named by step (HF Trainer's ``checkpoint-1000/``
    with Accelerate's ``pytorch_model_fsdp_0/`` beside ``optimizer_0/``, OLMo-core's ``step1000/``,
    litgpt's ``step-00000060/lit_model.pth``), that; else None (a run folder of revisions)."""
    if has_weights(path):
        return path
    if not path.is_dir() or parse_step(path.name) is None:
        return None
    sub = checkpoint_dir(path)
    return sub if sub is not None and parse_step(revision_name(sub)) is None else None


def step_inside(p: Path) -> int | None:
    """The step the checkpoint at ``p`` (a file, or a folder's checkpoint) records, if its format can
    tell (``torch_pt.step_inside``: nanoGPT's ``iter_num``, litgpt's ``step_count``, DeepSpeed's
    ``global_steps`` ...); None if not, or if it can't be read (reported if it is selected)."""
    ck = checkpoint_dir(p) if p.is_dir() else p
    inside = getattr(detect(ck), "step_inside", None) if ck is not None else None
    try:
        return inside(ck) if inside is not None else None
    except MergerError:
        return None


def step_of(p: Path) -> int | None:
    """The step in a revision's name (a file's without its suffix); for one without, the step its
    checkpoint records (:func:`step_inside`)."""
    step = parse_step(revision_name(p))
    return step if step is not None else step_inside(p)


def revision_name(p: Path) -> str:
    """A revision's name: a folder's name, a file's without its suffix (``ckpt_3000``)."""
    return p.stem if p.is_file() else p.name


def _explicit(p: Path) -> Source:
    """A checkpoint folder or file given by path. One not named by step inside a folder that is
    (OLMo-core's ``step1000/model_and_optim``, torchtitan's ``step-1000/sharded``, Accelerate's
    ``checkpoint-10/pytorch_model_fsdp_0``, litgpt's ``step-00000060/lit_model.pth``, DeepSpeed's
    ``global_step40/mp_rank_00_model_states.pt``) takes its parent's name and step."""
    if parse_step(revision_name(p)) is None and parse_step(p.parent.name) is not None:
        return Source(p.parent.name, parse_step(p.parent.name), str(revision_dir(p)))
    return Source(revision_name(p), step_of(p), str(revision_dir(p)))


MANIFEST = "merger.json"  # what every output of merger holds (output/manifest.py)


def merger_output(p: Path) -> bool:
    """Whether ``p`` is a merge merger wrote (a folder holding ``merger.json``), or one it is writing
    (``.NAME.merger-partial``): never a revision of the run it lies in."""
    return p.is_dir() and (p.name.endswith(".merger-partial") or (p / MANIFEST).is_file())


def revision_paths(root: Path) -> dict[str, Path]:
    """Subfolders and files of ``root`` that hold a checkpoint (a folder: in itself, in one subfolder or
    in one file, see :func:`checkpoint_dir`), by revision name; a symlink to another of them (Composer's
    ``latest-rank0.pt``, a ``latest/`` folder) left out, and so are merger's own outputs
    (:func:`merger_output`: ``-o run/avg`` is not the run's latest revision next time)."""
    found = {revision_name(p): p for p in sorted(root.iterdir()) if not merger_output(p)
             and (checkpoint_dir(p) is not None if p.is_dir() else has_weights(p))}
    real = {p.resolve() for p in found.values() if not p.is_symlink()}
    return {n: p for n, p in found.items() if not (p.is_symlink() and p.resolve() in real)}


def local_revisions(root: Path) -> dict[str, int | None]:
    """Subfolders and files of ``root`` that hold a checkpoint: name -> step (None if none is known).

    A step read from a file's counters that a revision named by step already has is left out (None): that
    file is a copy of the named one (Lightning's ``last.ckpt``, Composer's ``latest-rank0.pt`` where it is
    not a symlink), so ranges take the named one only; it stays selectable by its name."""
    paths = revision_paths(root)
    named = {n: parse_step(n) for n in paths}
    taken = {s for s in named.values() if s is not None}
    inside = {n: step_inside(p) for n, p in paths.items() if named[n] is None}
    return {n: named[n] if named[n] is not None else (None if inside[n] in taken else inside[n]) for n in paths}


def survey(root: Path) -> str:
    """What a folder without checkpoints holds, for an error: its subfolders grouped by name pattern
    with the files they hold (``6 step-*/ folders holding lit_model.pth, model_config.yaml``), and
    its files by suffix."""
    entries = sorted(root.iterdir())
    if not entries:
        return "it is empty"
    groups: dict[str, list[Path]] = {}
    for d in (e for e in entries if e.is_dir()):
        groups.setdefault(re.sub(r"\d+", "*", d.name), []).append(d)
    parts = []
    for pattern, dirs in list(groups.items())[:4]:
        held = Counter(f.name for d in dirs for f in sorted(d.iterdir()))
        common = [f for f, _ in held.most_common(4)]
        what = f"holding {', '.join(common)}" + (" ..." if len(held) > 4 else "") if common else "empty"
        parts.append(f"{len(dirs)} {pattern}/ folder{'s' if len(dirs) > 1 else ''} {what}")
    if len(groups) > 4:
        parts.append(f"{sum(len(v) for v in list(groups.values())[4:])} other folders")
    files = Counter(e.suffix or e.name for e in entries if not e.is_dir())
    if files:
        parts.append(f"{sum(files.values())} file{'s' if sum(files.values()) > 1 else ''} ("
                     + ", ".join(f"{n} {s}" for s, n in files.most_common(4)) + ")")
    return "it holds " + "; ".join(parts)


def _no_checkpoints(root: Path) -> SourceError:
    return SourceError(
        f"{root}: found no checkpoint in it or in its subfolders: {survey(root)}",
        hint="merger reads Hugging Face folders (model.safetensors, pytorch_model.bin or their index), DCP "
             "folders (.metadata) and torch.save files (.pt, .pth, .ckpt: a folder's one such file, or its one with "
             "'model' in its name); give the checkpoints themselves, e.g. merger average run/step-1/x.pt "
             "run/step-2/x.pt")


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
        if not root.is_dir():
            raise SourceError(f"{root}: not a checkpoint file", hint="give a .pt/.pth/.ckpt file, a checkpoint "
                              "folder, or a folder of revision subfolders (step1000/ ...)")
        available = local_revisions(root)
        if not available:
            raise _no_checkpoints(root)
        if revisions is None:
            if every is not None:
                raise UsageError("--every needs --revisions A..B", hint="e.g. --revisions ..step9000 --every 1000")
            names = select(available, RevisionSpec(is_range=True), None, where=str(root)) \
                if any(s is not None for s in available.values()) else sorted(available, key=name_order)
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
        srcs.sort(key=lambda s: s.step)  # stable: checkpoints of one step keep the order given
    return srcs
