"""Blocks (the *blocks* schedule): tensors grouped, in the latest input's file order, into blocks
whose working set (every input's bytes of the block, double-buffered, plus the output bytes,
double-buffered) fits the budget. A tensor larger than a block is cut into element ranges at
multiples of ``SIZES.chunk`` elements, so ranges never depend on the budget's rounding.
"""

from __future__ import annotations

from merger.plan.plan import Slice, TensorPlan, slice_cost
from merger.units import SIZES



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
        chunk = SIZES.chunk
        per = max(chunk, (max_block * t.numel // cost) // chunk * chunk)  # cost: of the whole tensor
        for start in range(0, t.numel, per):
            blocks.append((Slice(ti, start, min(t.numel, start + per)),))
    if cur:
        blocks.append(tuple(cur))
    return blocks




def block_budget(tensors: list[TensorPlan], n_inputs: int, max_memory: int, *, cuda: bool) -> int:
    """Bytes of working set per block: several blocks even when everything fits, so that reading,
    folding and writing overlap; on CPU at most 512 MB: first touches of bigger fresh buffers cost
    more in page faults than they save (bench/README.md, "Measurements behind the code"). Never
    below one chunk (``SIZES.chunk``) of the widest tensor."""
    total = sum(slice_cost(t, n_inputs, t.numel) for t in tensors)
    biggest_unit = max((slice_cost(t, n_inputs, min(t.numel, SIZES.chunk)) for t in tensors), default=0)
    cap = SIZES.max_block_cuda if cuda else SIZES.max_block_cpu
    return max(min(max_memory, max(SIZES.min_block, total // 8), cap), biggest_unit)
