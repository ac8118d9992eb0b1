"""Planning, IO, manifest and ``merger average --dry-run`` never import torch (1 s to import).

Each check runs in a fresh ``python`` subprocess (this test process has torch loaded already) that
reports ``'torch' in sys.modules`` from an ``atexit`` hook, after the command has finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import make_run
from merger import units

LIBRARY = "merger.api, merger.plan, merger.output.folder, merger.formats, merger.output.manifest, merger.engine.run, " \
          "merger.engine.choose, merger.units, merger.sources, merger.device"

# runs the CLI with the arguments after -c; ``NO_GPU`` hides any GPU driver from --device auto
CLI = """
import atexit, sys
atexit.register(lambda: sys.stderr.write(f"\\ntorch imported: {'torch' in sys.modules}\\n"))
if NO_GPU:
    import merger.device
    merger.device.GPU_DEVICE_PATHS = ()
from merger.cli import main
sys.argv = ["merger", *sys.argv[1:]]
main()
"""


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120)


def test_library_imports_without_torch():
    r = python(f"import sys, {LIBRARY}; print('torch' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.parametrize("fmt,device", [("safetensors", "cpu"), ("bin", "cpu"), ("safetensors", "auto")])
def test_dry_run_does_not_import_torch(tmp_path, fmt, device):
    root, _ = make_run(tmp_path / "run", fmt=fmt)
    r = python(CLI.replace("NO_GPU", str(device == "auto")), "average", str(root), "--revisions",
               "step1000..step3000", "-o", str(tmp_path / "o"), "--dry-run", "--device", device, "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["device"] == "cpu" and plan["tensors"] > 0 and len(plan["inputs"]) == 3
    assert r.stderr.strip().endswith("torch imported: False"), r.stderr


def test_dtype_table_matches_torch():
    for name, st in units.ST_NAMES.items():
        dt = units.dtype_from_name(name)
        assert isinstance(dt, torch.dtype) and units.itemsize(name) == dt.itemsize, name
        assert units.ST_DTYPES[st] == name == units.dtype_name(dt)
    assert units.parse_dtype("bf16") == "bfloat16" and units.parse_dtype("torch.half") == "float16"


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_cpu_merge_does_not_import_torch(tmp_path, fmt):
    """The whole CPU merge (native kernel, writer, merger.json) runs without torch; the output is the
    torch kernel's, byte for byte (tests/fold/test_native.py compares them)."""
    from merger.fold import native

    if native.unavailable() is not None:
        pytest.skip(f"native kernel unavailable: {native.unavailable()}")
    root, _ = make_run(tmp_path / "run", fmt=fmt)
    r = python(CLI.replace("NO_GPU", "True"), "average", str(root), "--revisions", "step1000..step3000",
               "-o", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"]["kernel"] == "native"
    m = json.loads((tmp_path / "o" / "merger.json").read_text())
    assert m["kernel"] == "native" and m["environment"]["torch"] == torch.__version__
    assert r.stderr.strip().endswith("torch imported: False"), r.stderr
