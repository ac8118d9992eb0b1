"""Never delete, follow or publish over what merger does not own (issue 12, part 2).

Real CLI (``CliRunner`` on ``merger.cli.app``), real trajectories. Each test checks that the
inputs and every foreign file or folder are byte-identical afterwards and that no partial or old
folder is left behind.
"""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from merger.cli import app
from helpers.trajectory import Trajectory
from helpers.checks import leftovers, tree_digest

runner = CliRunner()


@pytest.fixture
def traj(tmp_path):
    return Trajectory(tmp_path)


def merge(traj: Trajectory, *args) -> object:
    return runner.invoke(app, ["average", str(traj.root), *map(str, args)])


def refused(r, *expected: str) -> str:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.stderr, r.output
    assert "Error: " in r.stderr and "\nhint: " in r.stderr, r.stderr
    for e in expected:
        assert e in r.stderr, f"{e!r} not in {r.stderr}"
    return r.stderr


@pytest.mark.parametrize("flags", [[], ["--force"], ["--resume"]], ids=["plain", "force", "resume"])
def test_partial_folder_that_is_a_symlink_is_never_followed(traj, flags):
    """The link ``.merged.merger-partial -> run/step1000`` (an input revision): refused; the link
    and its target stay exactly as they were."""
    victim = traj.root / "step1000"
    link = traj.out.parent / ".merged.merger-partial"
    link.symlink_to(victim)
    before = tree_digest(traj.inputs)
    r = merge(traj, "-o", traj.out, *flags)
    refused(r, f"{link} (merger's partial folder for this output) is a symbolic link", "remove the link")
    assert link.is_symlink() and os.readlink(link) == str(victim)
    assert tree_digest(traj.inputs) == before and not traj.out.exists()


@pytest.mark.parametrize("kind", ["file", "foreign-folder"])
def test_partial_folder_that_merger_did_not_make_is_refused(traj, kind):
    partial = traj.out.parent / ".merged.merger-partial"
    if kind == "file":
        partial.write_text("someone's notes")
        expected = "exists and is not a folder"
    else:
        partial.mkdir()
        (partial / "notes.txt").write_text("someone's notes")
        expected = "holds files merger didn't write (notes.txt)"
    foreign = tree_digest(traj.out.parent)
    before = tree_digest(traj.inputs)
    refused(merge(traj, "-o", traj.out), expected)
    assert tree_digest(traj.out.parent) == foreign and tree_digest(traj.inputs) == before
    assert not traj.out.exists()


def test_force_replaces_only_a_folder_merger_wrote(traj, tmp_path):
    # a folder of someone's files, and one with a merger.json merger didn't write
    mine = tmp_path / "outs" / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    fake = tmp_path / "outs" / "fake"
    fake.mkdir()
    (fake / "merger.json").write_text("not json")
    (fake / "data.bin").write_bytes(b"\0" * 10)
    foreign = tree_digest(tmp_path / "outs")
    for out in (mine, fake):
        refused(merge(traj, "-o", out, "--force"), f"output folder {out} exists and is not a merger output",
                "--force replaces only folders merger wrote")
        assert leftovers(out) == []
    assert tree_digest(tmp_path / "outs") == foreign
    # a merger output is replaced, with nothing left beside it
    assert merge(traj, "-o", traj.out).exit_code == 0
    r = merge(traj, "-o", traj.out, "--force", "--method", "ema", "--decay", "0.5")
    assert r.exit_code == 0, r.output
    assert json.loads((traj.out / "merger.json").read_text())["method"].startswith("ema")
    assert leftovers(traj.out) == []


def test_output_dot_with_force_is_refused(traj, tmp_path, monkeypatch):
    """``-o . --force`` in a folder of someone's files (that holds no input): nothing is removed."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "photos").mkdir()
    (home / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    (home / ".bashrc").write_text("alias ll='ls -l'")
    before = tree_digest(home)
    monkeypatch.chdir(home)
    refused(merge(traj, "-o", ".", "--force"), f"output folder {home} exists and is not a merger output")
    assert tree_digest(home) == before and sorted(p.name for p in home.iterdir()) == [".bashrc", "photos"]
    assert leftovers(home) == []


def test_output_through_symlinks_leaves_nothing_behind(traj, tmp_path):
    """``-o latest --force`` where ``latest -> outs/merged`` (a merger output), and ``-o`` through a
    linked parent folder: the real folder is replaced, the link kept, no ``.merger-old-*`` left."""
    assert merge(traj, "-o", traj.out).exit_code == 0
    latest = tmp_path / "latest"
    latest.symlink_to(traj.out)
    r = merge(traj, "-o", latest, "--force", "--method", "linear")
    assert r.exit_code == 0, r.output
    assert latest.is_symlink() and os.readlink(latest) == str(traj.out)
    assert json.loads((traj.out / "merger.json").read_text())["method"].startswith("linear")
    assert leftovers(latest) == [] and leftovers(traj.out) == []
    linked_parent = tmp_path / "outs-link"
    linked_parent.symlink_to(traj.out.parent)
    r = merge(traj, "-o", linked_parent / "merged", "--force", "--method", "uniform")
    assert r.exit_code == 0, r.output
    assert json.loads((traj.out / "merger.json").read_text())["method"].startswith("uniform")
    assert leftovers(traj.out) == [] and leftovers(latest) == []
    # a dangling link is refused, and left alone
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere" / "x")
    refused(merge(traj, "-o", dangling), "is a symbolic link to a missing path")
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("name", ["step999", "checkpoint-5000", "4000"])
def test_output_named_like_a_revision_inside_the_run_is_refused(traj, name):
    """``-o run/step999`` would be averaged in by the next merge of ``run``: refused."""
    out = traj.root / name
    before = tree_digest(traj.inputs)
    refused(merge(traj, "-o", out), f"output folder {out} would sit among the revisions of {traj.root}",
            "not a step")
    assert not out.exists() and leftovers(out) == [] and tree_digest(traj.inputs) == before
    # elsewhere, or with a name that is not a step, it is fine
    r = merge(traj, "-o", traj.root / "merged-lawa")
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["average", str(traj.root), "--dry-run", "--json"])
    assert [i["name"] for i in json.loads(r.stdout)["inputs"]] == ["step1000", "step2000", "step3000"]


def test_inputs_inside_the_output_are_refused(traj, tmp_path):
    """Explicit revision folders and an output that contains them (with --force): refused."""
    a, b = traj.root / "step1000", traj.root / "step2000"
    before = tree_digest(traj.inputs)
    r = runner.invoke(app, ["average", str(a), str(b), "-o", str(tmp_path), "--force"])
    refused(r, f"output folder {tmp_path} overlaps the input")
    assert tree_digest(traj.inputs) == before
