"""A tiny three-revision run and its output path, with the whole refusal contract in one call
(:meth:`Trajectory.refused`), for the CLI's bad-input tests."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from helpers.checks import check_refused, tree_digest
from helpers.runs import make_run
from merger.cli import app
from merger.testing import synth

runner = CliRunner()
CFG = synth.SHAPES["tiny"].config()


class Trajectory:
    """A tiny three-revision run in ``tmp/run`` and the output ``tmp/outs/merged``."""

    def __init__(self, tmp: Path, **kw):
        self.root, self.sds = make_run(tmp / "run", **kw)
        self.out = tmp / "outs" / "merged"
        self.out.parent.mkdir()
        self.inputs = tmp / "run"

    def save(self, step: int, sd: dict, **kw) -> None:
        synth.save_checkpoint(self.root / f"step{step}", sd, config=CFG, **kw)

    def refused(self, args: list[str], *expected: str, out: Path | None = None) -> str:
        """Run ``merger average ROOT ARGS -o OUT`` and check the whole contract; returns stderr."""
        out = out or self.out
        before = tree_digest(self.inputs)
        r = runner.invoke(app, ["average", str(self.root), *args, "-o", str(out)])
        return check_refused(r.exit_code, r.stderr, r.output, expected, out=out, inputs=self.inputs, before=before)
