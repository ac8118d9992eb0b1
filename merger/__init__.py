"""merger: offline, post-hoc checkpoint averaging for LLM pre-training runs.

The library API mirrors the CLI: ``merger.average(...)`` resolves sources, builds a plan from file
headers, executes it with a memory-bounded kernel and writes a Hugging Face model folder.
"""

__version__ = "0.1.0"

from merger.errors import MergerError  # noqa: E402

__all__ = ["MergerError", "__version__"]
