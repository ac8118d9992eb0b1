"""Tiny pickles built to exhaust memory or recursion (a memo index near 2**28, chained
``_codecs.encode``, ``str``/``tuple`` chains in DCP ``.metadata``, deep nesting) are refused with a
clear error, each read in a subprocess under a 3 GiB address-space limit so a regression fails fast;
and plain values read as torch reads them (protocol 2's ``__builtin__`` names, dtypes and devices
carried into an output keep their types)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

from merger.errors import CheckpointFormatError
from merger.formats.pt_header import read_header, to_plain
from merger.formats.torch_pt import model_entries, read
from pickles import P, torch_zip

LIMIT = 3 << 30  # address space: the memo bomb alone takes 4 GiB


def read_in_subprocess(tmp_path, code: str) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT}))
        from merger.errors import MergerError
        try:
            {code}
        except MergerError as e:
            print("REFUSED", e)
            sys.exit(3)
        print("READ")
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)


def test_a_huge_memo_index_allocates_nothing(tmp_path):
    p = P()
    p.op(b"}").op(b"r" + struct.pack("<I", (1 << 28) - 1)).op(b"j" + struct.pack("<I", (1 << 28) - 1))
    (tmp_path / "a.pt").write_bytes(torch_zip(p.dump(), {}))
    r = read_in_subprocess(tmp_path, "from merger.formats.pt_header import read_header; read_header('a.pt')")
    assert r.returncode == 0 and "READ" in r.stdout, r.stdout + r.stderr
    assert len((tmp_path / "a.pt").read_bytes()) < 1000


def test_chained_codecs_are_refused(tmp_path):
    pkl = P()
    pkl.mark().glob("_codecs", "encode").put()
    pkl.str("x" * 64).str("latin1").tuple(2).reduce()
    for _ in range(40):  # each step doubles with the hex codec: 2**46 bytes if allowed
        last = pkl.put()
        pkl.get(0).get(last).str("hex").tuple(2).reduce()
    pkl.tuple()
    (tmp_path / "a.pt").write_bytes(torch_zip(pkl.dump(), {}))
    r = read_in_subprocess(tmp_path, "from merger.formats.pt_header import read_header; read_header('a.pt')")
    assert r.returncode == 3 and "a.pt" in r.stdout, r.stdout + r.stderr


def test_repeated_calls_over_one_big_value_hit_the_budget(tmp_path):
    pkl = P()
    pkl.op(b"]").mark().glob("builtins", "set").put()
    pkl.op(b"]").mark()
    for i in range(20000):
        pkl.int(i)
    pkl.op(b"e")
    big = pkl.put()
    for _ in range(20000):  # 20000 sets of 20000 items each: 400M entries from a 200 KB file
        pkl.get(0).get(big).tuple(1).reduce()
    pkl.op(b"e")
    (tmp_path / "a.pt").write_bytes(torch_zip(pkl.dump(), {}))
    r = read_in_subprocess(tmp_path, "from merger.formats.pt_header import read_header; read_header('a.pt')")
    assert r.returncode == 3 and "grow far past" in r.stdout, r.stdout + r.stderr


def _dcp(tmp_path, body: bytes):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".metadata").write_bytes(body)
    return read_in_subprocess(tmp_path, "from merger.formats.dcp_metadata import read_metadata; read_metadata('ck')")


def test_str_and_tuple_chains_in_dcp_metadata_are_refused(tmp_path):
    q = P()
    q.mark().glob("torch", "Size").put()
    q.glob("torch.serialization", "_get_layout").put()
    q.str("ab" * 100)
    for _ in range(30):  # _get_layout(Size(str)): a tuple of characters, then its repr: ~5x a step
        s = q.put()
        q.get(0).get(s).tuple(1).reduce()
        t = q.put()
        q.get(1).get(t).tuple(1).reduce()
    q.tuple()
    r = _dcp(tmp_path, q.dump())
    assert r.returncode == 3 and ".metadata" in r.stdout, r.stdout + r.stderr


def test_a_huge_memo_index_in_dcp_metadata_allocates_nothing(tmp_path):
    body = b"\x80\x04}" + b"r" + struct.pack("<I", (1 << 28) - 1) + b"."
    r = _dcp(tmp_path, body)
    assert r.returncode == 3 and "Metadata" in r.stdout and "MemoryError" not in r.stdout, r.stdout + r.stderr


def test_deep_nesting_is_refused_at_read_time(tmp_path):
    p = P()
    p.op(b"}").str("model").op(b"}").op(b"s").str("config")
    for _ in range(5000):
        p.op(b"]")
    for _ in range(4999):
        p.op(b"a")
    p.op(b"s")
    (tmp_path / "a.pt").write_bytes(torch_zip(p.dump(), {}))
    with pytest.raises(CheckpointFormatError, match="nested more than 100"):
        read_header(tmp_path / "a.pt")
    t = P()
    t.op(b"}").str("k").none()
    for _ in range(100000):  # hashing tuples this deep crashes CPython
        t.tuple(1)
    t.op(b"s")
    (tmp_path / "b.pt").write_bytes(torch_zip(t.dump(), {}))
    with pytest.raises(CheckpointFormatError, match="nested more than 100"):
        read_header(tmp_path / "b.pt")


def test_protocol2_builtins_read_as_torch_reads_them(tmp_path):
    obj = {"s": {1, 2}, "c": complex(1, 2), "b": b"\x00\xff", "model": {"w": torch.arange(3.0)}}
    torch.save(obj, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    assert b"__builtin__\nset" in data and b"__builtin__\ncomplex" in data
    tree = read_header(tmp_path / "a.pt").tree
    want = torch.load(tmp_path / "a.pt", weights_only=True)
    assert tree["s"] == want["s"] == {1, 2} and tree["c"] == want["c"] and tree["b"] == want["b"]


def test_carried_dtypes_and_devices_keep_their_types(tmp_path):
    config = {"dtype": torch.bfloat16, "device": torch.device("cuda", 0), "n": 3, "shared": [1]}
    config["again"] = config["shared"]
    torch.save({"model": {"w": torch.arange(3.0)}, "config": config}, tmp_path / "a.pt")
    got = read_header(tmp_path / "a.pt").tree["config"]
    assert got["dtype"] == "torch.bfloat16" and got["device"] == "cuda:0"  # still compare as before
    out = to_plain(got)
    assert out["dtype"] is torch.bfloat16 and out["device"] == torch.device("cuda", 0)
    assert out["again"] is out["shared"]
    torch.save(out, tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True) == config


def test_a_bare_storage_is_refused_by_name(tmp_path):
    torch.save(torch.arange(4.0).untyped_storage(), tmp_path / "a.pt")
    with pytest.raises(CheckpointFormatError, match="bare storage"):
        read(tmp_path / "a.pt")


def test_an_expanded_view_is_refused(tmp_path):
    torch.save({"model": {"w": torch.arange(4.0).expand(1000, 4)}}, tmp_path / "a.pt")
    with pytest.raises(CheckpointFormatError, match="expanded view"):
        read(tmp_path / "a.pt")


@pytest.mark.parametrize("order", [("transformer.wte.weight", "lm_head.weight"),
                                   ("lm_head.weight", "transformer.wte.weight")])
def test_a_tied_head_is_the_alias_in_either_order(tmp_path, order):
    w = torch.arange(6.0).reshape(3, 2)
    torch.save({"model": {name: w for name in order}}, tmp_path / "a.pt")
    _, entries = model_entries(read_header(tmp_path / "a.pt"))
    assert dict(entries) == {"transformer.wte.weight": "transformer.wte.weight",
                             "lm_head.weight": "transformer.wte.weight"}
    assert list(read(tmp_path / "a.pt")) == ["transformer.wte.weight"]


def test_plain_values_torch_save_writes_read_back_equal(tmp_path):
    obj = {"model": {"w": torch.zeros(2)}, "args": {"a": [1, 2.5, "x", None, True, (1, 2)]}}
    torch.save(obj, tmp_path / "a.pt")
    assert read_header(tmp_path / "a.pt").tree["args"] == obj["args"]
