"""One *blocks* merge folded by several ranks (torchrun, srun): each folds a share of the output
shards into the same partial folder; rank 0 publishes. Coordination: ``ranks.py``.

1. Every rank builds the plan from the headers (a pure function of them) and they compare its
   fingerprint: a rank that sees other files stops them all.
2. Rank 0 creates and locks ``.NAME.merger-partial`` (``OutputDir``); its lock error, or any
   other, is every rank's error. The other ranks write into that folder without a lock of their
   own: rank 0's lock stands for the whole merge, and if rank 0 dies, everyone stops.
3. ``--resume``: rank 0 reads the records of finished shards (``progress.json`` and every
   ``progress.rank-R.json``: one file per rank, so that no two processes write one file), the
   ranks verify them (size, CRC-32; one share each), and the verified ones are kept; rank 0
   writes them into ``progress.json`` and removes everything else.
4. The shards still to write are assigned to ranks, balanced by the input bytes they read
   (:func:`partition`, the largest first onto the least loaded rank). Each rank runs the normal
   pipeline over its shards only: the plan's blocks keep only the slices of its shards, in the
   same order, so every slice is folded exactly as in a single process: same bytes.
5. After every rank has folded (a barrier that watches for dead ranks), rank 0 gathers each
   rank's bytes read, seconds and peak RSS (gloo), writes the index, ``merger.json`` (with
   ``world_size`` and ``ranks``) and the card, and publishes with the rename.

A world of one runs this too when ``--resume`` finds per-rank records (a multi-rank run resumed by
a single process), without torch.distributed.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from merger.engine.choose import choose
from merger.engine.parts import join_parts, split_single
from merger.engine.ranks import RANK_PROGRESS, Comm, RankError, World, connect
from merger.engine.resume import fingerprint, verified
from merger.engine.run import Result, io_error, peak_rss
from merger.errors import MergerError, OutputError, TensorError, UsageError
from merger.output.convert import convert
from merger.output.folder import PROGRESS, OutputDir, write_atomic
from merger.output.shards import write_index
from merger.plan import Options, Plan, build


def shard_costs(plan: Plan) -> list[int]:
    """Input bytes each output shard reads (every input's bytes of its tensors)."""
    n = len(plan.sources)
    return [sum(plan.tensors[i].read_nbytes(n) for i in sp.tensors) for sp in plan.shards]


def partition(plan: Plan, size: int, *, skip: set[str] | frozenset[str] = frozenset(),
              per_node: int = 1) -> list[list[int]]:
    """Shard indices per rank: the largest first onto the least loaded rank, shards named in
    ``skip`` (finished) left out. Deterministic. Ties go to the lowest local rank of the lowest
    node (ranks ``node * per_node + local``, as torchrun numbers them): with fewer shards than
    ranks, or equal shards, the nodes share the reads (and their network links) evenly."""
    cost = shard_costs(plan)
    parts: list[list[int]] = [[] for _ in range(size)]
    load = [0] * size
    per_node = per_node if per_node > 0 and size % per_node == 0 else 1
    for k in sorted((k for k, sp in enumerate(plan.shards) if sp.filename not in skip), key=lambda k: (-cost[k], k)):
        r = min(range(size), key=lambda r: (load[r], r % per_node, r // per_node))
        parts[r].append(k)
        load[r] += cost[k]
    return [sorted(p) for p in parts]


def describe_partition(plan: Plan, size: int, *, per_node: int = 1) -> list[dict]:
    """What ``--dry-run`` under torchrun shows: per rank, its shards (or parts of the single
    shard, ``parts.py``) and the bytes it reads."""
    plan = split_single(plan)
    cost = shard_costs(plan)
    return [{"rank": r, "shards": [plan.shards[k].filename for k in p], "read_bytes": sum(cost[k] for k in p)}
            for r, p in enumerate(partition(plan, size, per_node=per_node))]


def subplan(plan: Plan, owned: set[int]) -> Plan:
    """``plan`` with only the slices that write into the shards ``owned``, blocks in order."""
    blocks = (tuple(s for s in b if plan.tensors[s.tensor].shard in owned) for b in plan.blocks)
    return replace(plan, blocks=tuple(b for b in blocks if b))


def rank_free_fingerprint(plan: Plan) -> str:
    """:func:`fingerprint` with ``cuda:N`` read as ``cuda``: the same on every rank of a GPU merge."""
    def base(d: str) -> str:
        return "cuda" if d.startswith("cuda") else d
    return fingerprint(replace(plan, device=base(plan.device), options=replace(plan.options,
                                                                               device=base(plan.options.device))))


def _records(out: OutputDir, fp: str) -> tuple[dict, list[str]]:
    """The finished-shard records of an interrupted run (any world size) for this plan, and notes."""
    files = [out.partial / PROGRESS, *sorted(out.partial.glob(RANK_PROGRESS.format("*")))]
    records, stale = {}, False
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict) or not isinstance(d.get("shards"), dict):
            continue
        if d.get("fingerprint") != fp:
            stale = True
            continue
        records.update(d["shards"])
    if records:
        return records, []
    why = ("the inputs or options changed since the interrupted run" if stale else
           f"no record of finished shards in {out.partial}")
    return {}, [f"--resume: {why}; started from the beginning"]


def run_ranked(plan: Plan, output: str | Path, comm: Comm, *, force: bool = False,
               progress: Callable[[int], None] | None = None, threads: int | None = None,
               finalize: Callable[[Path, Result], None] | None = None) -> Result:
    """Fold this rank's share of ``plan`` into the shared partial folder; rank 0 publishes.

    Args: as :func:`merger.engine.run.run`, and ``comm``, the ranks (``ranks.Comm``).

    Returns:
        The merge's result on rank 0 (every rank's bytes, the slowest rank's seconds, the
        largest peak RSS); this rank's own numbers on the others.

    Raises:
        RankError: another rank failed (its message) or died; MergerError: this rank's own
            error, which every other rank then reports as a RankError. Nothing is published.
    """
    rank, size = comm.rank, comm.size
    whole, plan = plan, split_single(plan)  # a single-file output: parts, joined by rank 0 (parts.py)
    if plan.options.hash_inputs and size > 1:
        raise UsageError("--hash hashes whole input files, and each rank reads only its share",
                         hint="run without --hash under torchrun/srun (or hash in a single-process run)")
    t0 = time.perf_counter()
    pipe = None
    holder = OutputDir(output, inputs=[s.path for s in plan.sources], force=force) if rank == 0 else None
    partial = OutputDir(output, inputs=[s.path for s in plan.sources], force=force).partial
    try:
        fp = rank_free_fingerprint(plan)
        fps = comm.exchange("plan", fp)
        if len(set(fps)) > 1:
            bad = [r for r, f in enumerate(fps) if f != fps[0]]
            raise MergerError(f"ranks {bad} built another plan than rank 0 (different input files, sizes or "
                              "modification times)", hint="every rank must see the same inputs at the same paths "
                                                          "(a shared filesystem)")
        setup = None
        if rank == 0:
            try:
                holder.create(keep=plan.options.resume)
                records, notes = _records(holder, fp) if plan.options.resume else ({}, [])
                setup = {"records": records, "notes": holder.notes + notes}
            except MergerError as e:
                setup = {"error": e.message, "hint": e.hint}
        setup = comm.share("setup", setup)
        if "error" in setup:
            raise OutputError(setup["error"], hint=setup["hint"])
        records = setup["records"]
        names = sorted(records)
        ok = [n for i, n in enumerate(names) if i % size == rank and verified(partial / n, records[n])]
        kept = {n for part in comm.exchange("verify", ok) for n in part}
        notes = list(setup["notes"]) + [f"--resume: {n} of the interrupted run failed verification; writing it again"
                                        for n in names if n not in kept]
        if rank == 0:
            holder.clear(keep=tuple(kept) + (PROGRESS,))
            holder.write_progress({"fingerprint": fp, "shards": {n: records[n] for n in sorted(kept)}})
        comm.barrier("ready")

        owned = frozenset(partition(plan, size, skip=kept, per_node=comm.world.local_size)[rank])
        finished: dict[str, dict] = {}

        def on_shard(i: int, checksum: str, state: dict) -> None:
            sp = plan.shards[i]
            copied, same = dict(pipe.kernel.copied), list(pipe.kernel.same_as_prev)  # facts so far: all valid
            mine = {plan.tensors[j].name for j in sp.tensors}
            finished[sp.filename] = {"checksum": checksum, "bytes": (partial / sp.filename).stat().st_size,
                                     "state": {"copied": sorted(n for n in mine if copied.get(n)),
                                               "same_as_prev": same}}
            blob = json.dumps({"fingerprint": fp, "shards": finished}, indent=1)
            write_atomic(partial / RANK_PROGRESS.format(rank), lambda p: p.write_text(blob))

        if owned:
            pipe = choose(plan)(subplan(plan, set(owned)), partial, progress, threads, label=str(holder.final if
                                holder else partial), owned=owned, on_shard=on_shard)
            comm.on_abort(pipe._fail)
            comm.check()
            pipe.run()
        stats = {"rank": rank, "host": socket.gethostname(), "shards": [plan.shards[k].filename for k in sorted(owned)],
                 "read_bytes": pipe.read_bytes if pipe else 0, "seconds": round(time.perf_counter() - t0, 3),
                 "peak_rss": peak_rss(), "kernel": pipe.name if pipe else "",
                 "copied": [n for n, c in dict(pipe.kernel.copied).items() if c] if pipe else [],
                 "same_as_prev": list(pipe.kernel.same_as_prev) if pipe else None,
                 "busy": {k: round(v, 3) for k, v in pipe.busy.items()} if pipe else {}}
        if pipe is not None:
            pipe.close()
            pipe = None
        comm.barrier("folded")
        every = comm.gather(stats)
        result = None
        if rank == 0:
            result = _publish(whole, plan, holder, every, records, kept, notes, finalize, t0, size)
        comm.share("published", True)
        comm.barrier("published")
        if result is None:
            result = Result(output=str(Path(output).expanduser().absolute()), seconds=stats["seconds"],
                            read_bytes=stats["read_bytes"], written_bytes=0, peak_rss=stats["peak_rss"],
                            kernel=stats["kernel"])
        return result
    except BaseException as e:
        comm.fail(e)
        if pipe is not None:
            pipe.close()
        comm.stopped()
        if holder is not None and holder.tmp is not None:
            lost = isinstance(e, KeyboardInterrupt) or (isinstance(e, RankError) and e.dead)
            if lost and _any_finished(partial):
                holder.release()  # keep the finished shards for --resume
            else:
                comm.wait_stopped()  # nobody writes into the folder any more
                holder.discard()
        if isinstance(e, (MergerError, KeyboardInterrupt)):
            raise
        if isinstance(e, OSError):
            raise io_error(e, f" on rank {rank}") from e
        raise


def _any_finished(partial: Path) -> bool:
    for f in partial.glob("progress*.json"):
        try:
            if json.loads(f.read_text()).get("shards"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def _publish(plan: Plan, work: Plan, out: OutputDir, every: list[dict], records: dict, kept: set[str],
             notes: list[str], finalize: Callable[[Path, Result], None] | None, t0: float, size: int) -> Result:
    """Rank 0, once every rank has folded (``work``: the plan they folded, ``plan`` cut into parts
    for a single-file output): the single file joined, index, side files, manifest and card, then
    the rename."""
    tmp = out.tmp
    n = len(plan.sources)
    states = [s["same_as_prev"] for s in every if s["same_as_prev"] is not None]
    states += [records[k]["state"]["same_as_prev"] for k in kept]
    same = [i > 0 and all(s[i] for s in states) for i in range(n)] if states else [False] * n
    names = [s.name for s in plan.sources]
    dups = [(names[i - 1], names[i]) for i in range(1, n) if same[i]]
    if dups and plan.options.strict:
        raise TensorError("revisions with identical weights: " + ", ".join(f"{a} == {b}" for a, b in dups),
                          tensor="*", revisions=[b for _, b in dups],
                          hint="drop the duplicates from --revisions, or run without --strict")
    copied = {c for s in every for c in s["copied"]} | {c for k in kept for c in records[k]["state"]["copied"]}
    busy: dict[str, float] = {}
    for s in every:
        for k, v in s["busy"].items():
            busy[k] = round(busy.get(k, 0.0) + v, 3)
    try:
        if work is not plan:
            join_parts(plan, work, tmp)
        if len(plan.shards) > 1:
            write_index(plan, tmp)
        for f in plan.copy_files:
            shutil.copyfile(Path(plan.sources[-1].path) / f, tmp / f)
        for f in tmp.glob(RANK_PROGRESS.format("*")):
            f.unlink()
        result = Result(
            output=str(out.final), seconds=time.perf_counter() - t0, read_bytes=sum(s["read_bytes"] for s in every),
            written_bytes=sum((tmp / sp.filename).stat().st_size for sp in plan.shards),
            peak_rss=max(s["peak_rss"] for s in every),
            copied_tensors=[t.name for t in plan.tensors if t.name in copied], duplicates=dups, timings=busy,
            resumed_shards=sorted(kept), warnings=notes, kernel=next((s["kernel"] for s in every if s["kernel"]), ""))
        written = convert(tmp, plan)
        if written:
            result.written_bytes = sum((tmp / f).stat().st_size for f in written)
        result.peak_rss = max(result.peak_rss, peak_rss())  # rank 0's conversion too (run.peak_rss)
        if finalize is not None:
            finalize(tmp, result)
            m = tmp / "merger.json"
            if m.is_file():
                d = json.loads(m.read_text())
                d["world_size"] = size
                keys = ("rank", "host", "shards", "read_bytes", "seconds", "peak_rss", "kernel")
                d["ranks"] = [{k: s[k] for k in keys} for s in every]
                m.write_text(json.dumps(d, indent=2) + "\n")
    except OSError as e:
        where = Path(e.filename).name if getattr(e, "filename", None) else "the output folder"
        raise OutputError(f"writing {where} into {out.final} failed: {e.strerror or e}",
                          hint="free disk space and check that the output location is writable") from e
    out.publish()
    result.peak_rss = max(result.peak_rss, peak_rss())
    return result


def average_ranked(sources: list, options: Options, plan: Plan | None, output: Path, world: World, *,
                   force: bool = False, progress: Callable[[int], None] | None = None,
                   finalize: Callable[[Path, Plan, Result], None] | None = None) -> tuple[Plan, Result]:
    """The whole multi-rank merge: Hub revisions fetched once per node (local rank 0, the others
    wait at a barrier), the plan, :func:`run_ranked`, and with ``--no-keep`` the downloads deleted
    after the final barrier (by local rank 0)."""
    comm = connect(world) if world.size > 1 else Comm(world)
    try:
        downloaded: dict[int, list[str]] = {}
        if plan is None:
            from merger.sources.hflocal import present_files
            from merger.sources.hub import fetch

            if world.local_rank == 0:
                for i, s in enumerate(sources):
                    if s.path is None:
                        before = present_files(s.repo_id, s.commit, [f for f, _, _ in s.files])
                        downloaded[i] = [f for f, _, _ in s.files if f not in before]
                        try:
                            fetch(s)
                        except BaseException as e:
                            comm.fail(e)
                            raise
            comm.barrier("downloaded")
            fetched = [fetch(s) if s.path is None else s for s in sources]  # in the cache now
            plan = build(fetched, options)
        result = run_ranked(plan, output, comm, force=force, progress=progress,
                            finalize=None if finalize is None else (lambda tmp, res: finalize(tmp, plan, res)))
        if not options.keep and downloaded:
            from merger.sources.hub import delete_revision

            for i, names in downloaded.items():
                if names:
                    delete_revision(sources[i], names)
        return plan, result
    finally:
        comm.close()

