"""Sweep a trajectory: at every step, the raw checkpoint against the LAWA average ending there.

The figure the LAWA paper is built on: for each selected revision t (``--revisions A..B --every
N``, ordered by step), a held-out metric of the raw checkpoint at t, of the uniform average of the
K selected checkpoints ending at t (``--window K``), and optionally of a running EMA and of the
same window merged with ``decay`` weights (``--methods ...,decay --shape S``, sweep_decay.py).

    from merger.eval.sweep import SweepOptions, sweep
    result = sweep("EleutherAI/pythia-70m", revisions="step100000..step143000", every=5000,
                   options=SweepOptions(window=5, methods=("uniform", "ema"), decay=0.9),
                   output_dir="sweeps/pythia-70m")      # -> sweep.csv, sweep.json, sweep.png

Work is shared between windows: a float64 sum per tensor gets the newest checkpoint added and the
one leaving the window subtracted, so each checkpoint is read at most twice (entering, leaving),
whatever K. float16/bfloat16/float32 values summed in float64 are exact while their exponents
span less than 29 bits, so the sliding sum does not drift. The average at t is ``sum / K`` cast
to the stored dtype: what ``merger average`` writes for that window, to within one ulp. Tensors
bit-identical in every checkpoint so far (``inv_freq``, ``masked_bias`` = -inf, uint8 masks) are
kept as they are, as ``merger average`` keeps them.

Windows: the raw metric is measured at every selected step, the average only where K selected
checkpoints end at t: the first K-1 steps have no averaged point (``null`` in the JSON, empty in
the CSV, no marker on the plot). The EMA starts at the first selected checkpoint (e_1 = x_1,
e_i = b e_(i-1) + (1-b) x_i), i.e. ``merger average --method ema`` over the revisions up to t.

Metric: by default bits per byte (and byte/word perplexity) on the task pack's held-out
Python-docs passages, computed in-process as lm-eval's ``loglikelihood_rolling`` computes it
(same windows, prefix token, byte and word counts), so it matches ``merger eval --tasks
merger_pydocs_ppl``; with ``tasks``, any lm-eval task through :func:`merger.eval.harness.evaluate` on a
temporary model folder. Memory: a float64 sum and a float64 EMA of the model, one checkpoint as
stored, and the float32 model being evaluated.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from merger.errors import TensorError, UsageError
from merger.eval.precheck import check_output_dir
from merger.formats import TensorInfo, read_checkpoint
from merger.plan import FLOAT_DTYPES, check_layouts
from merger.fold.rules import differing_error, nonfinite_error
from merger.output.folder import write_atomic
from merger.sources import Source
from merger.eval.scoring import HELDOUT, HeldoutScorer, LmEvalScorer, StateDict
from merger.eval.state import read_tensors
from merger.eval.sweep_decay import decay_state
from merger.eval.view import ModelView, model_view

SERIES = ("raw", "uniform", "ema", "decay")  # uniform: the LAWA window average; decay: sweep_decay.py
LABELS = {"raw": "raw checkpoint", "uniform": "LAWA (uniform window)", "ema": "EMA",
          "decay": "decay merge (window)"}


@dataclass(frozen=True)
class SweepOptions:
    """How to sweep; CLI flags map 1:1.

    Args:
        window: K, the number of selected checkpoints in each average (LAWA's k).
        methods: ``uniform`` (LAWA), ``ema`` and/or ``decay`` (the window with decay weights).
        decay: the EMA decay b in (0, 1), with ``ema``.
        shape: the LR decay emulated by ``decay``: linear, cosine or 1-sqrt (None: linear).
        tasks: lm-eval tasks; None: the in-process held-out metric.
        metric: what to plot and tabulate (``bits_per_byte``, or ``task/metric`` with tasks);
            None: bits per byte where measured, else the first metric.
        limit: held-out passages (in-process) or documents per task (lm-eval): N, or a
            fraction below 1; None: all.
        device: where models are evaluated: ``auto``, ``cpu``, ``cuda[:i]``.
        batch_tokens: in-process tokens per forward pass; None: derived from the vocabulary.
    """

    window: int
    methods: tuple[str, ...] = ("uniform",)
    decay: float | None = None
    tasks: tuple[str, ...] | None = None
    metric: str | None = None
    limit: int | float | None = None
    device: str = "auto"
    batch_tokens: int | None = None
    shape: str | None = None
    tokenizer: str | None = None


@dataclass
class SweepPoint:
    """One selected step: each series' metrics (None where not measured) and the window."""

    step: int
    revision: str
    window: list[str] | None  # the revisions averaged into ``uniform``, oldest first
    scores: dict[str, dict[str, float] | None]  # series -> metric -> value


@dataclass
class SweepResult:
    model: str
    revisions: str | None
    every: int | None
    options: SweepOptions
    metric: str
    higher_is_better: bool | None
    evaluation: dict = field(default_factory=dict)  # what was measured: texts, tokens or tasks
    points: list[SweepPoint] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    read_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def series(self) -> list[str]:
        return ["raw", *[m for m in SERIES[1:] if m in self.options.methods]]

    def value(self, point: SweepPoint, series: str) -> float | None:
        s = point.scores.get(series)
        return None if s is None else s.get(self.metric)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(series=self.series, seconds=round(self.seconds, 3))
        return d


# -- reading and the sliding sum ----------------------------------------------------------------
@dataclass
class WindowState:
    """The state dicts at selected checkpoint ``index``; ``uniform`` is None for partial windows."""

    index: int
    source: Source
    raw: StateDict
    uniform: StateDict | None
    ema: StateDict | None
    window: list[Source] | None


def sliding_states(sources: list[Source], window: int | None, *, decay: float | None = None,
                   layouts: list[dict[str, TensorInfo]] | None = None,
                   counter: Callable[[int], None] | None = None) -> Iterator[WindowState]:
    """Yield raw, window-average and EMA state dicts at every source, oldest first.

    A float64 sum per tensor gets checkpoint i added and checkpoint i-K (read again) subtracted;
    the EMA is updated in float64 as e = b e + (1-b) x. Averages are cast to the stored dtype.

    Args:
        sources: checkpoints with a local ``path``, oldest first.
        window: K; None: no window average (raw and EMA only, each checkpoint read once).
        decay: the EMA decay b; None: no EMA.
        layouts: ``read_checkpoint`` of each source, if already read.
        counter: called with the bytes of every read.

    Raises:
        TensorError: a non-floating tensor differs between checkpoints, or NaN/Inf in a floating
            tensor that is being averaged.
    """
    layouts = layouts or [read_checkpoint(s.path) for s in sources]
    count = counter or (lambda n: None)
    const: StateDict = {}  # bit-identical in every checkpoint read so far
    moving: list[str] = []  # the other tensors, in the order they first changed
    sums: dict[str, torch.Tensor] = {}  # float64 sum over the window
    emas: dict[str, torch.Tensor] = {}
    for i, src in enumerate(sources):
        x, n = read_tensors(layouts[i])
        count(n)
        if window is not None and i >= window and moving:  # checkpoint i-K leaves the window
            old, n = read_tensors(layouts[i - window], moving)
            count(n)
            for name, v in old.items():
                sums[name].sub_(v.double())
        for name, v in x.items():
            if i == 0:
                const[name] = v
                continue
            c = const.get(name)
            if c is not None and torch.equal(_bits(c), _bits(v)):
                continue
            if c is not None:  # first change: the window so far held min(i, K) copies of c
                _check_averageable(name, c, v, sources[0].name, src.name)
                del const[name]
                moving.append(name)
                if window is not None:  # exact: c has <= 24 significant bits; c also left at i >= K
                    sums[name] = c.double() * (min(i, window) - (i >= window))
                if decay is not None:
                    emas[name] = c.double()
            if not bool(torch.isfinite(v).all()):
                raise nonfinite_error(name, src.name, hint="drop that revision from --revisions (diverged or corrupt?)")
            if window is not None:
                sums[name].add_(v.double())
            if decay is not None:
                emas[name].mul_(decay).add_(v.double(), alpha=1.0 - decay)
        full = window is not None and i + 1 >= window
        uniform = {k: const[k] if k in const else (sums[k] / window).to(v.dtype)
                   for k, v in x.items()} if full else None
        ema = {k: const[k] if k in const else emas[k].to(v.dtype)
               for k, v in x.items()} if decay is not None else None
        yield WindowState(i, src, x, uniform, ema, sources[i + 1 - window: i + 1] if full else None)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``: bit-identical, not ``==`` (-0.0 vs 0.0, -inf, NaN payloads)."""
    return t.reshape(-1).view(torch.uint8)


def _check_averageable(name: str, c: torch.Tensor, v: torch.Tensor, first: str, rev: str) -> None:
    if str(v.dtype).removeprefix("torch.") not in FLOAT_DTYPES:
        raise differing_error(name, str(v.dtype), first, [rev],
                              hint="sweep checkpoints of one run, or drop the revisions that differ")
    if not bool(torch.isfinite(c).all()):
        raise TensorError(f"tensor {name!r} holds NaN or Inf in {first} and changes in {rev}: it "
                          "can't be averaged", tensor=name, revisions=[first, rev],
                          hint="start --revisions after the checkpoints with NaN/Inf")


# -- metrics --------------------------------------------------------------------------------------
def _match(keys, metric: str) -> str | None:
    """``metric`` itself among ``keys``, else the first ``task/metric``."""
    return metric if metric in keys else next((k for k in keys if k.endswith("/" + metric)), None)


def _pick_metric(points: list[SweepPoint], wanted: str | None) -> str:
    keys = list(dict.fromkeys(k for p in points for s in p.scores.values() if s for k in s))
    if wanted:
        key = _match(keys, wanted)
        if key is None:
            raise UsageError(f"--metric {wanted}: not measured",
                             hint=f"measured: {', '.join(keys)}")
        return key
    return next((k for k in keys if k.split("/")[-1] == "bits_per_byte"), keys[0])


# -- the sweep ----------------------------------------------------------------------------------
def _check(options: SweepOptions, n: int, revisions: str | None, every: int | None) -> None:
    from merger.plan.methods import Method, weights_for

    if not options.methods or any(m not in SERIES[1:] for m in options.methods):
        raise UsageError(f"--methods {','.join(options.methods)}: use uniform, ema, decay or a list",
                         hint="e.g. --methods uniform,ema,decay")
    if "ema" in options.methods:
        weights_for(Method("ema", decay=options.decay), 2)  # decay given and in (0, 1)
    elif options.decay is not None:
        raise UsageError("--decay is the EMA decay: it needs ema in --methods",
                         hint="e.g. --methods uniform,ema --decay 0.9")
    if "decay" in options.methods:
        weights_for(Method("decay", shape=options.shape), options.window)  # shape known, K >= 2
    elif options.shape is not None:
        raise UsageError("--shape is the decay shape: it needs decay in --methods",
                         hint="e.g. --methods uniform,decay --shape cosine")
    if options.metric and not options.tasks and _match(HELDOUT, options.metric) is None:
        raise UsageError(f"--metric {options.metric}: the held-out metrics are "
                         + ", ".join(HELDOUT),
                         hint="other metrics come from lm-eval tasks: add --tasks")
    if options.window < 1:
        raise UsageError(f"--window {options.window}: must be at least 1", hint="e.g. --window 5")
    if options.window > n:
        sel = f"--revisions {revisions}" + (f" --every {every}" if every else "")
        raise UsageError(f"--window {options.window} is larger than the {n} revision"
                         f"{'s' * (n != 1)} selected by {sel if revisions else 'the model'}",
                         hint=f"use --window {n} or less, or select more revisions (a wider range, "
                              "a smaller --every)")


def sweep(model: str | None, *, revisions: str | None = None, every: int | None = None,
          options: SweepOptions, output_dir: str | Path,
          progress: Callable[[str], None] | None = None,
          sources: list[Source] | None = None) -> SweepResult:
    """Measure raw vs window-averaged (vs EMA) checkpoints at every selected step.

    Args:
        model: a Hub repo id or a folder of revision subfolders (see :func:`merger.api.resolve`).
        revisions, every: the revision spec; windows are the last K selected revisions.
        options: window, methods, metric, limit, device.
        output_dir: where ``sweep.csv``, ``sweep.json`` and ``sweep.png`` go (replaced).
        progress: called with a short status line per step.
        sources: already-resolved sources (oldest first), instead of resolving ``model``.

    Returns:
        A :class:`SweepResult`.

    Raises:
        UsageError: bad options, a window larger than the selection (before any work).
        MergerError: sources that can't be resolved, checkpoints that disagree, evaluation
            failures.
    """
    from merger.sources import DEFAULT_MODEL, resolve
    from merger.device import resolve_device

    t0 = time.perf_counter()
    note = progress or (lambda _m: None)
    check_output_dir(output_dir)  # before any download or scoring
    if sources is None:
        model = model or DEFAULT_MODEL
        sources = resolve([model], revisions, every)
    else:
        sources = list(sources)
        model = model or sources[-1].repo_id or str(Path(sources[-1].path).parent)
    _check(options, len(sources), revisions, every)
    device = resolve_device(options.device, allow_mps=True)
    if any(s.path is None for s in sources):
        from merger.sources.hub import fetch

        note(f"downloading {sum(s.path is None for s in sources)} revisions")
        sources = [s if s.path else fetch(s) for s in sources]
    layouts = [read_checkpoint(s.path) for s in sources]
    check_layouts(sources, layouts, mixed=False,  # the sweep's sums assume one dtype per tensor
                  hint="sweep revisions of one dtype; merger average averages floating tensors of different dtypes")
    out = Path(output_dir)
    with model_view(sources[-1], list(layouts[-1]), options.tokenizer) as view:  # refuses before any output
        out.mkdir(parents=True, exist_ok=True)
        scorer, points, metric, read, timings = _score_all(sources, layouts, options, device, view, out, note)
    hib = scorer.higher_is_better.get(metric)
    result = SweepResult(model=model, revisions=revisions, every=every, options=options,
                         metric=metric, higher_is_better=hib, evaluation=scorer.describe(),
                         points=points, read_bytes=read, timings=timings,
                         seconds=time.perf_counter() - t0)
    write_outputs(result, out)
    return result


def _score_all(sources, layouts, options: SweepOptions, device: str, view: ModelView, out: Path, note):
    """Every selected step's scores (the sweep's loop): the scorer, points, metric, bytes read, timings."""
    if options.tasks:
        scorer = LmEvalScorer(options.tasks, limit=options.limit, device=device, workdir=out)
    else:
        note(f"tokenizing the held-out passages with {sources[-1].name}'s tokenizer"
             if view.native else f"tokenizing the held-out passages with {options.tokenizer}")
        scorer = HeldoutScorer(view.folder, limit=options.limit, device=device,
                               batch_tokens=options.batch_tokens)
    read, timings, points = [0], {"average": 0.0, "eval": 0.0}, []  # seconds: read + fold; eval
    states = sliding_states(sources, options.window if "uniform" in options.methods else None,
                            decay=options.decay if "ema" in options.methods else None,
                            layouts=layouts, counter=lambda n: read.__setitem__(0, read[0] + n))
    while True:
        t1 = time.perf_counter()
        st = next(states, None)
        t2 = time.perf_counter()
        timings["average"] += t2 - t1
        if st is None:
            break
        lo = st.index + 1 - options.window  # the window: sources[lo: index + 1], if lo >= 0
        window = sources[lo: st.index + 1] if lo >= 0 and {"uniform", "decay"} & set(options.methods) else None
        dec = decay_state(window, layouts[lo: st.index + 1], options.shape,
                          counter=lambda n: read.__setitem__(0, read[0] + n)) \
            if window and "decay" in options.methods else None
        t1, t2 = t2, time.perf_counter()
        timings["average"] += t2 - t1
        todo = {k: view.convert(v) for k, v in (("raw", st.raw), ("uniform", st.uniform), ("ema", st.ema),
                                                ("decay", dec)) if v is not None}
        if isinstance(scorer, HeldoutScorer):
            scores = {k: scorer.score(v) for k, v in todo.items()}
        else:  # the raw checkpoint is evaluated from its own folder where it loads as it is
            models = [st.source.path if k == "raw" and view.native else v for k, v in todo.items()]
            scores = dict(zip(todo, scorer.score_many(models, like=Path(st.source.path) if view.native
                                                      else view.folder)))
        timings["eval"] += time.perf_counter() - t2
        points.append(SweepPoint(st.source.step if st.source.step is not None else st.index,
                                 st.source.name, [s.name for s in window] if window else None,
                                 {k: scores.get(k) for k in ("raw", *options.methods)}))
        metric = _pick_metric(points, options.metric)  # an unknown --metric fails at step one
        note(f"[{st.index + 1}/{len(sources)}] {st.source.name}: {metric} "
             + ", ".join(f"{k} {s[metric]:.4f}" for k, s in scores.items() if metric in s))
    return scorer, points, metric, read[0], timings


# -- outputs ------------------------------------------------------------------------------------
def write_outputs(result: SweepResult, out: Path) -> None:
    """``sweep.csv`` (a row per step; ``<series>_<metric>`` columns, the plotted metric first),
    ``sweep.png`` and ``sweep.json`` (``result.to_dict()``), each written atomically."""
    keys = list(dict.fromkeys(k for p in result.points for s in p.scores.values() if s for k in s))
    keys = [result.metric] + [k for k in keys if k != result.metric]

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "revision", "window_start", "window_end"]
                       + [f"{s}_{k}" for k in keys for s in result.series])
            for p in result.points:
                ends = (p.window[0], p.window[-1]) if p.window else ("", "")
                w.writerow([p.step, p.revision, *ends]
                           + [_cell((p.scores.get(s) or {}).get(k))
                              for k in keys for s in result.series])

    result.files = {x: str(out / f"sweep.{x}") for x in ("csv", "json", "png")}
    write_atomic(out / "sweep.csv", write_csv)
    write_atomic(out / "sweep.png", lambda p: plot(result, p))
    write_atomic(out / "sweep.json",
                  lambda p: p.write_text(json.dumps(result.to_dict(), indent=2) + "\n"))


def _cell(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def plot(result: SweepResult, path: Path) -> None:
    """Metric vs step, a line per series (an Agg canvas: no display, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    style = {"raw": ("tab:gray", "o", "-"), "uniform": ("tab:blue", "s", "-"),
             "ema": ("tab:orange", "^", "--"), "decay": ("tab:green", "D", "-.")}
    o = result.options
    for s in result.series:
        xy = [(p.step, result.value(p, s)) for p in result.points if result.value(p, s) is not None]
        if xy:
            color, marker, line = style[s]
            label = LABELS[s] + {"uniform": f" K={o.window}", "ema": f" b={o.decay}",
                                 "decay": f" K={o.window}, {o.shape or 'linear'}"}.get(s, "")
            ax.plot(*zip(*xy), marker=marker, linestyle=line, color=color, label=label,
                    markersize=4)
    better = {True: " (higher is better)", False: " (lower is better)"}
    ax.set_xlabel("training step")
    ax.set_ylabel(result.metric + better.get(result.higher_is_better, ""))
    every = f", every {result.every} steps" if result.every else ""
    ax.set_title(f"{result.model}: raw vs LAWA average of K={o.window} checkpoints{every}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
