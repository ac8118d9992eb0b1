"""Checks the tests share: what a refused run must leave (nothing), digests of input trees,
partial folders, and a Ctrl-C at a chosen point of a merge."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (and the set of paths itself)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Partial/old folders merger may have left beside ``out``."""
    parent = out.parent
    return sorted(p.name for p in parent.iterdir() if ".merger-" in p.name) if parent.is_dir() else []


def check_refused(code: int, stderr: str, output: str, expected, *, out: Path, inputs: Path, before) -> str:
    assert code == 1, output
    assert "Error: " in stderr, stderr
    err = stderr[stderr.index("Error: "):]  # errors found while merging follow the plan's table
    assert "\nhint: " in err, f"no hint in: {err}"
    assert "Traceback" not in output, output
    for e in expected:
        assert e in err, f"{e!r} not in: {err}"
    assert not out.exists(), f"{out} was created"
    assert leftovers(out) == [], f"leftovers beside {out}: {leftovers(out)}"
    assert tree_digest(inputs) == before, "an input file changed"
    return err


def partial_of(out: Path) -> Path:
    """The partial folder a merge into ``out`` writes."""
    return out.parent / f".{out.name}.merger-partial"


class Interrupt:
    """A progress callback that raises KeyboardInterrupt (Ctrl-C) once ``after`` blocks were folded."""

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, nbytes: int) -> None:
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt


def wait_for_marker(p, marker: Path, timeout: float) -> None:
    """Wait (bounded polling) until process ``p`` drops ``marker`` at its kill point, then remove it;
    fail the test if ``p`` ends first or never gets there."""
    import time

    import pytest

    deadline = time.monotonic() + timeout
    while not marker.exists():
        if p.poll() is not None:
            pytest.fail(f"the run ended (exit {p.returncode}) before it could be killed: {p.stderr.read().decode()}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail("the run never reached the kill point")
        time.sleep(0.01)
    marker.unlink()
