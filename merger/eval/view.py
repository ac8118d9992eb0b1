"""What transformers is given when ``merger sweep`` scores a run: a folder with the config and
tokenizer, and how each in-memory state dict is turned into that model's.

- A Hugging Face revision with its tokenizer is scored as it is: its own folder, its own names.
- A nanoGPT / LAWA run (``ckpt_<step>.pt``) is scored as the ``GPT2LMHeadModel`` that
  ``merger average --to hf`` writes for it (``output/gpt2.py``: the same renames and transposes,
  done in memory), with a ``config.json`` made from the latest checkpoint's ``model_args``.
  Training checkpoints carry no tokenizer: ``--tokenizer`` names the one the run was trained with.
- ``--tokenizer`` on a Hugging Face run replaces its tokenizer (or supplies a missing one).

The folder is a temporary one, removed when the sweep ends.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from merger.errors import EvalError, OutputError
from merger.eval.remote_code import remote_code_error
from merger.eval.state import StateDict
from merger.formats import of
from merger.sources import Source

CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class ModelView:
    folder: Path  # config.json and tokenizer files, what HeldoutScorer and lm-eval load
    convert: Callable[[StateDict], StateDict]  # a checkpoint's state dict -> the model's
    native: bool  # the revisions' own folders load as they are (lm-eval may read the raw one there)


def not_gpt2(e: OutputError, who: str, hint: str) -> EvalError:
    """The error for a ``.pt`` that isn't nanoGPT's GPT-2 (``e``: ``output/gpt2``'s), said by
    ``who`` (``"merger sweep scores .pt runs"``)."""
    return EvalError(f"{who} as nanoGPT's GPT-2: {str(e).removeprefix('--to hf: ')}", hint=hint)


def _same(state: StateDict) -> StateDict:
    return state


@contextmanager
def model_view(latest: Source, names: list[str], tokenizer: str | None) -> Iterator[ModelView]:
    """The view for a run whose latest revision is ``latest`` (tensor ``names`` as stored).

    Raises:
        EvalError: a format transformers can't score here, a nanoGPT checkpoint that isn't GPT-2,
            a training checkpoint with no ``--tokenizer``, a tokenizer that doesn't load.
    """
    fmt = of(latest.path).NAME
    if fmt == "hf" and tokenizer is None:
        yield ModelView(Path(latest.path), _same, True)
        return
    with tempfile.TemporaryDirectory(prefix="merger-sweep-model-") as tmp:  # config and tokenizer: KBs
        folder = Path(tmp)
        if fmt == "torch_pt":
            from merger.output.gpt2 import hf_model

            try:
                config, convert = hf_model(latest.path, names)
            except OutputError as e:
                raise not_gpt2(e, "merger sweep scores .pt runs", "sweep a Hugging Face run, or convert each "
                               "checkpoint to one (merger average FILE -o DIR for each)") from None
            (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        elif fmt == "hf":
            convert = _same
            for f in CONFIG_FILES:
                if (Path(latest.path) / f).is_file():
                    shutil.copyfile(Path(latest.path) / f, folder / f)
        else:
            raise EvalError(f"{latest.path}: a {fmt} checkpoint; merger sweep scores Hugging Face folders and "
                            "nanoGPT .pt runs, which transformers can build a model for",
                            hint="convert the run's checkpoints with the framework's Hugging Face converter "
                                 "(merger average --to safetensors writes the tensors under their own names)")
        if tokenizer is None:
            raise EvalError(f"{latest.path} is a training checkpoint: it carries no tokenizer",
                            hint="pass --tokenizer NAME_OR_PATH, the tokenizer the run was trained with "
                                 "(e.g. --tokenizer gpt2 for nanoGPT's GPT-2 BPE)")
        _save_tokenizer(tokenizer, folder)
        yield ModelView(folder, convert, False)


def _save_tokenizer(name: str, folder: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        AutoTokenizer.from_pretrained(name, trust_remote_code=False).save_pretrained(folder)  # never its code
    except (OSError, ValueError, KeyError) as e:
        refused = remote_code_error(f"--tokenizer {name}", "its tokenizer", e)
        if refused is not None:
            raise refused from None
        raise EvalError(f"--tokenizer {name}: transformers can't load a tokenizer from it: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="a folder with tokenizer.json or tokenizer_config.json, or a Hub name in the "
                             "local cache (offline: HF_HUB_OFFLINE=1)") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def is_training_checkpoint(path: str | Path) -> bool:
    """A ``torch.save`` training checkpoint (a ``.pt`` file, or nanoGPT's ``out/`` with ``ckpt.pt``)."""
    from merger.formats import detect

    fmt = detect(path)
    return fmt is not None and fmt.NAME == "torch_pt"


def gpt2_folder(src: str | Path, dest: Path) -> Path:
    """Write into ``dest`` the transformers GPT-2 folder (``config.json``, ``model.safetensors``)
    that ``merger average --to hf`` writes for the nanoGPT checkpoint ``src``: what ``merger eval``
    loads a ``.pt`` as. Memory: the model once, as stored, and converted.

    Raises:
        EvalError: ``src`` is not a nanoGPT GPT-2 model.
    """
    from safetensors.torch import save_file

    from merger.eval.state import read_tensors
    from merger.formats import read_checkpoint
    from merger.output.gpt2 import hf_model

    layout = read_checkpoint(src)
    dtype = next((t.dtype for n, t in layout.items() if n.endswith("transformer.wte.weight")), "float32")
    try:
        config, convert = hf_model(str(src), list(layout), dtype=dtype)
    except OutputError as e:
        raise not_gpt2(e, "merger evaluates .pt checkpoints", "evaluate a Hugging Face folder (merger average "
                       "--to safetensors writes the tensors under their own names, for the framework's own "
                       "converter)") from None
    state = convert(read_tensors(layout)[0])
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return dest
