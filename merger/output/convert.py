"""Output formats: the engine writes safetensors shards (+ index) into the partial folder; an output
format other than those rewrites them there, before the folder is published.

``OUTPUTS`` maps ``--to`` names to the module that converts (``None``: the engine's safetensors
shards are the output). A converter module has ``write(tmp: Path, plan: Plan) -> list[str]``: read
the shards in ``tmp`` (``formats.read_checkpoint(tmp)`` gives their extents), write its own files
into ``tmp`` one tensor at a time (memory bounded), remove the shards and the index, and return
the names of the files it wrote. By default a merge is written in its input's format
(``Format.OUTPUT``), so training can restart from it.

**Add an output format**: a module ``output/<name>.py`` with ``write``, its name here, and tests
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


def convert(tmp: Path, plan) -> list[str]:
    """Rewrite the engine's shards in ``tmp`` into ``plan.output_format`` (``plan``: a
    :class:`merger.plan.Plan`; not imported here, the plan imports this module); the files it wrote."""
    module = OUTPUTS[plan.output_format]
    if module is None:
        return []
    return importlib.import_module(module).write(tmp, plan)
