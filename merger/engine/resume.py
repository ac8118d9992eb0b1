"""Resuming an interrupted run from what its partial folder holds: one record, ``progress.json``
(:meth:`OutputDir.write_progress`), one fingerprint of what fixes the output, one verification
of every file kept (size and CRC-32), for both schedules.

*blocks*: blocks come in output order, so shards are finished one after another. The writer
closes each shard as soon as its last byte is written and records it, with its CRC-32, in the
partial folder's ``progress.json`` together with the plan's :func:`fingerprint` (the plan, and
each input file's inode, size, mtime and ctime). A run killed half-way (SIGKILL, SIGTERM, power loss; Ctrl-C
too, once a shard is finished) leaves that folder behind. The next run for the same output with
``Options(resume=True)`` checks the fingerprint, verifies the finished shards' CRC-32 and skips
the blocks that only write into them; any other run removes the folder and starts clean.

*stream*: The stream schedule keeps its whole state in memory (one accumulator per averaged tensor, the
first revision's raw bytes, per-chunk "identical so far" flags, the first revision a non-finite
chunk came from), and ``--no-keep`` deletes each revision once folded: a crash after revision k
could only start again from zero, downloading everything again. So after each folded revision
(before it is deleted) that state is written into the partial folder as one safetensors file,
``stream-state.safetensors`` (temp file + rename), and ``progress.json`` records it:

    {"fingerprint": <sources + options>, "shards": {}, "stream": {"folded": k, "plan": <layout>,
     "checksum": "crc32:...", "bytes": N, "bad": {...}, "hashes": {...}, "downloaded": {...}}}

``merger average ... --resume`` then verifies the file (size, CRC-32, the same sources pinned to
the same commits, the same options, the same output layout) and goes on with revision k+1; if
anything doesn't match, it starts from the beginning and says so. The arithmetic is unchanged:
the accumulators are the exact bits an uninterrupted run holds at that point, so the output is
byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os

from pathlib import Path

from merger.output.folder import PROGRESS, OutputDir, write_atomic
from merger.output.owned import PARTIAL_MARK
from merger.output.crc import file_checksum
from merger.plan import Options, Plan
from merger.sources import Source


def verified(f: Path, rec: dict) -> bool:
    """Whether file ``f`` is the one ``rec`` recorded: same size, same CRC-32."""
    try:
        return f.is_file() and f.stat().st_size == rec["bytes"] and file_checksum(f) == rec["checksum"]
    except (TypeError, KeyError):
        return False


def fingerprint(plan: Plan) -> str:
    """sha256 of what fixes the output bytes: the plan, and each input file's path and identity
    (device, inode, size, mtime and ctime: a file rewritten with its size and mtime kept, by
    ``cp -p`` or ``touch -r``, still gets a new ctime).

    Options that don't change the output (``resume``, ``hash_inputs``) are left out.
    """
    d = plan.to_dict()
    d["options"] = {k: v for k, v in d["options"].items() if k not in ("resume", "hash_inputs")}
    files = []
    for path in sorted({p for t in plan.tensors for p in t.files}):
        st = os.stat(path)
        files.append([path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    blob = json.dumps({"plan": d, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_point(out: OutputDir, plan: Plan, fp: str) -> tuple[list[str], dict | None, list[str]]:
    """The leading shards an interrupted run finished that verify (CRC-32, size), the kernel state
    recorded with the last of them, and notes on what was found. Everything else in the partial
    folder is removed."""
    state = out.read_progress()
    if state is None:
        leftovers = any(p.name != PARTIAL_MARK for p in out.tmp.iterdir())
        out.clear()
        return [], None, [f"--resume: {'no record of finished shards in' if leftovers else 'no unfinished run in'} "
                          f"{out.partial}; started from the beginning"]
    if state.get("fingerprint") != fp:
        out.clear()
        return [], None, ["--resume: the inputs or options changed since the interrupted run; "
                          "started from the beginning"]
    kept, kstate, notes = [], None, []
    for sp in plan.shards:
        rec = state["shards"].get(sp.filename)
        if rec is None:
            break
        f = out.tmp / sp.filename
        try:
            ok = (verified(f, rec) and len(rec["state"]["same_as_prev"]) == len(plan.sources)
                  and all(isinstance(n, str) for n in rec["state"]["copied"]))
        except (TypeError, KeyError):
            ok = False
        if not ok:
            notes.append(f"--resume: {sp.filename} of the interrupted run failed verification; writing it again")
            break
        kept.append(sp.filename)
        kstate = rec["state"]
    out.clear(keep=tuple(kept) + (PROGRESS,))
    return kept, kstate, notes


# -- the stream schedule ---------------------------------------------------------------------
STATE = "stream-state.safetensors"


def sources_fingerprint(sources: list[Source], options: Options) -> str:
    """sha256 of what fixes a stream run's output: each source pinned (repo, revision, commit, files
    with size and sha256) and the options (``resume`` and ``hash_inputs`` left out)."""
    from dataclasses import asdict

    opts = {k: v for k, v in asdict(options).items() if k not in ("resume", "hash_inputs")}
    srcs = [[s.repo_id, s.revision, s.commit, [list(f) for f in s.files]] for s in sources]
    blob = json.dumps({"schedule": "stream", "options": opts, "sources": srcs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_fingerprint(plan: Plan) -> str:
    """sha256 of the output layout: tensors (name, dtypes, shape, averaged, shard, offset), shards."""
    rows = [[t.name, t.dtype, t.out_dtype, list(t.shape), t.averaged, t.shard, t.out_offset]
            + ([list(t.in_dtypes)] if t.in_dtypes else []) for t in plan.tensors]
    blob = json.dumps({"tensors": rows, "shards": [s.filename for s in plan.shards],
                       "weights": list(plan.weights)}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def stream_resume_point(out: OutputDir, fp: str) -> tuple[int, dict | None, list[str]]:
    """(revisions already folded, their record, notes). Anything unusable is cleared: start at 0."""
    state = out.read_progress()
    rec = (state or {}).get("stream")
    f = out.tmp / STATE
    why = None
    if state is None or rec is None:
        why = f"no saved stream state in {out.partial}"
    elif state.get("fingerprint") != fp:
        why = "the sources or options changed since the interrupted run"
    else:
        if not (isinstance(rec.get("folded"), int) and rec["folded"] >= 1 and verified(f, rec)):
            why = f"{STATE} of the interrupted run failed verification"
    if why is not None:
        out.clear()
        return 0, None, [f"--resume: {why}; started from the beginning"]
    return rec["folded"], rec, [f"--resume: {rec['folded']} revisions already folded by the interrupted run"]


def save_stream_state(out: OutputDir, fp: str, plan: Plan, folded: int, acc: dict, raw0: dict, same: dict, bad: dict,
         hashes: dict, downloaded: dict) -> None:
    """Write the state after ``folded`` revisions (file first, then ``progress.json`` naming it);
    ``downloaded``: commit -> the file names this run fetched (``--no-keep`` deletes them, even
    after a crash came before it could: the resumed run does)."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for ti, r in raw0.items():
        tensors[f"raw0.{ti}"] = r.cpu().contiguous()
        if ti in acc:
            tensors[f"acc.{ti}"] = acc[ti].cpu().contiguous()
            tensors[f"same.{ti}"] = torch.tensor(same[ti], dtype=torch.uint8)
    write_atomic(out.tmp / STATE, lambda p: save_file(tensors, str(p)))
    f = out.tmp / STATE
    out.write_progress({"fingerprint": fp, "shards": {}, "stream": {  # no shard is finished yet
        "folded": folded, "plan": plan_fingerprint(plan), "checksum": file_checksum(f), "bytes": f.stat().st_size,
        "bad": {str(ti): {str(k): i for k, i in b.items()} for ti, b in bad.items()}, "hashes": hashes,
        "downloaded": downloaded}})


def load_stream_state(out: OutputDir, rec: dict, plan: Plan, device) -> tuple[dict, dict, dict, dict, dict] | None:
    """(acc, raw0, same, bad, hashes) saved by :func:`save`, on ``device``; None if they don't fit
    ``plan`` (the output layout of this run differs from the interrupted one's)."""
    from safetensors.torch import load_file

    if rec.get("plan") != plan_fingerprint(plan):
        return None
    saved = load_file(str(Path(out.tmp) / STATE))
    acc, raw0, same = {}, {}, {}
    for ti, t in enumerate(plan.tensors):
        r = saved.get(f"raw0.{ti}")
        if r is None or r.numel() != t.numel * t.itemsize:
            return None
        raw0[ti] = r.to(device)
        if t.averaged:
            if f"acc.{ti}" not in saved or saved[f"acc.{ti}"].numel() != t.numel:
                return None
            acc[ti] = saved[f"acc.{ti}"].to(device)
            same[ti] = [bool(x) for x in saved[f"same.{ti}"].tolist()]
    bad = {int(ti): {int(k): i for k, i in b.items()} for ti, b in rec.get("bad", {}).items()}
    for ti in acc:
        bad.setdefault(ti, {})
    return acc, raw0, same, bad, dict(rec.get("hashes", {}))
