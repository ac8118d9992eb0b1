"""The fuzz tests' setup (conftest): fixed draws by default, fresh ones under MERGER_FUZZ=1.

The default run must be reproducible (CI): hypothesis derandomized with no example database, the
``rng`` fixture seeded from the test's name. Under fuzz: fresh seeds and more examples. Checked
here by running pytest on a small test file in a subprocess, both ways.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import fuzz

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
from hypothesis import given, settings, strategies as st
from helpers.fuzz import examples

DRAWN = []

@settings(max_examples=examples(5))
@given(st.integers())
def test_draws(x):
    DRAWN.append(x)

def test_zz_report(rng):
    print("HYPO", DRAWN, "RNG", [rng.randrange(1 << 30) for _ in range(3)])
'''


def test_default_profile_is_deterministic():
    if fuzz.FUZZ:
        pytest.skip("this run is a fuzz run")
    assert settings.get_current_profile_name() == "ci"
    assert settings.default.derandomize and settings.default.database is None and settings.default.deadline is None
    assert fuzz.examples(7) == 7


def _probe(tmp_path: Path, env: dict) -> str:
    (tmp_path / "test_probe.py").write_text(PROBE)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MERGER_FUZZ", "HYPOTHESIS_"))}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT), e.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "conftest",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],  # tests/conftest as a plugin
                       capture_output=True, text=True, env={**e, **env}, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return re.search(r"HYPO .*", r.stdout).group(0)


def _draws(line: str) -> tuple[list[int], list[int]]:
    hypo, rng = line.removeprefix("HYPO ").split(" RNG ")
    return ast.literal_eval(hypo), ast.literal_eval(rng)


@pytest.mark.slow
def test_draws_are_fixed_by_default_and_fresh_under_fuzz(tmp_path):
    a, b = _probe(tmp_path, {}), _probe(tmp_path, {})
    assert a == b  # the same draws, run after run
    assert len(_draws(a)[0]) <= 5
    fresh = _probe(tmp_path, {"MERGER_FUZZ": "1"})
    seeded = [_probe(tmp_path, {"MERGER_FUZZ": "1", "MERGER_FUZZ_SEED": "1234"}) for _ in range(2)]
    assert 5 < len(_draws(fresh)[0]) <= 50  # 10x the examples
    # fresh draws: unlike the default run's and the seeded run's (3 draws of 30 bits: no collision)
    assert _draws(fresh)[1] != _draws(a)[1] and _draws(fresh)[1] != _draws(seeded[0])[1]
    assert _draws(fresh)[0] != _draws(seeded[0])[0]
    assert seeded[0] == seeded[1]  # MERGER_FUZZ_SEED repeats the draws, hypothesis' and rng's
