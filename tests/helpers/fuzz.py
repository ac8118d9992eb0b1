"""The fuzz settings every test that draws inputs shares (conftest.py registers the hypothesis
profiles from them): ``FUZZ`` (``MERGER_FUZZ=1`` or ``HYPOTHESIS_PROFILE=fuzz``, ``make fuzz``),
``FUZZ_FACTOR``, the session's ``FUZZ_SEED`` and :func:`examples`."""

from __future__ import annotations

import os
import secrets

FUZZ = os.environ.get("MERGER_FUZZ", "") not in ("", "0") or os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
FUZZ_FACTOR = int(os.environ.get("MERGER_FUZZ_FACTOR", "10"))
FUZZ_SEED = int(os.environ.get("MERGER_FUZZ_SEED") or secrets.randbits(32)) if FUZZ else 0


def examples(n: int) -> int:
    """A hypothesis test's ``max_examples``: ``n`` by default, FUZZ_FACTOR times more under fuzz."""
    return n * FUZZ_FACTOR if FUZZ else n
