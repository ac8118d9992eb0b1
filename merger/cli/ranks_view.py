"""``merger average --dry-run`` under torchrun/srun: rank 0 prints the plan and the partition
(which rank folds which output shards, and the input bytes each reads); the other ranks print
nothing."""

from __future__ import annotations

from merger.cli import ui
from merger.engine.ranks import World
from merger.units import format_size


def print_partition(prep, world: World, *, json_out: bool) -> None:
    """Print ``prep``'s plan and its partition over ``world`` (from rank 0 only)."""
    if world.rank != 0:
        return
    parts = None
    if prep.plan is not None:
        from merger.engine.ranked import describe_partition

        parts = describe_partition(prep.plan, world.size, per_node=world.local_size)
    if json_out:
        ui.print_json(dict(prep.to_dict(), world_size=world.size, partition=parts))
        return
    ui.out.print(ui.plan_view(prep))
    if parts is None:
        ui.out.print(f"partition over {world.size} ranks: after the Hub revisions are downloaded")
        return
    ui.out.print(f"[bold]partition[/] over {world.size} ranks (output shards, balanced by input bytes to read):")
    for p in parts:
        shards = ", ".join(p["shards"]) if p["shards"] else "-"
        ui.out.print(f"  rank {p['rank']}: {len(p['shards'])} shard(s), reads {format_size(p['read_bytes'])}: {shards}",
                     highlight=False)
