"""torch zip files that torch would read differently from merger, or not at all, are refused before
a byte is averaged: big-endian files, duplicate zip members, negative or non-integer tensor records,
a compressed (zip-bomb) data.pkl. Each file is written with zipfile and a pickle that has torch's
own structure; the real CLI must exit 1 naming the file, leave nothing behind, change nothing."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import check_against_reference, make_run
from helpers.crafted import Storage as _Storage
from helpers.crafted import Tensor as _Tensor
from helpers.crafted import build, members, write_torch_zip
from merger.cli import app

runner = CliRunner()


def write_bin(path: Path, tensors: dict, data: bytes) -> None:
    """A torch zip holding ``tensors`` (records over storage ``0``, which holds ``data``)."""
    write_torch_zip(path, tensors, {"0": data})


def rewrite(path: Path, *, byteorder: bytes | None = None, duplicate: bool = False, compress_pkl: bool = False) -> None:
    """Rewrite a real torch.save file member by member, changing only what is asked: the tensors
    stay those of the other revisions, so only the change can make merger refuse it."""
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            if name.endswith("/byteorder") and byteorder is not None:
                data = byteorder
            pkl = name.endswith("/data.pkl") and compress_pkl
            z.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED if pkl else zipfile.ZIP_STORED)
            if duplicate and "/data/" in name:
                z.writestr(zipfile.ZipInfo(name), bytes(len(data)))
                duplicate = False


def digest(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def run_sds(tmp_path):
    return make_run(tmp_path / "run", fmt="bin")


@pytest.fixture
def run(run_sds):
    return run_sds[0]


def refused(run: Path, tmp_path: Path, *expected: str) -> None:
    before = digest(run)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate member it was asked to write
        r = runner.invoke(app, ["average", str(run), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "unexpected" not in r.output
    assert "step2000/pytorch_model.bin" in r.output and "hint:" in r.output
    for e in expected:
        assert e in r.output, r.output
    assert digest(run) == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.merger-*"))


def test_a_hand_written_file_is_read_like_torch(run, tmp_path):
    """The writer below makes files torch.load reads: the refusals test merger, not the writer."""
    f = tmp_path / "ok.bin"
    data = torch.arange(8, dtype=torch.float16).numpy().tobytes()
    write_bin(f, {"w": _Tensor(_Storage("0", 8), 2, (2, 3), (3, 1))}, data)
    assert torch.equal(torch.load(f)["w"], torch.arange(2, 8, dtype=torch.float16).reshape(2, 3))

    from merger.formats.torch_zip import read_torch_zip

    info = read_torch_zip(f)["w"]
    blob = f.read_bytes()
    got = b"".join(blob[e.offset: e.offset + e.nbytes] for e in info.extents)
    assert got == torch.arange(2, 8, dtype=torch.float16).numpy().tobytes()


def test_big_endian_is_refused(run, tmp_path):
    rewrite(run / "step2000" / "pytorch_model.bin", byteorder=b"big")
    refused(run, tmp_path, "byte order b'big'", "little-endian")


def test_duplicate_members_are_refused(run, tmp_path):
    rewrite(run / "step2000" / "pytorch_model.bin", duplicate=True)
    refused(run, tmp_path, "/data/0' twice")


@pytest.mark.parametrize("offset,size,stride", [(-1, (4,), (1,)), (0, (-4,), (1,)), (0, (2.5,), (1,)),
                                                (0, (4,), (-1,)), (True, (4,), (1,)), (0, (2, 2), (1,))])
def test_malformed_tensor_records_are_refused(run, tmp_path, offset, size, stride):
    write_bin(run / "step2000" / "pytorch_model.bin", {"w": _Tensor(_Storage("0", 4), offset, size, stride)},
              bytes(8))
    refused(run, tmp_path, "corrupt pickle in data.pkl", "tensor record")


def test_compressed_pickle_is_refused(run, tmp_path):
    """A zip bomb: a data.pkl that would inflate to far more than the file; torch never compresses it."""
    rewrite(run / "step2000" / "pytorch_model.bin", compress_pkl=True)
    refused(run, tmp_path, "holds the compressed zip member 'pytorch_model/data.pkl'")


def test_size_one_dims_with_any_stride_are_contiguous(run, tmp_path):
    """torch calls a tensor contiguous whatever the stride of its size-1 dims (a row sliced out of a
    matrix and saved, say): merger reads it as torch does instead of refusing it."""
    from merger.formats.torch_zip import read_torch_zip

    f = tmp_path / "row.bin"
    data = torch.arange(12, dtype=torch.float16)
    write_bin(f, {"row": _Tensor(_Storage("0", 12), 4, (1, 4), (99, 1))}, data.numpy().tobytes())
    want = torch.load(f)["row"]
    assert want.is_contiguous() and want.stride() == (99, 1)
    info = read_torch_zip(f)["row"]
    blob = f.read_bytes()
    got = b"".join(blob[e.offset: e.offset + e.nbytes] for e in info.extents)
    assert got == want.numpy().tobytes() and len(info.extents) == 1


# -- whole files are read by their central directory, as torch (miniz) reads them ----------------

def reads_like_torch(f: Path) -> None:
    """merger's extents of every tensor of ``f`` hold exactly the bytes ``torch.load`` reads."""
    from merger.formats.torch_zip import read_torch_zip

    want, got, blob = torch.load(f, weights_only=True), read_torch_zip(f), f.read_bytes()
    assert set(got) == set(want)
    for k, v in want.items():
        assert (got[k].dtype, got[k].shape) == (str(v.dtype).removeprefix("torch."), tuple(v.shape)), k
        data = b"".join(blob[e.offset: e.offset + e.nbytes] for e in got[k].extents)
        assert data == v.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k


@pytest.mark.parametrize("kind", ["directory names in another case", "local header names differ"])
def test_member_names_are_found_as_torch_finds_them(run_sds, tmp_path, kind):
    """A pytorch_model.bin rewritten by hand: its central directory names each storage
    ``pytorch_model/DATA/<key>`` while the pickle asks for ``data/<key>`` (miniz looks names up
    ignoring ASCII case: torch finds them; Python's zipfile does not), or its local headers carry
    other (longer) names than its directory (torch takes the directory's; zipfile refuses to read
    the member). merger reads what torch.load reads, and averages it."""
    run, sds = run_sds
    f = run / "step2000" / "pytorch_model.bin"
    ms = members(f.read_bytes())
    if kind == "directory names in another case":
        ms = [{**m, "name": m["name"].replace(b"/data/", b"/DATA/")} for m in ms]
    else:
        ms = [{**m, "lname": m["name"] + b"-another-name"} if m["name"].endswith((b"data.pkl", b"/0", b"/1")) else m
              for m in ms]
    f.write_bytes(build(ms))
    with zipfile.ZipFile(f) as z:  # what the old reader (Python's zipfile) saw
        if kind == "directory names in another case":
            assert "pytorch_model/data/0" not in z.NameToInfo and "pytorch_model/DATA/0" in z.NameToInfo
        else:
            with pytest.raises(zipfile.BadZipFile, match="differ"):
                z.read("pytorch_model/data.pkl")
    loaded = torch.load(f, weights_only=True)
    assert set(loaded) == set(sds[1]) and all(torch.equal(loaded[k], v) for k, v in sds[1].items())
    reads_like_torch(f)
    r = runner.invoke(app, ["average", str(run), "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    check_against_reference(tmp_path / "out", sds, [1 / 3] * 3)


def test_a_file_with_an_end_record_is_never_walked(run, tmp_path):
    """Only a file with no zip end record (cut short) is read by walking its local headers; a
    complete file that torch refuses (here: its central directory offset points into data.pkl) is
    refused, not walked."""
    f = run / "step2000" / "pytorch_model.bin"
    f.write_bytes(build(members(f.read_bytes()), cd_at=100))
    with pytest.raises(Exception):  # noqa: B017 - torch refuses it, with whatever it raises
        torch.load(f, weights_only=True)
    refused(run, tmp_path, "a corrupt central directory entry")
