"""Evaluate models with lm-eval-harness and compare them: the library behind ``merger eval``.

One :class:`lm_eval.models.huggingface.HFLM` per model, on an explicit device, then
``lm_eval.simple_evaluate`` with ``log_samples=False`` and fixed seeds. The first model is the
baseline of the comparison (``merger average --eval`` puts the latest input revision first, as the
LAWA paper compares). lm-eval is imported lazily, inside :func:`evaluate`.

    from merger.eval.harness import evaluate
    report = evaluate(["EleutherAI/pythia-70m@step143000", "merged/"], limit=200, output_dir="ev")
    report.rows[1].score("merger_pydocs_ppl", "word_perplexity")

A model is a local Hugging Face model folder (a ``merger average`` output, any ``save_pretrained``
folder) or ``REPO_ID@REVISION`` on the Hub, resolved by ``huggingface_hub.snapshot_download`` (from
the local cache when ``HF_HUB_OFFLINE=1``) and pinned to its commit sha. The default tasks are
merger's offline pack (:mod:`merger.eval.tasks`); any lm-eval task name or YAML file also works.
This module never prints: lm-eval's own ``print`` calls are redirected to stderr.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from merger.errors import EvalError, UsageError
from merger.units import parse_limit
from merger.eval.precheck import check_output_dir
from merger.eval.remote_code import remote_code_error
from merger.eval.tasks import DEFAULT_TASKS, task_pack_dir
from merger.output.folder import write_atomic
from merger.sources.hflocal import is_offline, is_repo_id

WEIGHT_GLOBS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin",
                "pytorch_model-*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
HUB_IGNORE = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.gguf", "flax_model*", "tf_model*",
              "rust_model*"]  # other frameworks' weights: never needed by HFLM
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """A model as given (``spec``) and where its files are; Hub models are pinned to ``commit``."""

    spec: str
    path: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    loaded_as: str | None = None  # a nanoGPT .pt: the temporary GPT-2 folder it is evaluated as


@dataclass(frozen=True)
class Score:
    """One lm-eval number: ``results[task]["<metric>,<filter>"]`` and its ``_stderr`` twin."""

    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None

    @property
    def name(self) -> str:
        """The metric name, with the filter when it isn't lm-eval's ``none``."""
        return self.metric if self.filter == "none" else f"{self.metric},{self.filter}"


@dataclass
class EvalRow:
    """One evaluated model: its source, scores and the file with lm-eval's full results."""

    source: ModelSource
    scores: list[Score]
    results_file: str | None = None
    seconds: float = 0.0

    @property
    def model(self) -> str:
        return self.source.spec

    def score(self, task: str, metric: str) -> Score | None:
        """The score of ``metric`` (name as in :attr:`Score.name`) on ``task``, if measured."""
        return next((s for s in self.scores if s.task == task and s.name == metric), None)


@dataclass
class EvalReport:
    """Rows in the order the models were given; ``rows[0]`` is the baseline of every delta."""

    rows: list[EvalRow] = field(default_factory=list)
    columns: list[tuple[str, str]] = field(default_factory=list)  # (task, metric name), in order
    higher_is_better: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    n_samples: dict[str, int] = field(default_factory=dict)  # task -> documents (after --limit)
    config: dict[str, Any] = field(default_factory=dict)
    output_dir: str | None = None

    def add(self, row: EvalRow, results: dict[str, Any]) -> None:
        """Append ``row``; take columns, directions and sample counts from lm-eval's ``results``."""
        self.rows.append(row)
        self.columns += [k for k in dict.fromkeys((s.task, s.name) for s in row.scores)
                         if k not in self.columns]
        for task, hib in results.get("higher_is_better", {}).items():
            self.higher_is_better.setdefault(task, {}).update(hib)
        for task, n in results.get("n-samples", {}).items():
            self.n_samples[task] = n.get("effective", n.get("original"))

    def delta(self, row: EvalRow, task: str, metric: str) -> float | None:
        """``row``'s value minus the baseline's, or None where either is missing."""
        a, b = row.score(task, metric), self.rows[0].score(task, metric)
        return None if a is None or b is None else a.value - b.value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``merger eval --json`` prints and ``summary.json`` holds)."""
        models = []
        for row in self.rows:
            scores: dict[str, dict[str, dict[str, float | None]]] = {}
            for s in row.scores:
                scores.setdefault(s.task, {})[s.name] = {
                    "value": s.value, "stderr": s.stderr, "delta": self.delta(row, s.task, s.name)}
            models.append({**asdict(row.source), "model": row.model, "scores": scores,
                           "results_file": row.results_file, "seconds": round(row.seconds, 3)})
        tasks = {t: {"n_samples": self.n_samples.get(t),
                     "higher_is_better": self.higher_is_better.get(t, {})}
                 for t in dict.fromkeys(t for t, _ in self.columns)}
        return {"baseline": self.rows[0].model if self.rows else None, "config": self.config,
                "output_dir": self.output_dir, "tasks": tasks, "models": models}


def check_model_folder(path: Path, spec: str, *, tokenizer: str | None = None) -> None:
    """Raise :class:`EvalError` unless ``path`` holds a config, weights and a tokenizer (or one is given)."""
    if not path.is_dir():
        raise EvalError(f"{spec} is not a folder", hint="pass a model folder or REPO_ID@REVISION")
    if not (path / "config.json").is_file():
        raise EvalError(f"{spec} is not a model folder: it has no config.json",
                        hint="pass a folder written by `merger average` or `save_pretrained`, "
                             "or a Hub model as REPO_ID@REVISION")
    if not any(any(path.glob(g)) for g in WEIGHT_GLOBS):
        raise EvalError(f"{spec} has a config.json but no weights "
                        "(model.safetensors, pytorch_model.bin or their shards)",
                        hint="is the merge finished? merged folders are renamed into place last")
    if tokenizer is None and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise EvalError(f"{spec} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                        hint="pass --tokenizer NAME_OR_PATH (e.g. --tokenizer gpt2 for nanoGPT runs: training "
                             "checkpoints carry none), or copy the tokenizer files of the model it was trained "
                             "from into it")


def resolve_model(spec: str, *, tokenizer: str | None = None, scratch: Path | None = None) -> ModelSource:
    """Turn a local folder, a nanoGPT ``.pt`` checkpoint or ``REPO_ID[@REVISION]`` into a
    :class:`ModelSource`.

    Hub models are fetched with ``snapshot_download`` (only the cache is read when
    ``HF_HUB_OFFLINE=1``; ``HF_HUB_CACHE`` is read at call time) and pinned to the commit sha. A
    ``.pt`` (or nanoGPT's ``out/`` with ``ckpt.pt``, ``merger average``'s default output for such
    runs) is written into ``scratch`` as the GPT-2 folder ``--to hf`` would write
    (:func:`merger.eval.view.gpt2_folder`); it needs ``tokenizer``.

    Raises:
        EvalError: no such folder or cached Hub revision, the folder isn't a model, a ``.pt`` without
            a tokenizer or that isn't nanoGPT's GPT-2.
    """
    path = Path(spec).expanduser()
    if path.exists():
        from merger.eval.view import gpt2_folder, is_training_checkpoint

        if is_training_checkpoint(path):
            if tokenizer is None:
                raise EvalError(f"{spec} is a training checkpoint (torch.save): it carries no tokenizer",
                                hint="pass --tokenizer NAME_OR_PATH, the tokenizer the run was trained with "
                                     "(e.g. --tokenizer gpt2 for nanoGPT's GPT-2 BPE)")
            if scratch is None:
                raise EvalError(f"{spec}: a .pt checkpoint is evaluated through a temporary folder; call "
                                "merger.eval.harness.evaluate")
            folder = gpt2_folder(path, Path(tempfile.mkdtemp(prefix="gpt2-", dir=scratch)))
            return ModelSource(spec=spec, path=str(path.resolve()), loaded_as=str(folder))
        check_model_folder(path, spec, tokenizer=tokenizer)
        return ModelSource(spec=spec, path=str(path.resolve()))
    repo_id, _, revision = spec.partition("@")
    if not is_repo_id(repo_id):
        raise EvalError(f"{spec}: no such folder", hint="pass a model folder or REPO_ID@REVISION, "
                                                         "e.g. EleutherAI/pythia-70m@step143000")
    revision = revision or "main"
    from huggingface_hub import snapshot_download

    offline = is_offline()  # read at call time: huggingface_hub.constants froze it at import
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                   cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                   ignore_patterns=HUB_IGNORE)
    except (OSError, ValueError) as e:  # not found, not cached offline, invalid id, HTTP errors
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "online"
        raise EvalError(f"{spec}: no such folder, and revision {revision!r} of {repo_id!r} "
                        f"can't be found {where} ({type(e).__name__})",
                        hint="check the path, or the repo id and revision (a branch such as "
                             "step143000, a tag or a commit sha)") from e
    commit = Path(folder).name if _COMMIT.match(Path(folder).name) else None
    check_model_folder(Path(folder), spec, tokenizer=tokenizer)
    return ModelSource(spec=spec, path=str(folder), repo_id=repo_id, revision=revision,
                       commit=commit)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise EvalError(f"lm-eval-harness can't be imported: {e}",
                        hint='install it with: pip install "lm-eval[hf]"') from None
    return lm_eval, HFLM, TaskManager


def _task_manager(tasks: list[str], paths: list[str], TaskManager: Any) -> Any:
    """A TaskManager that knows every name in ``tasks``, with each task loaded once to check it.

    lm-eval's own index (~15k names, several seconds to build) is only built when a name isn't
    found in ``paths`` (the default pack and ``--include-path``).

    Raises:
        EvalError: a task name is unknown, or a task (or its dataset) can't be loaded.
    """
    names = [t for t in tasks if not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_path=paths)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        close = {m for n in unknown for m in difflib.get_close_matches(n, tm.all_tasks, n=3)}
        raise EvalError(f"unknown task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}"
                        + (f" (did you mean {', '.join(sorted(close))}?)" if close else ""),
                        hint=f"the offline default pack has {', '.join(DEFAULT_TASKS)}; other "
                             "lm-eval tasks need their dataset in the local cache; add your own "
                             "YAML with --include-path")
    for t in tasks:  # load each one now (datasets included): fail before any model is loaded
        try:
            tm.load([t])
        except Exception as e:  # lm-eval and datasets raise many types here; name the task
            raise EvalError(f"task {t!r} can't be loaded: {type(e).__name__}: {e}",
                            hint="offline, lm-eval tasks work only when their dataset is in the "
                                 f"local datasets cache; {', '.join(DEFAULT_TASKS)} need no "
                                 "network") from e
    return tm


def parse_scores(results: dict[str, Any]) -> list[Score]:
    """Scores from lm-eval's ``results`` (and ``groups``) sections; keys are ``"metric,filter"``."""
    out: list[Score] = []
    sections = {**results.get("results", {}), **results.get("groups", {})}
    for task, metrics in sections.items():
        for key, value in metrics.items():
            metric, sep, filt = key.partition(",")
            if not sep or metric.endswith("_stderr") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            err = metrics.get(f"{metric}_stderr,{filt}")
            ok = isinstance(err, (int, float)) and not isinstance(err, bool) and math.isfinite(err)
            out.append(Score(task, metric, filt, float(value), float(err) if ok else None))
    return out


def _file_name(source: ModelSource, taken: set[str]) -> str:
    base = f"{source.repo_id}@{source.revision}" if source.repo_id else Path(source.path).name
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "model"
    name, i = base, 2
    while name in taken or name == "summary":
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return f"{name}.json"


def evaluate(models: list[str], *, tasks: list[str] | None = None, limit: int | float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, device: str = "auto",
             dtype: str | None = None, output_dir: str | Path | None = None,
             include_path: list[Path] | None = None, seed: int = 1234, tokenizer: str | None = None,
             progress: Callable[[str], None] | None = None) -> EvalReport:
    """Evaluate each model on ``tasks`` with lm-eval-harness; the first model is the baseline.

    Args:
        models: local model folders, nanoGPT ``.pt`` checkpoints (with ``tokenizer``) or
            ``REPO_ID@REVISION``; at least one.
        tasks: lm-eval task names or YAML paths; default: merger's offline pack
            (``merger_pydocs_ppl``, ``merger_pydocs_mc``).
        limit: documents per task (an int), or a fraction of them (a float below 1).
        num_fewshot: few-shot examples; None keeps each task's default (0 for the pack).
        batch_size: lm-eval batch size.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: weights dtype for evaluation; None means the checkpoint's own dtype on GPU and
            float32 on CPU (fp16 matmuls on CPU are slow and inexact).
        output_dir: where to write ``<model>.json`` (lm-eval's full results) per model and
            ``summary.json``; None writes nothing.
        include_path: extra folders or files of lm-eval task YAML.
        seed: python, numpy, torch and few-shot seeds.
        tokenizer: a tokenizer folder or Hub name for models that carry none (``.pt`` training
            checkpoints, or their ``merger average --to hf`` folders); None: each model's own.
        progress: called with a short status line before each step.

    Returns:
        An :class:`EvalReport`.

    Raises:
        UsageError: bad option values.
        EvalError: a model or task can't be found or loaded, or lm-eval isn't installed.
    """
    with tempfile.TemporaryDirectory(prefix="merger-eval-") as scratch:  # .pt models as GPT-2 folders
        return _evaluate(models, tasks=tasks, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                         device=device, dtype=dtype, output_dir=output_dir, include_path=include_path, seed=seed,
                         tokenizer=tokenizer, progress=progress, scratch=Path(scratch))


def _evaluate(models, *, tasks, limit, num_fewshot, batch_size, device, dtype, output_dir, include_path, seed,
              tokenizer, progress, scratch: Path) -> EvalReport:
    if not models:
        raise UsageError("no model to evaluate",
                         hint="pass one or more model folders or REPO_ID@REVISION")
    limit = parse_limit(limit)
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size} must be at least 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot {num_fewshot} must be zero or more")
    tasks = list(tasks) if tasks else list(DEFAULT_TASKS)
    note = progress or (lambda _msg: None)
    check_output_dir(output_dir)

    lm_eval, HFLM, TaskManager = _import_lm_eval()
    import torch

    from merger.device import resolve_device  # imports torch: not at `merger --help` time

    device = resolve_device(device, allow_mps=True)
    if dtype is not None:
        from merger.units import parse_dtype

        dtype = parse_dtype(dtype)
    load_dtype = dtype or ("float32" if device == "cpu" else "auto")
    sources = []
    for spec in models:  # resolve every model before the slow part
        note(f"resolving {spec}")
        sources.append(resolve_model(spec, tokenizer=tokenizer, scratch=scratch))
    for p in include_path or []:
        if not Path(p).exists():
            raise EvalError(f"--include-path {p}: no such file or folder")
    pack = task_pack_dir()
    note(f"loading tasks {', '.join(tasks)}")
    with contextlib.redirect_stdout(sys.stderr):
        tm = _task_manager(tasks, [str(pack), *map(str, include_path or [])], TaskManager)

    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    report = EvalReport(config={
        "tasks": tasks, "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "device": device, "dtype": load_dtype, "seed": seed, "tokenizer": tokenizer, "task_pack": str(pack),
        "lm_eval_version": getattr(lm_eval, "__version__", None)},
        output_dir=str(out) if out is not None else None)
    for i, src in enumerate(sources, 1):
        t0 = time.perf_counter()
        note(f"[{i}/{len(sources)}] loading {src.spec} on {device} ({load_dtype})")
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints; stdout is for results
            lm = _load(HFLM, src, device=device, dtype=load_dtype, batch_size=batch_size, tokenizer=tokenizer)
            note(f"[{i}/{len(sources)}] evaluating {src.spec}")
            try:
                results = lm_eval.simple_evaluate(
                    model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                    batch_size=batch_size, device=device, log_samples=False, random_seed=seed,
                    numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
            except torch.cuda.OutOfMemoryError as e:
                raise EvalError(f"{src.spec}: out of GPU memory during evaluation",
                                hint="use a smaller --batch-size or --dtype bfloat16") from e
            except AssertionError as e:
                if not _context_too_short(e):
                    raise
                raise EvalError(f"{src.spec}: a request of {', '.join(tasks)} is longer than the model's "
                                f"context of {getattr(lm, 'max_length', '?')} tokens (lm-eval scores an answer "
                                "only whole, inside one context window)",
                                hint="evaluate it on tasks with shorter answers (--tasks), or a model with a "
                                     "longer context (max_position_embeddings / n_positions)") from None
            finally:
                del lm
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if not results:
            raise EvalError(f"{src.spec}: lm-eval returned no results")
        row = EvalRow(source=src, scores=parse_scores(results), seconds=time.perf_counter() - t0)
        report.add(row, results)
        if out is not None:
            from lm_eval.utils import handle_non_serializable

            path = out / _file_name(src, taken)
            results["merger"] = {"source": asdict(src)}
            text = json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
            write_atomic(path, lambda p, t=text: p.write_text(t))
            row.results_file = str(path)
    if out is not None:
        summary = json.dumps(report.to_dict(), indent=2) + "\n"
        write_atomic(out / "summary.json", lambda p: p.write_text(summary))
    return report


def _context_too_short(e: AssertionError) -> bool:
    """Whether lm-eval's HFLM stopped on an answer (continuation) longer than the model's context:
    its ``assert len(continuation_enc) <= self.max_length`` in ``_loglikelihood_tokens``."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "_loglikelihood_tokens" \
        and "lm_eval" in tb.tb_frame.f_code.co_filename


def _load(HFLM: Any, src: ModelSource, *, device: str, dtype: str, batch_size: int,
          tokenizer: str | None = None) -> Any:
    """One ``HFLM`` with an explicit device (never HFLM's default ``cuda``)."""
    try:
        return HFLM(pretrained=src.loaded_as or src.path, device=device, dtype=dtype, batch_size=batch_size,
                    trust_remote_code=False, **({"tokenizer": tokenizer} if tokenizer else {}))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        refused = remote_code_error(src.spec, "the model or its tokenizer", e)
        if refused is not None:
            raise refused from None
        raise EvalError(f"{src.spec}: transformers can't load it: {type(e).__name__}: {e}",
                        hint="check that config.json and the weights belong together") from e

