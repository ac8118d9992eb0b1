"""The peak RSS a merge reports is the process's, to the end: the ``--to nanogpt`` conversion of
a nanoGPT run (which imports torch and builds the model's state dict) included.

The CLI runs in a subprocess (this test process's own memory is not mixed in), which prints its
own ``ru_maxrss`` right after the command returns. It is started by a shell that forks it: Linux
keeps ``ru_maxrss`` across ``execve``, so a process exec'd straight from pytest (vfork) would start
with pytest's own peak (~340 MB with torch loaded) and hide the difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from merger.testing.nanogpt import nanogpt_run

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=257, bias=True, dropout=0.0)

SCRIPT = """
import contextlib, io, json, resource, sys
from merger.cli import app
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        app(sys.argv[1:], standalone_mode=False)
    except SystemExit as e:
        assert not e.code, e.code
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"out": json.loads(buf.getvalue()), "after": after}))
"""


@pytest.mark.slow  # a merger process of its own (~3 s)
def test_reported_peak_rss_is_the_whole_process(tmp_path):
    run = nanogpt_run(tmp_path / "out", ARGS, steps=(100, 200, 300))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                    os.environ.get("PYTHONPATH")])))
    (tmp_path / "run_cli.py").write_text(SCRIPT)
    argv = [sys.executable, str(tmp_path / "run_cli.py"), "average", str(run), "-o", str(tmp_path / "m"),
            "--to", "nanogpt", "--json"]
    # sh forks the CLI (no exec of the last command: `; exit $?`), so its peak starts from sh's
    p = subprocess.run(["sh", "-c", '"$@"; exit $?', "sh", *argv], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout.strip().splitlines()[-1])
    reported, after = d["out"]["result"]["peak_rss"], d["after"]
    manifest = json.loads((tmp_path / "m" / "merger.json").read_text())
    # ru_maxrss only grows: the reported peak is at most the process's peak after the command, and the
    # conversion's memory is in it (before the fix: 42 MB reported for a 242 MB process)
    assert after / 1.05 <= reported <= after, (reported, after)
    assert after / 1.5 <= manifest["peak_rss"] <= reported, (manifest["peak_rss"], after)
