"""Resuming an interrupted run: which finished shards of its partial folder can be kept.

Resuming: blocks come in output order, so shards are finished one after another. The writer
closes each shard as soon as its last byte is written and records it, with its CRC-32, in the
partial folder's ``progress.json`` together with the plan's :func:`fingerprint` (the plan, and
each input file's size and mtime). A run killed half-way (SIGKILL, SIGTERM, power loss; Ctrl-C
too, once a shard is finished) leaves that folder behind. The next run for the same output with
``Options(resume=True)`` checks the fingerprint, verifies the finished shards' CRC-32 and skips
the blocks that only write into them; any other run removes the folder and starts clean.
"""

from __future__ import annotations

import hashlib
import json
import os

from merger.output.folder import PROGRESS, OutputDir
from merger.output.shards import file_checksum
from merger.plan import Plan


def fingerprint(plan: Plan) -> str:
    """sha256 of what fixes the output bytes: the plan, and each input file's path, size and mtime.

    Options that don't change the output (``resume``, ``hash_inputs``) are left out.
    """
    d = plan.to_dict()
    d["options"] = {k: v for k, v in d["options"].items() if k not in ("resume", "hash_inputs")}
    files = []
    for path in sorted({p for t in plan.tensors for p in t.files}):
        st = os.stat(path)
        files.append([path, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"plan": d, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def resume_point(out: OutputDir, plan: Plan, fp: str) -> tuple[list[str], dict | None, list[str]]:
    """The leading shards an interrupted run finished that verify (CRC-32, size), the kernel state
    recorded with the last of them, and notes on what was found. Everything else in the partial
    folder is removed."""
    state = out.read_progress()
    if state is None:
        leftovers = any(out.tmp.iterdir())
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
            ok = (f.is_file() and f.stat().st_size == rec["bytes"] and file_checksum(f) == rec["checksum"]
                  and len(rec["state"]["same_as_prev"]) == len(plan.sources)
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
