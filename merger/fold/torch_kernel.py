"""The averaging kernel: out = sum_i w_i x_i for one slice of one tensor, every input in memory.

Per element the arithmetic is one fixed sequence of operations in the accumulation dtype
(float32 for 16-bit tensors, float64 for 32-bit ones; ``--accumulate`` forces one):
``acc = x_1 * w_1``, then ``acc = acc + w_i * x_i`` for i = 2..n (torch's ``add_(x, alpha=w)``),
then one cast to the output dtype. Equal weights (``uniform``, LAWA) fold the plain sum and scale
once at the end, ``acc / n``: a sum of n 16-bit values is exact in float32 (unless their magnitudes
span more than 2^13) and the division is correctly rounded, so a uniform average matches the
float64 reference to the last bit but for rare double-rounding ties (measured on 9 Pythia-70m
shaped revisions: 0 of 70M elements differ in float16, 201 in bfloat16). The CPU loop works on
cache-sized chunks at fixed offsets (multiples of ``SIZES.chunk`` from the tensor's start), so any
``--max-memory`` gives the same bits.

Rules (docs/design.md, "Tensor rules"), applied per chunk (``SIZES.chunk``) of elements counted from
the tensor's start, so they never depend on how a tensor was cut into slices:
- a chunk bit-identical in every input is written unchanged (a tensor identical everywhere is
  then copied bit for bit: Pythia's ``inv_freq``, ``masked_bias`` = -inf), when the weights sum
  to 1; unnormalised weights (``--no-normalize``) scale every floating chunk;
- non-floating tensors must be identical in every input, else :class:`TensorError`;
- a NaN/Inf produced by averaging is a :class:`TensorError` naming the revision that carries it
  (unless ``allow_nonfinite``).

Inputs of different floating dtypes (``TensorPlan.in_dtypes``: a run that saved its last step in
bf16) are each viewed in their own dtype and converted exactly into the accumulator (which is at
least as wide as the widest input, under ``auto``), so the sum is that of the upcast values. Their
bytes can't be identical, so the copy rule goes by value: a chunk whose values, compared upcast,
are equal in every input (``masked_bias`` = -inf, a ``rotary_emb.inv_freq`` that bf16 holds
exactly) is written as those values cast to the output dtype, which is what their average is;
such a tensor is never reported as copied bit for bit (NaN equals nothing: a NaN chunk is
averaged, and refused). An input is a duplicate of the one before only where their dtypes
agree. The native kernel hands such tensors to this one (``native.py``).
"""

from __future__ import annotations

import torch

from merger.fold.rules import FoldRule, acc_dtype, differing_error, nonfinite_error, overflow_error
from merger.plan import TensorPlan
from merger.units import SIZES, dtype_from_name

BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def cast_overflows(out: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``out`` (``x`` cast to a narrower dtype) holds Inf/NaN where ``x`` is finite: the
    overflow rule for chunks copied from the first input (identical in every input)."""
    if out.dtype == x.dtype:
        return False
    return bool((~torch.isfinite(out) & torch.isfinite(x)).any())


def axpy(acc: torch.Tensor, tmp: torch.Tensor, x: torch.Tensor, w: float, *, first: bool) -> None:
    """``acc = x * w`` (first input) or ``acc += w * x``; ``tmp`` is scratch of acc's dtype.

    The one definition of the per-element arithmetic, shared by every schedule, so that they all
    produce the same bits. ``w == 1`` is a plain copy or sum (see :class:`merger.fold.rules.FoldRule`).
    """
    if first:
        if w == 1.0:
            acc.copy_(x)
        else:
            tmp.copy_(x)
            torch.mul(tmp, w, out=acc)
    else:
        tmp.copy_(x)
        if w == 1.0:
            acc.add_(tmp)
        else:
            acc.add_(tmp, alpha=w)


def _equal_values(vals: list[torch.Tensor], scratch: list[torch.Tensor]) -> bool:
    """Whether inputs of different dtypes hold the same values here (compared upcast in the scratch
    buffers of the accumulation dtype; NaN equals nothing): the identical rule by value, for
    tensors whose bytes can't agree (Pythia's ``masked_bias`` = -inf in fp32 and in bf16)."""
    a, b = scratch
    a.copy_(vals[0])
    for v in vals[1:]:
        b.copy_(v)
        if not torch.equal(a, b):
            return False
    return True


def _views(t: TensorPlan, xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each input's raw bytes as integers of its element size (for "identical" tests) and as its values."""
    if not t.in_dtypes:
        dt = dtype_from_name(t.dtype)
        return [x.view(BITS[t.itemsize]) for x in xs], [x.view(dt) for x in xs]
    return ([x.view(BITS[t.input_itemsize(i)]) for i, x in enumerate(xs)],
            [x.view(dtype_from_name(t.input_dtype(i))) for i, x in enumerate(xs)])


class Kernel:
    """Folds slices; keeps per-run state (scratch buffers, duplicate-revision tracking).

    Args:
        weights: one weight per input, oldest first.
        names: the inputs' revision names, for error messages.
        device: ``cpu`` or ``cuda[:i]``; slices given to :meth:`fold` live there.
        accumulate: ``float32``, ``float64``, or ``auto``: float32 for 16-bit tensors, float64
            where the input or output is 32-bit or wider (float32 sums of float32 values can't be
            within an ulp of a float32 result).
        allow_nonfinite: keep NaN/Inf instead of raising.
    """

    def __init__(self, weights: list[float], names: list[str], *, device: str = "cpu",
                 accumulate: str = "float32", allow_nonfinite: bool = False):
        self.weights = [float(w) for w in weights]
        # "identical in every input -> copied unchanged" holds only for an average (weights summing
        # to 1); equal weights fold the plain sum and scale once in finish()
        self.rule = FoldRule.of(self.weights)
        self.names = list(names)
        self.device = torch.device(device)
        self.accumulate = accumulate
        self.allow_nonfinite = allow_nonfinite
        self.same_as_prev = [False] + [True] * (len(weights) - 1)  # input i equal to input i-1 so far
        self.copied: dict[str, bool] = {}  # tensor name -> every chunk identical in all inputs so far
        self._scratch: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def acc_dtype(self, t: TensorPlan) -> torch.dtype:
        """The accumulation dtype for tensor ``t``."""
        return dtype_from_name(acc_dtype(self.accumulate, t.itemsize, t.out_itemsize))

    def _buffers(self, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dt not in self._scratch or self._scratch[dt][0].numel() != SIZES.chunk:
            self._scratch[dt] = (torch.empty(SIZES.chunk, dtype=dt), torch.empty(SIZES.chunk, dtype=dt))
        return self._scratch[dt]

    # -- public ---------------------------------------------------------------------------------
    def fold(self, t: TensorPlan, xs: list[torch.Tensor], out: torch.Tensor) -> None:
        """Write the merged bytes of one slice of ``t`` into ``out``.

        Args:
            t: the tensor's plan entry.
            xs: each input's raw bytes of the slice (uint8), oldest first: the same length, but
                where the inputs' dtypes differ (``t.in_dtypes``), each in its own.
            out: raw output bytes of the slice (uint8), filled in place.

        Raises:
            TensorError: differing non-floating values, or NaN/Inf in an averaged chunk.
        """
        if not t.averaged:
            self._exact(t, xs, out)
        elif self.device.type == "cpu":
            self._fold_cpu(t, xs, out)
        else:
            self._fold_vectorized(t, xs, out)

    def add_input(self, acc: torch.Tensor, tmp: torch.Tensor, x: torch.Tensor, i: int) -> None:
        """Fold input ``i``'s values ``x`` into ``acc`` (``i == 0`` starts it): every schedule's step."""
        axpy(acc, tmp, x, self.rule.weights[i], first=i == 0)

    def finish(self, acc: torch.Tensor) -> None:
        """Apply the common scale of equal weights to a folded accumulator (in place)."""
        if self.rule.divide is not None:
            acc.div_(self.rule.divide)
        elif self.rule.scale is not None:
            acc.mul_(self.rule.scale)

    def duplicates(self) -> list[tuple[str, str]]:
        """Pairs (older, newer) of consecutive inputs whose tensors were bit-identical."""
        return [(self.names[i - 1], self.names[i]) for i, s in enumerate(self.same_as_prev) if s]

    # -- rules ----------------------------------------------------------------------------------
    def _exact(self, t: TensorPlan, xs: list[torch.Tensor], out: torch.Tensor) -> None:
        differ = [self.names[i] for i in range(1, len(xs)) if not torch.equal(xs[i], xs[0])]
        if differ:
            raise differing_error(t.name, t.dtype, self.names[0], differ)
        self.copied.setdefault(t.name, True)
        out.copy_(xs[0])

    def _track_duplicates(self, bits: list[torch.Tensor]) -> None:
        for i in range(1, len(bits)):  # bits of other widths (dtypes): never the same revision
            if self.same_as_prev[i] and (bits[i].dtype != bits[i - 1].dtype or not torch.equal(bits[i], bits[i - 1])):
                self.same_as_prev[i] = False

    def _nonfinite(self, t: TensorPlan, xs: list[torch.Tensor], out: torch.Tensor) -> None:
        """Raise for the first input that holds NaN/Inf here, or for an overflow of the output dtype."""
        for name, x in zip(self.names, xs):
            if not bool(torch.isfinite(x).all()):
                raise nonfinite_error(t.name, name)
        raise overflow_error(t.name, t.out_dtype)

    # -- CPU: cache-sized chunks --------------------------------------------------------------
    def _fold_cpu(self, t: TensorPlan, xs: list[torch.Tensor], out: torch.Tensor) -> None:
        odt = dtype_from_name(t.out_dtype)
        bits, vals = _views(t, xs)
        copy_identical = self.rule.copy_identical and not t.in_dtypes  # bytes AND dtypes must agree
        by_value = self.rule.copy_identical and bool(t.in_dtypes)
        o = out.view(odt)
        n_el = o.numel()
        omax = torch.finfo(odt).max
        all_copied = not t.in_dtypes  # converted, never copied bit for bit
        scratch = self._buffers(self.acc_dtype(t))
        chunk = SIZES.chunk
        for c in range(0, n_el, chunk):
            e = min(n_el, c + chunk)
            b = [x[c:e] for x in bits]
            if (copy_identical and all(torch.equal(b[i], b[0]) for i in range(1, len(b)))) or \
                    (by_value and _equal_values([v[c:e] for v in vals], [x[: e - c] for x in scratch])):
                o[c:e].copy_(vals[0][c:e])
                if not self.allow_nonfinite and cast_overflows(o[c:e], vals[0][c:e]):
                    raise overflow_error(t.name, t.out_dtype)
                continue
            all_copied = False
            self._track_duplicates(b)
            acc, tmp = (x[: e - c] for x in scratch)
            for i in range(len(vals)):
                self.add_input(acc, tmp, vals[i][c:e], i)
            self.finish(acc)
            o[c:e].copy_(acc)
            if not self.allow_nonfinite:
                lo, hi = torch.aminmax(acc)
                lo, hi = float(lo), float(hi)
                if not (-omax <= lo and hi <= omax) and not bool(torch.isfinite(o[c:e]).all()):
                    self._nonfinite(t, [v[c:e] for v in vals], o[c:e])
        self.copied[t.name] = self.copied.get(t.name, True) and all_copied

    # -- CUDA (or any non-CPU device): the whole slice at once -------------------------------
    def _fold_vectorized(self, t: TensorPlan, xs: list[torch.Tensor], out: torch.Tensor) -> None:
        odt = dtype_from_name(t.out_dtype)
        bits, vals = _views(t, xs)
        dt = vals[0].dtype
        n_el = vals[0].numel()
        same = torch.ones(n_el, dtype=torch.bool, device=xs[0].device)
        adt = self.acc_dtype(t)
        for i in range(1, len(bits)):  # dtypes that differ: equal values (upcast), as _equal_values
            same &= bits[i] == bits[0] if not t.in_dtypes else vals[i].to(adt) == vals[0].to(adt)
        chunk = SIZES.chunk
        n_chunks = -(-n_el // chunk)
        pad = n_chunks * chunk - n_el
        chunk_same = torch.nn.functional.pad(same, (0, pad), value=True).view(n_chunks, chunk).all(1)
        if not self.rule.copy_identical:
            chunk_same.zero_()
        if bool(chunk_same.all()):
            out.view(odt).copy_(vals[0])
            if not self.allow_nonfinite and cast_overflows(out.view(odt), vals[0]):
                raise overflow_error(t.name, t.out_dtype)
            if t.in_dtypes:
                self.copied[t.name] = False
            self.copied.setdefault(t.name, True)
            return
        self.copied[t.name] = False
        if any(self.same_as_prev[1:]):
            self._track_duplicates(bits)
        acc = torch.empty(n_el, dtype=adt, device=xs[0].device)
        tmp = torch.empty_like(acc)
        for i in range(len(vals)):
            self.add_input(acc, tmp, vals[i], i)
        self.finish(acc)
        keep = chunk_same.repeat_interleave(chunk)[:n_el]
        merged = torch.where(keep, vals[0].to(odt), acc.to(odt))
        if not self.allow_nonfinite and odt != dt and bool((~torch.isfinite(merged) & keep &
                                                            torch.isfinite(vals[0])).any()):
            raise overflow_error(t.name, t.out_dtype)  # a copied chunk the cast overflows
        if not self.allow_nonfinite and bool((~torch.isfinite(merged) & ~keep).any()):
            bad = int(torch.nonzero(~torch.isfinite(merged) & ~keep)[0, 0]) // chunk * chunk
            self._nonfinite(t, [v[bad: bad + chunk] for v in vals], merged[bad: bad + chunk])
        out.view(odt).copy_(merged)
