"""What ``merger average --eval`` needs, checked before anything is merged.

The merged folder gets its config and tokenizer from the latest revision (copied byte for byte),
so an evaluation that would fail for want of them after a long merge is refused up front, as is a
missing lm-eval install and an ``--output-dir`` that is a file.
"""

from __future__ import annotations

from pathlib import Path

from merger.errors import EvalError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def check_output_dir(output_dir: str | Path | None, *, option: str = "--output-dir") -> None:
    """``output_dir`` (to be created) must be a folder or not exist, its parents folders.

    Raises:
        EvalError: it, or a parent, is a file.
    """
    if output_dir is None:
        return
    p = Path(output_dir).expanduser()
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            what = f"{option} {p}" if q == p else f"{option} {p}: its parent {q}"
            raise EvalError(f"{what} is a file, not a folder", hint=f"give {option} a folder (it is created if needed)")
        if q.exists():
            return


def check_eval_ready(sources, copy_files: tuple[str, ...] | None, *, plan=None, tokenizer: str | None = None) -> None:
    """The merged model will be loadable by the evaluation: the latest source provides a
    ``config.json`` and tokenizer files (or ``tokenizer`` is given), and lm-eval imports. A nanoGPT
    ``.pt`` run is evaluated as GPT-2 (its ``ckpt.pt``, or the ``--to hf`` folder): it needs
    ``tokenizer`` and nanoGPT's GPT-2.

    Args:
        sources: the merge's sources, oldest first.
        copy_files: the side files the merge copies (``Plan.copy_files``); None when the plan isn't
            known yet (Hub revisions not downloaded): then the file list the Hub gave is used.
        plan: the merge's plan, when known (its output format and tensors).
        tokenizer: ``--tokenizer``, for models that carry none.

    Raises:
        EvalError: naming the revision and what it lacks.
    """
    latest = sources[-1]
    where = f"{latest.name} ({latest.path or latest.repo_id})"
    fmt = plan.output_format if plan is not None else "hf"
    if fmt in ("nanogpt", "gpt2"):  # a .pt run: config.json from model_args, the tokenizer given
        if tokenizer is None:
            raise EvalError(f"--eval: {where} is a training checkpoint: it carries no tokenizer",
                            hint="pass --tokenizer NAME_OR_PATH, the tokenizer the run was trained with "
                                 "(e.g. --tokenizer gpt2 for nanoGPT's GPT-2 BPE)")
        from merger.errors import OutputError
        from merger.eval.view import not_gpt2
        from merger.output import gpt2

        try:
            gpt2.check(plan)
        except OutputError as e:
            raise not_gpt2(e, "--eval evaluates .pt runs", "merge without --eval") from None
    elif fmt not in ("hf", "safetensors"):
        raise EvalError(f"--eval: a {fmt} output is not a model lm-eval loads",
                        hint="merge with --to safetensors (with the model's config.json), or without --eval")
    else:
        if copy_files is None:
            if not latest.files:  # nothing known before the download: the evaluation checks it
                return
            copy_files = tuple(Path(f).name for f, _, _ in latest.files)
        if "config.json" not in copy_files:
            raise EvalError(f"--eval: the merged model would have no config.json: {where} has none",
                            hint="add the model's config.json to that revision, or run without --eval")
        if tokenizer is None and not any(f in copy_files for f in TOKENIZER_FILES):
            raise EvalError(f"--eval: the merged model would have no tokenizer: {where} holds none of "
                            f"{', '.join(TOKENIZER_FILES)}",
                            hint="pass --tokenizer NAME_OR_PATH, copy the tokenizer files of the model into "
                                 "the latest revision, or merge without --eval")
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise EvalError("--eval: lm-eval-harness is not installed", hint="pip install 'merger[eval]', or run "
                                                                         "without --eval")
