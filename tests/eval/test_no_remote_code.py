"""No code from a model or tokenizer folder is ever run (issue 24 §6).

A folder's ``config.json`` / ``tokenizer_config.json`` may name Python classes in the folder
(``auto_map``); transformers runs that file only with ``trust_remote_code=True``, and when the
argument is left out it *asks on stdin*. Every load in merger passes ``trust_remote_code=False``.

Each command that loads a tokenizer or a config (``sweep``, ``sweep --tokenizer``, ``eval``,
``average --eval``, ``grow``) runs in a subprocess with stdin answering ``y`` to any prompt, on
folders whose ``auto_map`` points at a module ``evil`` written there, which writes a marker file when imported:
the marker never appears, and the command either works with transformers' own classes (the
config names a built-in ``model_type``) or fails with a clear error (only the folder's code could
load it), exit 1, within the timeout, with no prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.evalfixtures import random_model

pytestmark = pytest.mark.slow  # every command in a subprocess, transformers and lm-eval loaded (~30 s)

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Do you wish to run the custom code"
NEVER = ("(auto_map in its config.json or tokenizer_config.json names classes transformers doesn't have); "
         "merger never runs a model's or tokenizer's own code")
HINT = "hint: use a model or tokenizer whose model_type / tokenizer_class transformers has built in"

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("evil.py ran")
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast


class EvilConfig(GPTNeoXConfig):
    model_type = "evil"


class EvilModel(GPTNeoXForCausalLM):
    config_class = EvilConfig


class EvilTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def make_evil(folder: Path, marker: Path, *, builtin: bool) -> Path:
    """Point ``folder``'s config and tokenizer config at its module ``evil``; ``builtin=False`` also drops
    ``model_type`` and ``tokenizer_class``, so that only the folder's code could load them."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    cfg_path = folder / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
        if not builtin:
            cfg.pop("model_type")
        cfg_path.write_text(json.dumps(cfg))
    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    tok["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizerFast"]}
    if not builtin:
        tok.pop("tokenizer_class", None)
    tok_path.write_text(json.dumps(tok))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return random_model(tmp_path_factory.mktemp("tiny") / "model")


def copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def merger(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", "from merger.cli import main; main()", *args], input="y\ny\ny\n",
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=240)


def check(r: subprocess.CompletedProcess, marker: Path, *, ok: bool, who: str = "", what: str = "") -> None:
    """No marker, no prompt, no traceback; exit 0, or exit 1 with ``who``: only its code could load ``what``."""
    out = r.stdout + r.stderr
    print(out)  # shown when the test fails
    assert not marker.exists(), f"the folder's code ran:\n{out}"
    assert PROMPT not in out, out
    assert "Traceback" not in out and "unexpected" not in out, out
    if ok:
        assert r.returncode == 0, out
    else:
        assert r.returncode == 1, out
        err = r.stderr[r.stderr.index("Error: "):]
        assert err.startswith(f"Error: {who}: only Python code in the folder could load {what} {NEVER}"), out
        assert HINT in err, out


def run_of(tiny: Path, root: Path, marker: Path, *, builtin: bool) -> Path:
    for step in (5, 10):
        make_evil(copy(tiny, root / f"step{step}"), marker, builtin=builtin)
    return root


def test_sweep_tokenizer_folder(tiny, tmp_path):
    """The issue's case: `sweep --tokenizer DIR` with a tokenizer only DIR's code loads."""
    marker = tmp_path / "ran"
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny / f).exists():
            (tok / f).write_bytes((tiny / f).read_bytes())
    make_evil(tok, marker, builtin=False)
    run = run_of(tiny, tmp_path / "run", marker, builtin=True)
    r = merger(["sweep", str(run), "-r", "step5..step10", "--every", "5", "-k", "2", "--limit", "1",
                "--device", "cpu", "-o", str(tmp_path / "sweep"), "--tokenizer", str(tok)], tmp_path)
    check(r, marker, ok=False, who=f"--tokenizer {tok}", what="its tokenizer")


def test_sweep_run_with_remote_config(tiny, tmp_path):
    marker = tmp_path / "ran"
    run = run_of(tiny, tmp_path / "run", marker, builtin=False)
    r = merger(["sweep", str(run), "-r", "step5..step10", "--every", "5", "-k", "2", "--limit", "1",
                "--device", "cpu", "-o", str(tmp_path / "sweep")], tmp_path)
    check(r, marker, ok=False, who=str(run / "step10"), what="its config or tokenizer")


def test_sweep_run_with_builtin_classes(tiny, tmp_path):
    marker = tmp_path / "ran"
    run = run_of(tiny, tmp_path / "run", marker, builtin=True)
    r = merger(["sweep", str(run), "-r", "step5..step10", "--every", "5", "-k", "2", "--limit", "1",
                "--device", "cpu", "-o", str(tmp_path / "sweep")], tmp_path)
    check(r, marker, ok=True)


@pytest.mark.parametrize("builtin", [True, False])
def test_eval(tiny, tmp_path, builtin):
    marker = tmp_path / "ran"
    model = make_evil(copy(tiny, tmp_path / "model"), marker, builtin=builtin)
    r = merger(["eval", str(model), "--tasks", "merger_pydocs_ppl", "--limit", "1", "--device", "cpu",
                "-o", str(tmp_path / "eval")], tmp_path)
    check(r, marker, ok=builtin, who=str(model), what="the model or its tokenizer")


def test_average_eval(tiny, tmp_path):
    marker = tmp_path / "ran"
    run = run_of(tiny, tmp_path / "run", marker, builtin=False)
    r = merger(["average", str(run), "-o", str(tmp_path / "avg"), "--eval", "--tasks", "merger_pydocs_ppl",
                "--limit", "1", "--device", "cpu"], tmp_path)
    check(r, marker, ok=False, who=str(run / "step10"), what="the model or its tokenizer")  # the baseline: first


def test_grow(tiny, tmp_path):
    """grow reads config.json as JSON (never through transformers); the grown model carries the
    config and tokenizer files, not the folder's Python."""
    marker = tmp_path / "ran"
    small = make_evil(copy(tiny, tmp_path / "small"), marker, builtin=True)
    r = merger(["grow", str(small), "-o", str(tmp_path / "big"), "--width", "2"], tmp_path)
    check(r, marker, ok=True)
    assert not (tmp_path / "big" / "evil.py").exists()
