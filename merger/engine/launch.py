"""Which launch a rank belongs to, checked before it joins the store (engine/ranks.py, "One launch,
one merge"): rank 0 publishes a launch record, every other rank compares it with its own identity,
then each claims its rank number."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from typing import Mapping

from merger.errors import RankError

POLL = 0.05  # how often a wait looks at the store


def launch_identity(env: Mapping[str, str] | None = None, argv: list[str] | None = None) -> str:
    """What every rank of one launch shares and another launch doesn't: a hash of the command line,
    the working folder and the launcher's job ids (torchrun's run id, Slurm's job and step)."""
    env = os.environ if env is None else env
    ids = {k: env.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "WORLD_SIZE",
                                       "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT")}
    blob = json.dumps({"argv": list(sys.argv[1:] if argv is None else argv), "cwd": os.getcwd(), **ids},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def join(store, w, limit: float) -> None:
    """``w`` (a ``ranks.World``) joins ``store``: check the launch record (rank 0 publishes it) and
    claim this rank, before anything else is written into the store: a process of another launch is
    refused here and leaves no trace."""
    me = launch_identity()
    where = f"the coordinator at {w.addr}:{w.port}"
    other = RankError(f"rank {w.rank}: {where} belongs to another launch (another command line or job "
                      "uses the same MASTER_ADDR/MASTER_PORT); this rank did not join it", rank=w.rank,
                      hint="give each launch its own MASTER_PORT (torchrun --standalone picks a free one)")
    if w.rank == 0:
        mine = json.dumps({"id": me, "nonce": secrets.token_hex(8), "host": socket.gethostname(),
                           "pid": os.getpid()})
        stands = store.compare_set("launch", "", mine)
        if json.loads(stands)["id"] != me:
            raise other
    else:
        end = time.monotonic() + limit
        while not store.check(["launch"]):
            if time.monotonic() > end:
                raise RankError(f"rank {w.rank} waited {limit:.0f} s for rank 0 to publish the launch at "
                                f"{where}; it never did", rank=w.rank,
                                hint="check that rank 0 was launched, with the same MASTER_ADDR/MASTER_PORT")
            time.sleep(POLL)
        if json.loads(store.get("launch"))["id"] != me:
            raise other
    token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    got = store.compare_set(f"claim/{w.rank}", "", token)
    if (got.decode() if isinstance(got, bytes) else got) != token:
        raise RankError(f"rank {w.rank} of this launch is already taken at {where} (by {got!r}); "
                        "this process did not join", rank=w.rank,
                        hint="each rank must be launched once: check RANK/SLURM_PROCID of every process")
