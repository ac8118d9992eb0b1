"""Fixtures and the session environment only (offline, one intra-op thread); the shared helpers
are the ``helpers`` package (tests/helpers/), imported as ``from helpers import make_run``.

Every test runs with no network: the Hub is reached only through a hand-built HF cache under a
temporary ``HF_HUB_CACHE`` (see ``test_hub.py``), set here before huggingface_hub is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# The session's HF cache holds ~1.6 GB of Pythia-shaped revisions (test_hub.py): removed when the
# test process exits, so repeated runs do not fill the disk.
_CACHE = tempfile.mkdtemp(prefix="merger-test-hfcache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.update({
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_CACHE": _CACHE, "HF_HOME": os.path.join(_CACHE, "home"), "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "MERGER_CACHE": os.path.join(_CACHE, "merger"),
})

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers.runs import make_run  # noqa: E402

# One intra-op thread: predictable on a shared 2-core machine, where OpenMP workers spinning
# against other processes made the fp64 reference checks 2x slower (merger's own pipeline sets
# one thread too). Restored by nothing: the whole test process runs this way.
torch.set_num_threads(1)


@pytest.fixture
def tiny_run(tmp_path):
    return make_run(tmp_path / "run")
