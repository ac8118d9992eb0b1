"""merger: offline, post-hoc checkpoint averaging for LLM pre-training runs.

The library API mirrors the CLI::

    from merger import average, Options, Method
    plan, result = average(["runs/my-run"], revisions="step1000..step9000", every=1000,
                           options=Options(method=Method("ema", decay=0.9)), output="merged/ema")

``merger.average(...)`` resolves sources (``sources/``), builds a plan from file headers
(``formats/`` -> ``plan/``), executes it with a memory-bounded kernel (``engine/`` over ``fold/``)
and writes a Hugging Face model folder (``output/``); ``merger.eval`` measures it. The names below
are imported on first use, so ``import merger`` stays cheap.
"""

__version__ = "0.1.0"

from merger.errors import MergerError  # noqa: E402

_API = {"average": "merger.api", "prepare": "merger.api", "Prepared": "merger.api",
        "Options": "merger.plan", "Method": "merger.plan", "Plan": "merger.plan", "Result": "merger.engine.run"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'merger' has no attribute {name!r}")


__all__ = ["Method", "MergerError", "Options", "Plan", "Prepared", "Result", "__version__", "average", "prepare"]
