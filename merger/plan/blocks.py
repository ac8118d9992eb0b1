"""Blocks (the *blocks* schedule): tensors grouped, in the latest input's file order, into blocks
whose working set (every input's bytes of the block, double-buffered, plus the output bytes,
double-buffered) fits the budget. A tensor larger than a block is cut into element ranges at
multiples of ``CHUNK`` elements, so ranges never depend on the budget's rounding.
"""

from __future__ import annotations

from merger.plan.options import CHUNK, MIN_BLOCK
from merger.plan.plan import Slice, TensorPlan, slice_cost

MAX_BLOCK_CPU = 512 << 20  # bytes of working set per block (see block_budget())
MAX_BLOCK_CUDA = 2 << 30


def make_blocks(tensors: list[TensorPlan], n_inputs: int, max_block: int) -> list[tuple[Slice, ...]]:
    """Group tensors, in order, into blocks of working set <= ``max_block`` bytes."""
    blocks: list[tuple[Slice, ...]] = []
    cur: list[Slice] = []
    used = 0
    for ti, t in enumerate(tensors):
        cost = slice_cost(t, n_inputs, t.numel)
        if used + cost <= max_block:
            cur.append(Slice(ti, 0, t.numel))
            used += cost
            continue
        if cur:
            blocks.append(tuple(cur))
            cur, used = [], 0
        if cost <= max_block:
            cur, used = [Slice(ti, 0, t.numel)], cost
            continue
        per = max(CHUNK, (max_block // slice_cost(t, n_inputs, 1)) // CHUNK * CHUNK)
        for start in range(0, t.numel, per):
            blocks.append((Slice(ti, start, min(t.numel, start + per)),))
    if cur:
        blocks.append(tuple(cur))
    return blocks




def block_budget(tensors: list[TensorPlan], n_inputs: int, max_memory: int, *, cuda: bool) -> int:
    """Bytes of working set per block: several blocks even when everything fits, so that reading,
    folding and writing overlap; on CPU at most 512 MB: first touches of bigger fresh buffers cost
    more in page faults than they save (bench/README.md, "Measurements behind the code"). Never
    below one ``CHUNK`` of the widest tensor."""
    total = sum(slice_cost(t, n_inputs, t.numel) for t in tensors)
    biggest_unit = max((slice_cost(t, n_inputs, min(t.numel, CHUNK)) for t in tensors), default=0)
    cap = MAX_BLOCK_CUDA if cuda else MAX_BLOCK_CPU
    return max(min(max_memory, max(MIN_BLOCK, total // 8), cap), biggest_unit)
