"""Every ``merger.x.y`` and file named in the repository's docstrings, comments and Markdown
resolves (tools/check_refs.py, also run by ``make lint``)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_refs", ROOT / "tools" / "check_refs.py")
check_refs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_refs)


def test_every_reference_in_the_repository_resolves():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "check_refs.py")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout
    assert "0 broken reference(s)" in r.stderr


def test_stale_references_are_caught(tmp_path):
    doc = tmp_path / "doc.py"
    doc.write_text('"""Goes through :class:`merger.io.OutputDir`; folds with ``kernel.py``; see DESIGN.md\n'
                   'and ``docs/nothing.md``; ``python -m merger.synth``; :meth:`merger.plan.Plan.nothing`."""\n')
    found = check_refs.problems(doc)
    assert len(found) == 6, found
    for ref in ("merger.io.OutputDir", "kernel.py", "DESIGN.md", "docs/nothing.md", "merger.synth",
                "merger.plan.Plan.nothing"):
        assert any(ref in line for line in found), (ref, found)


def test_live_references_pass(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("`merger.output.folder.OutputDir`, `merger.average` (lazy), `merger.plan.Plan.to_dict`,\n"
                   "`merger.fold._fold` (native), `torch_kernel.py`, `engine/ranks.py`, [design](docs/design.md)\n"
                   "`merger.json` is the manifest; [peer](https://github.com/JeanKaddour/LAWA)\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("x")
    assert check_refs.problems(doc) == []
