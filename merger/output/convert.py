"""Output formats. By default a merge is written in its input's format (``Format.OUTPUT``), so
training can restart from it; ``--to`` chooses another. ``OUTPUTS`` maps the names to a module
(``None``: the engine's safetensors shards + index are the output). Two kinds of module:

- **in place** (DCP): the engine writes the format's own files as it folds. The module defines
  ``span(dtype, shape, nbytes) -> (head, tail)``, the bytes it frames each tensor with (a DCP
  record's zip headers, before and after the tensor's bytes; the plan places every tensor past
  them), ``filename(i, k)`` for shard ``i`` of ``k``, ``frames(plan, k)`` (an
  ``output.shards.Frames``: those bytes, which the shard writer puts around the data), and
  ``write(tmp, plan) -> list[str]``, which adds the format's index (``.metadata``) after the last
  shard and returns the output's files. No second pass over the data.
- **converter** (nanoGPT ``ckpt.pt``, transformers GPT-2): ``write(tmp, plan) -> list[str]`` reads the
  engine's shards in ``tmp`` (``formats.read_checkpoint(tmp)`` gives their extents), writes its own
  files one tensor at a time (memory bounded), removes the shards and the index, and returns the
  names of the files it wrote. It may define ``check(plan)``, run at planning, before anything is
  read, to refuse a merge it couldn't write (e.g. ``--to hf`` of a model that isn't GPT-2).

**Add an output format**: a module ``output/<name>.py`` of either kind, its name here, and tests
that load the result with the format's real reader (``torch.load``, ``dcp.load``, transformers).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from merger.errors import UsageError

OUTPUTS: dict[str, str | None] = {
    "hf": None,  # a Hugging Face folder: safetensors shards + index, config and tokenizer copied
    "safetensors": None,  # the same files (for frameworks' own converters: keys as in the input)
    "nanogpt": "merger.output.nanogpt",  # OUT/ckpt.pt: a torch.save training checkpoint (model, no optimizer)
    "gpt2": "merger.output.gpt2",  # a transformers GPT2LMHeadModel folder from a nanoGPT model (--to hf)
    "dcp": "merger.output.dcp",  # a torch.distributed.checkpoint folder (.metadata + .distcp), for dcp.load
}


def check_output(name: str) -> str:
    """``name`` if it is a known output format.

    Raises:
        UsageError: an unknown ``--to``.
    """
    if name not in OUTPUTS:
        raise UsageError(f"--to {name}: unknown output format", hint=f"use one of {', '.join(OUTPUTS)}")
    return name


def in_place(name: str):
    """The module of output format ``name`` if the engine writes its files in place (it defines
    ``span``), else None."""
    module = OUTPUTS.get(name)
    if module is None:
        return None
    mod = importlib.import_module(module)
    return mod if hasattr(mod, "span") else None


def check_plan(plan) -> None:
    """Let the output format refuse a plan before anything is read (its ``check``, if any).

    Raises:
        OutputError: the output format can't hold this merge.
    """
    module = OUTPUTS.get(plan.output_format)
    if module is not None:
        check = getattr(importlib.import_module(module), "check", None)
        if check is not None:
            check(plan)


def convert(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` into ``plan.output_format`` (``plan``: a
    :class:`merger.plan.Plan`; not imported here, the plan imports this module); the files it wrote."""
    module = OUTPUTS[plan.output_format]
    if module is None:
        return []
    return importlib.import_module(module).write(tmp, plan)
