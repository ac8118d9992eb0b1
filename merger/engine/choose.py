"""Which pipeline runs a plan: the native one where it applies, else the torch one.

**Add an executor**: subclass :class:`~merger.engine.pipeline.Pipeline` (say how a block is read
and folded, and how its output is written; give ``name``, ``working_set`` and ``default_threads``),
then pick it in :func:`_choice` for the plans it serves. It inherits resume, coordination and the
output writers; tests in ``tests/engine/`` compare its bytes with the other pipelines'.
"""

from __future__ import annotations

import os

from merger.engine.native_pipeline import NativePipeline
from merger.engine.pipeline import Pipeline
from merger.engine.torch_pipeline import TorchPipeline
from merger.errors import MergerError
from merger.fold.native import unavailable
from merger.plan import Plan


def _choice(plan: Plan) -> tuple[type[Pipeline], str | None]:
    """(pipeline class, why not the native one or None)."""
    why = unavailable()
    if plan.device != "cpu":
        why = why or f"--device {plan.device}"
    elif plan.options.hash_inputs:
        why = why or "--hash"
    if why is None:
        return NativePipeline, None
    return TorchPipeline, why


def choose(plan: Plan) -> type[Pipeline]:
    """The native pipeline where it applies (CPU, no input hashing, the library built and usable),
    else the torch one. ``MERGER_KERNEL=native`` makes a fallback an error (benchmarks, tests)."""
    cls, why = _choice(plan)
    if why is not None and os.environ.get("MERGER_KERNEL", "").lower() == "native":
        raise MergerError(f"MERGER_KERNEL=native, but the native kernel can't run: {why}",
                          hint="unset MERGER_KERNEL to use the torch kernel")
    return cls


def describe(plan: Plan) -> dict:
    """What ``--dry-run`` shows of the pipeline: the kernel, why not the native one, threads and
    the working set."""
    cls, why = _choice(plan)
    return {"kernel": cls.name, "kernel_note": why, "threads": cls.default_threads(plan),
            "estimated_memory": cls.working_set(plan)}
