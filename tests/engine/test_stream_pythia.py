"""The README's headline command on a first download, at Pythia-70m's real shapes.

``merger average --revisions step100000..step143000 --every 5000`` with nothing in the HF cache takes
the *stream* schedule: ten revisions downloaded (the loopback fake Hub, real huggingface_hub) and
folded one after another. Each revision is a ``pytorch_model.bin`` in float16 with Pythia-70m's
tensors in the real file's key order (each layer's attention buffers before its
``query_key_value``, ``embed_out.weight``, 50304 x 512 = 25.7M elements, last), so ``embed_in`` and
``embed_out`` each span more than one stream piece (``SIZES.piece``, 16.8M elements) at the real
default sizes. A stream that folded the first revision ten times (the bug this guards against: a
loop variable over a tensor's pieces reused the resume point's name) gave ``step100000`` back with
exit 0; here the output is checked against the in-memory float64 average of the ten distinct
revisions: as typed, and with ``--no-keep`` killed (SIGKILL) in the middle of the stream, then
``--resume``d: the killed run and the resumed one both delete what they folded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import fakehub
from helpers import check_against_reference, reference
from helpers.checks import wait_for_marker
from merger.cli import app
from merger.testing import synth
from merger.testing.hubcache import repo_folder_name
from merger.units import SIZES

pytestmark = pytest.mark.slow
fake_hub = fakehub.fake_hub
runner = CliRunner()
REPO_ID = "EleutherAI/pythia-70m"
STEPS = list(range(100000, 143000, 5000)) + [143000]  # what --every 5000 selects: 10 revisions
CARD = ["average", "--revisions", "step100000..step143000", "--every", "5000"]
OUT = Path("merged") / "pythia-70m-uniform-step100000-step143000"
KILL_AT = 4  # revisions folded when the child is killed


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    """(folders, state dicts) of the ten selected revisions, plus two the selection skips."""
    src = tmp_path_factory.mktemp("pythia-bins")
    shape = synth.SHAPES["70m"]
    names = list(synth.pythia_names(shape))
    assert names.index("gpt_neox.layers.0.attention.bias") < names.index(
        "gpt_neox.layers.0.attention.query_key_value.weight") and names[-1] == "embed_out.weight"
    folders, sds = {}, {}
    for step in STEPS:
        sds[step] = synth.pythia_state_dict(shape, seed=11, step=step)
        folders[step] = synth.save_checkpoint(src / f"step{step}", sds[step], fmt="bin", config=shape.config())
    assert sds[STEPS[0]]["embed_out.weight"].numel() > SIZES.piece  # the loop over pieces runs more than once
    return folders, sds, reference([sds[s] for s in STEPS], [1 / 10] * 10)


def publish(hub, folders) -> dict[int, str]:
    """Every revision on the fake Hub (plus step99000 and step104000, which --every 5000 skips);
    returns the sha256 of each selected revision's weights, the name of its CDN URL."""
    for step in sorted([*folders, 99000, 104000]):
        hub.add_revision(REPO_ID, f"step{step}", folders[step if step in folders else STEPS[0]])
    return {s: hub.lookup(REPO_ID, f"step{s}")[1]["pytorch_model.bin"].sha256 for s in folders}


def check_output(out: Path, sds, ref, hub) -> None:
    m = json.loads((out / "merger.json").read_text())
    revs = [s["revision"] for s in m["sources"]]
    assert revs == [f"step{s}" for s in STEPS] and len(set(revs)) == 10 and m["schedule"] == "stream"
    branches = {b: c for b, c in hub.branches[REPO_ID].items()}
    assert [s["commit"] for s in m["sources"]] == [branches[r] for r in revs]
    check_against_reference(out, [sds[s] for s in STEPS], [1 / 10] * 10, ref=ref)


def weight_blobs(hub) -> list[Path]:
    blobs = hub.cache_dir / repo_folder_name(REPO_ID) / "blobs"
    return [p for p in blobs.iterdir() if p.stat().st_size > 10_000_000] if blobs.exists() else []


def test_card_command_on_a_first_download(fake_hub, revisions, tmp_path, monkeypatch):
    """As typed. (With --no-keep: the next test, whose killed and resumed runs both delete.)"""
    folders, sds, ref = revisions
    publish(fake_hub, folders)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, [*CARD, "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["plan"]["schedule"] == "stream"
    check_output(tmp_path / OUT, sds, ref, fake_hub)
    assert len(weight_blobs(fake_hub)) == 10


# `python -m merger`, plus: once KILL_AT revisions are folded and the stream's state is saved,
# announce it (a marker file) and park, so the test's SIGKILL lands in the middle of the stream.
CHILD = """
import os, sys, time
from merger.engine import stream
orig = stream.save_stream_state
def save(out, fp, plan, folded, *args, **kwargs):
    orig(out, fp, plan, folded, *args, **kwargs)
    if folded == int(os.environ["MERGER_TEST_KILL_AT"]):
        open(os.environ["MERGER_TEST_MARKER"], "w").close()
        while True:
            time.sleep(1)
stream.save_stream_state = save
sys.argv = ["merger", *sys.argv[1:]]
from merger.cli import main
main()
"""


def test_card_command_resumes_after_a_kill_mid_stream(fake_hub, revisions, tmp_path, monkeypatch):
    folders, sds, ref = revisions
    sha = publish(fake_hub, folders)
    marker = tmp_path / "kill-point"
    env = dict(os.environ, HF_ENDPOINT=fake_hub.url, HF_HUB_CACHE=str(fake_hub.cache_dir), HF_HUB_OFFLINE="0",
               TRANSFORMERS_OFFLINE="0", HF_DATASETS_OFFLINE="0", MERGER_TEST_KILL_AT=str(KILL_AT),
               MERGER_TEST_MARKER=str(marker))
    p = subprocess.Popen([sys.executable, "-c", CHILD, *CARD, "--no-keep"], cwd=tmp_path, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_marker(p, marker, 300)
    os.kill(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL
    p.stderr.close()
    assert not (tmp_path / OUT).exists(), "a killed run published its output"

    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, [*CARD, "--no-keep", "--resume", "--json"])
    assert r.exit_code == 0, r.output
    check_output(tmp_path / OUT, sds, ref, fake_hub)
    gets = [fake_hub.count("GET", f"/cdn-lfs/{REPO_ID}/{sha[s]}/") for s in STEPS]
    # the folded revisions are not downloaded again; the one downloaded ahead at the kill may have been cut
    assert gets[:KILL_AT] == [1] * KILL_AT and gets[KILL_AT] in (1, 2) and gets[KILL_AT + 1:] == [1] * (9 - KILL_AT)
    # --no-keep: what the killed run folded is deleted too. The revision it was downloading ahead is
    # not in its saved state (it was killed before folding it), so the resumed run found it cached
    left = {p.name for p in weight_blobs(fake_hub)}
    assert left <= {sha[STEPS[KILL_AT]]}, left
