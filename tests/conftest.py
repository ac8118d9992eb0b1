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

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

from helpers.fuzz import FUZZ, FUZZ_FACTOR, FUZZ_SEED  # noqa: E402
from helpers.runs import make_run  # noqa: E402

# ---- fuzz tests: deterministic by default, fresh draws under `make fuzz` ---------------------------
# Every test that draws inputs (hypothesis, or the ``rng`` fixture) is marked ``fuzz``. By default
# ("ci" profile) they draw the same cases on every run: hypothesis derandomized (seeded from the
# test itself, no example database), ``rng`` seeded from the test's name. With MERGER_FUZZ=1 (or
# HYPOTHESIS_PROFILE=fuzz; `make fuzz`) they draw fresh cases, FUZZ_FACTOR times as many
# hypothesis examples; the session's seed (hypothesis' --hypothesis-seed and the rng fixture's) is
# printed in pytest's header and summary, and MERGER_FUZZ_SEED=N repeats the run's draws.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("fuzz", derandomize=False, database=None, print_blob=True, deadline=None,
                          max_examples=100 * FUZZ_FACTOR)
settings.load_profile("fuzz" if FUZZ else "ci")


@pytest.hookimpl(tryfirst=True)  # before hypothesis' plugin reads --hypothesis-seed
def pytest_configure(config):
    if FUZZ and config.getoption("hypothesis_seed", None) is None:
        config.option.hypothesis_seed = str(FUZZ_SEED)  # one seed for hypothesis and rng: one to repeat


def _fuzz_line() -> str:
    if FUZZ:
        return (f"merger fuzz: fresh draws, seed {FUZZ_SEED} (MERGER_FUZZ_SEED={FUZZ_SEED} repeats them), "
                f"{FUZZ_FACTOR}x the hypothesis examples")
    return "merger fuzz tests: fixed draws (hypothesis derandomized); MERGER_FUZZ=1 for fresh ones"


def pytest_report_header(config):
    return _fuzz_line()


def pytest_terminal_summary(terminalreporter):
    if FUZZ:  # also under -q, which hides the header
        terminalreporter.write_line(_fuzz_line())


@pytest.fixture
def rng(request) -> random.Random:
    """A ``random.Random`` for a test's random draws: seeded from the test's name by default (the
    same draws on every run), from the session's fresh seed under fuzz. The seed is printed (pytest
    shows it when the test fails)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ FUZZ_SEED
    print(f"rng seed {seed} (MERGER_FUZZ_SEED={FUZZ_SEED})")
    return random.Random(seed)


# One intra-op thread: predictable on a shared 2-core machine, where OpenMP workers spinning
# against other processes made the fp64 reference checks 2x slower (merger's own pipeline sets
# one thread too). Restored by nothing: the whole test process runs this way.
torch.set_num_threads(1)


@pytest.fixture
def tiny_run(tmp_path):
    return make_run(tmp_path / "run")
