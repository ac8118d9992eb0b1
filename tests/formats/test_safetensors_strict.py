"""safetensors headers are checked as strictly as the safetensors library checks them (issue 12,
parts 3 and 5), and every refusal names the file.

Each case rewrites one revision's ``model.safetensors`` of a real trajectory with a damaged header
and runs the real CLI: exit 1, the file's path in the message, a hint, no "unexpected", no output,
inputs unchanged. The library's own verdict on the same file is checked too (``safe_open``):
merger refuses everything it refuses, and also duplicate names (which it silently resolves).
Then a hypothesis fuzzer over headers and over ``*.index.json`` files: exit 0 with the right
tensors (and a file the library accepts), or exit 1 with a message that names a path.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save
from typer.testing import CliRunner

from helpers import make_run
from helpers.fuzz import examples
from merger.cli import app

runner = CliRunner()


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n]), raw[8 + n:]


def write(path: Path, header: bytes | str | dict, data: bytes) -> None:
    h = json.dumps(header).encode() if isinstance(header, dict) else \
        header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:  # noqa: BLE001 - any refusal of the library's
        return False


def refused(args: list[str], where: Path, out: Path, inputs: Path, *expected: str) -> str:
    before = digest(inputs)
    r = runner.invoke(app, [*args, "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "unexpected" not in r.output and "Traceback" not in r.output, r.output
    err = r.stderr[r.stderr.index("Error: "):]
    assert str(where) in err and "\nhint: " in err, err
    for e in expected:
        assert e in err, f"{e!r} not in {err}"
    assert not out.exists() and digest(inputs) == before
    return err


def _two_same(header: dict) -> tuple[str, str]:
    """Two tensors with the same dtype and shape (for aliasing)."""
    seen = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        key = (v["dtype"], tuple(v["shape"]))
        if key in seen:
            return seen[key], k
        seen[key] = k
    raise AssertionError("no two tensors alike")


def damage(case: str, header: dict, data: bytes) -> tuple[bytes | str | dict, bytes]:
    names = [k for k in header if k != "__metadata__"]
    first = min(names, key=lambda k: header[k]["data_offsets"][0])
    if case == "infinite-shape":
        text = json.dumps(header).replace(json.dumps(header[first]["shape"]), "[Infinity]", 1)
        return text, data
    if case == "huge-shape":
        header[first]["shape"] = [1 << 40, 1 << 40]
    elif case == "float-shape":
        header[first]["shape"] = [float(d) for d in header[first]["shape"]]
    elif case == "negative-shape":
        header[first]["shape"] = [-1] + header[first]["shape"][1:]
    elif case == "deeply-nested-metadata":
        return json.dumps(header)[:-1] + ', "__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}", data
    elif case == "metadata-not-strings":
        header["__metadata__"] = {"format": {"nested": 1}}
    elif case == "aliased-offsets":
        a, b = _two_same(header)
        header[b]["data_offsets"] = header[a]["data_offsets"]
    elif case == "overlapping-offsets":
        second = sorted(names, key=lambda k: header[k]["data_offsets"][0])[1]
        s, e = header[second]["data_offsets"]
        header[second]["data_offsets"] = [s - 2, e - 2]  # into the first tensor's last bytes
    elif case == "duplicate-names":
        text = json.dumps(header)
        entry = f'"{first}": {json.dumps(header[first])}'
        return text[:-1] + ", " + entry + "}", data
    elif case == "trailing-bytes":
        return header, data + b"\0" * 16
    elif case == "offsets-not-two-integers":
        header[first]["data_offsets"] = [0, "8", 3]
    elif case == "not-utf8":
        return json.dumps(header).encode().replace(first.encode(), b"\xff\xfe" + first.encode()[2:], 1), data
    return header, data


CASES = {
    "infinite-shape": "Infinity is not a number safetensors allows",
    "huge-shape": "is too large",
    "float-shape": "not a list of non-negative integers",
    "negative-shape": "not a list of non-negative integers",
    "deeply-nested-metadata": "nested too deeply",
    "metadata-not-strings": "__metadata__ must map names to strings",
    "aliased-offsets": "overlaps another tensor's bytes",
    "overlapping-offsets": "overlaps another tensor's bytes",
    "duplicate-names": "appears twice",
    "trailing-bytes": "16 bytes after the last tensor",
    "offsets-not-two-integers": "not two non-negative integers",
    "not-utf8": "not UTF-8",
}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    root, _ = make_run(tmp_path_factory.mktemp("strict") / "run")
    return root


@pytest.mark.parametrize("case", list(CASES))
def test_header_the_library_refuses_is_refused_by_name(run_root, tmp_path, case):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(run_root, root)
    f = root / "step2000" / "model.safetensors"
    header, data = split(f)
    write(f, *damage(case, header, data))
    assert library_accepts(f) == (case == "duplicate-names")  # the one case merger is stricter about
    refused(["average", str(root)], f, tmp_path / "merged", root, CASES[case], "re-download the file")


def test_weight_map_values_that_are_not_file_names(tmp_path):
    root, _ = make_run(tmp_path / "run", max_shard_size=100_000)
    index = root / "step2000" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    name = sorted(d["weight_map"])[0]
    for bad in (5, None, ["model-00001-of-00004.safetensors"], ""):
        d["weight_map"][name] = bad
        index.write_text(json.dumps(d))
        refused(["average", str(root)], index, tmp_path / "merged", root,
                f"weight_map[{name!r}] is {bad!r}, not a file name")
    for outside in ("../step1000/model-00001-of-00004.safetensors", str(root / "step1000" / "x.safetensors")):
        d["weight_map"][name] = outside
        index.write_text(json.dumps(d))
        refused(["average", str(root)], index, tmp_path / "merged", root, "a path outside the checkpoint folder")
    d["weight_map"] = ["not", "a", "map"]
    index.write_text(json.dumps(d))
    refused(["average", str(root)], index, tmp_path / "merged", root, "weight_map is not an object")


# -- fuzzing ----------------------------------------------------------------------------------------

ST = {"F16": (torch.float16, 2), "F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8),
      "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1)}
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=False),
                 st.text(max_size=6), st.lists(st.integers(-3, 1 << 65), max_size=4),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@st.composite
def headers(draw):
    """A valid header and data (random tensors), then 0-3 mutations of it."""
    n = draw(st.integers(1, 4))
    header: dict = {}
    data = b""
    for i in range(n):
        dt = draw(st.sampled_from(sorted(ST)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = ST[dt][1] * int(torch.tensor(shape).prod()) if shape else ST[dt][1]
        if dt == "BOOL":
            blob = bytes(draw(st.lists(st.integers(0, 1), min_size=nbytes, max_size=nbytes)))
        else:
            blob = draw(st.binary(min_size=nbytes, max_size=nbytes))
        header[f"t{i}"] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
        data += blob
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    raw_tail, trailing = None, b""
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["shape", "dim", "offsets", "offset", "dtype", "drop", "extra", "metadata",
                                     "swap", "trailing", "truncate", "duplicate", "entry"]))
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__") or ["t0"]))
        e = header.get(name)
        if not isinstance(e, dict):
            continue
        if kind == "shape":
            e["shape"] = draw(JUNK)
        elif kind == "dim" and isinstance(e.get("shape"), list) and e["shape"]:
            e["shape"][draw(st.integers(0, len(e["shape"]) - 1))] = draw(JUNK)
        elif kind == "offsets":
            e["data_offsets"] = draw(JUNK)
        elif kind == "offset" and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2:
            e["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-8, 8))
        elif kind == "dtype":
            e["dtype"] = draw(st.one_of(st.sampled_from(["F64", "I8", "U16", "F8_E5M2", "f16", "Q4"]), JUNK))
        elif kind == "drop":
            e.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra":
            e["extra"] = draw(JUNK)
        elif kind == "metadata":
            header["__metadata__"] = draw(JUNK)
        elif kind == "swap" and len(header) > 1:
            other = draw(st.sampled_from(sorted(header)))
            header[name], header[other] = header[other], header[name]
        elif kind == "trailing":
            trailing += draw(st.binary(min_size=1, max_size=9))
        elif kind == "truncate" and data:
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif kind == "duplicate":
            raw_tail = f', "{name}": {json.dumps(e)}'
        elif kind == "entry":
            header[name] = draw(JUNK)
    text = json.dumps(header)
    if raw_tail:
        text = text[:-1] + raw_tail + "}"
    return text.encode(), data + trailing


def check_outcome(r, folder: Path, out: Path, fuzzed: list[Path]) -> None:
    assert r.exit_code in (0, 1), r.output
    assert "unexpected" not in r.output and "Traceback" not in r.output, r.output
    if r.exit_code == 1:
        err = r.stderr[r.stderr.index("Error: "):]
        assert str(folder) in err, err  # names the file (or its folder)
        assert not out.exists()
        return
    for f in fuzzed:  # merger accepted it: so must the library, and the output must hold its tensors
        assert library_accepts(f), f"merger accepted {f}, which safetensors refuses"
    ref = {}
    for f in fuzzed:
        ref.update(load_file(str(f)))
    got = {}
    for f in out.glob("*.safetensors"):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(ref)
    for k in ref:  # two identical revisions: every tensor is copied bit for bit
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        assert got[k].reshape(-1).view(torch.uint8).equal(ref[k].reshape(-1).view(torch.uint8)), k


@pytest.mark.fuzz
@settings(max_examples=examples(200), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(headers())
def test_fuzz_safetensors_headers(blob):
    header, data = blob
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        for step in (1, 2):  # two identical revisions
            (root / f"step{step}").mkdir(parents=True)
            write(root / f"step{step}" / "model.safetensors", header, data)
        out = Path(tmp) / "merged"
        r = runner.invoke(app, ["average", str(root), "-o", str(out)])
        check_outcome(r, root, out, [root / "step2" / "model.safetensors"])


INDEX_JUNK = st.one_of(JUNK, st.sampled_from(["a.safetensors", "b.safetensors", "../b.safetensors", "/etc/passwd",
                                               "missing.safetensors", "", "b.safetensors/"]))


SHARD_A = save({"x": torch.arange(3, dtype=torch.float32)})
SHARD_B = save({"y": torch.ones(2, dtype=torch.float16), "z": torch.tensor([1, 2])})


@st.composite
def indexes(draw):
    wmap: dict = {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}
    doc: dict = {"metadata": {"total_size": 12}, "weight_map": wmap}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["value", "key", "drop", "map", "doc", "metadata", "extra"]))
        wm = doc.get("weight_map") if isinstance(doc, dict) else None
        if kind == "value" and isinstance(wm, dict) and wm:
            doc["weight_map"][draw(st.sampled_from(sorted(doc["weight_map"])))] = draw(INDEX_JUNK)
        elif kind == "key" and isinstance(wm, dict):
            doc["weight_map"][draw(st.text(max_size=3))] = draw(INDEX_JUNK)
        elif kind == "drop" and isinstance(wm, dict) and wm:
            doc["weight_map"].pop(draw(st.sampled_from(sorted(doc["weight_map"]))))
        elif kind == "map" and isinstance(doc, dict):
            doc["weight_map"] = draw(JUNK)
        elif kind == "doc":
            doc = draw(JUNK)
        elif kind == "metadata" and isinstance(doc, dict):
            doc["metadata"] = draw(JUNK)
        elif kind == "extra" and isinstance(doc, dict):
            doc[draw(st.text(max_size=3))] = draw(JUNK)
    text = json.dumps(doc).encode()
    if draw(st.integers(0, 9)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@pytest.mark.fuzz
@settings(max_examples=examples(100), deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(indexes())
def test_fuzz_index_files(index):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        for step in (1, 2):
            d = root / f"step{step}"
            d.mkdir(parents=True)
            (d / "a.safetensors").write_bytes(SHARD_A)
            (d / "b.safetensors").write_bytes(SHARD_B)
            (d / "model.safetensors.index.json").write_bytes(index)
        out = Path(tmp) / "merged"
        r = runner.invoke(app, ["average", str(root), "-o", str(out)])
        # accepted: the output holds every tensor of the shard files the index names (as
        # transformers loads them), copied bit for bit (two identical revisions)
        if r.exit_code == 0:
            files = set(json.loads(index)["weight_map"].values())
            assert files <= {"a.safetensors", "b.safetensors"}, files
            ref = {}
            for f in files:
                ref.update(load_file(str(root / "step2" / f)))
            got = {}
            for f in out.glob("*.safetensors"):
                got.update(load_file(str(f)))
            assert sorted(got) == sorted(ref) and all(got[k].equal(ref[k]) for k in ref)
        else:
            check_outcome(r, root, out, [])
