"""merger's torch-zip reader against ``torch.load(weights_only=True)``, over pickles generated from
torch's own grammar (``tests/pickles.py``): for each, both read the same values, or both refuse, or
merger refuses with a clear error (a ``CheckpointFormatError``) where torch reads; those are counted
and must stay few.

The grammar covers: None, bools, ints (BININT1/2, BININT, LONG1), floats, str, bytes
(``_codecs.encode(s, 'latin1')``), dtypes, ``torch.device(type[, index])``, ``complex`` and
``set``/``frozenset`` under ``builtins`` and protocol 2's ``__builtin__``, lists (APPENDS), tuples
(TUPLE1-3, TUPLE), dicts and OrderedDicts (SETITEMS), memo references (BINGET) to earlier values,
and tensors: ``_rebuild_tensor_v2`` over ``("storage", <Half|Float|Long|BFloat16>Storage, key,
"cpu", numel)`` with any offset, shape and stride (contiguous or not, zero strides), its metadata
argument (absent, ``{}``, ``neg``/``conj`` true or false: torch sets the bit for the key either way),
one key named with two storage types,
numels that don't match the stored bytes, BUILD on the storage (empty state, or setting its
dtype) or on the tensor, ``_rebuild_parameter``, and ``_rebuild_parameter_with_state`` with an
empty state, ``{'data': other tensor}``, an inert attribute, a (dict, slots) pair, ``{'real': t}``.
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merger.errors import CheckpointFormatError, MergerError
from merger.formats.pt_header import StorageRef, TensorRef, TorchDevice, TorchDType, read_header, tensor_extents
from merger.units import dtype_from_name
from pickles import P, torch_zip

KEYS = ("0", "1", "2")
CLASSES = {"HalfStorage": 2, "FloatStorage": 4, "LongStorage": 8, "BFloat16Storage": 2}
BLOB = 48  # bytes in every storage
OUTCOMES: collections.Counter = collections.Counter()

dims = st.lists(st.integers(0, 4), max_size=3)
simple = st.tuples(st.sampled_from(KEYS), st.sampled_from(sorted(CLASSES)), st.integers(0, 3), dims)
tensor = st.tuples(
    st.just("tensor"), st.sampled_from(KEYS), st.sampled_from(sorted(CLASSES)),
    st.one_of(st.none(), st.none(), st.integers(0, 30)),  # the record's numel (None: the stored bytes)
    st.integers(0, 4), dims, st.one_of(st.none(), st.none(), st.lists(st.integers(0, 5), max_size=3)),
    st.sampled_from([None, None, "empty", "neg", "not-neg", "conj"]),
    st.sampled_from([None, None, None, "param", "pstate-empty", "pstate-data", "pstate-attr", "pstate-slots",
                     "pstate-real"]),
    st.sampled_from([None, None, None, None, "storage-empty", "storage-dtype", "tensor"]), simple)
leaf = st.one_of(
    st.just(("none",)), st.tuples(st.just("bool"), st.booleans()),
    st.tuples(st.just("int"), st.integers(-2**70, 2**70)), st.tuples(st.just("float"), st.floats(allow_nan=False)),
    st.tuples(st.just("str"), st.text(max_size=6)),
    st.tuples(st.just("bytes"), st.text(alphabet=st.characters(max_codepoint=255), max_size=6)),
    st.tuples(st.just("dtype"), st.sampled_from(["float32", "bfloat16", "int64", "half"])),
    st.tuples(st.just("device"), st.sampled_from(["cpu", "cuda"]), st.one_of(st.none(), st.integers(0, 3))),
    st.tuples(st.just("complex"), st.sampled_from(["builtins", "__builtin__"]), st.floats(-9, 9), st.floats(-9, 9)),
    st.tuples(st.just("set"), st.sampled_from(["builtins", "__builtin__"]), st.sampled_from(["set", "frozenset"]),
              st.lists(st.integers(0, 9), max_size=3)),
    st.tuples(st.just("ref"), st.integers(0, 50)),
    tensor, tensor)
tree = st.recursive(leaf, lambda kids: st.one_of(
    st.tuples(st.just("list"), st.lists(kids, max_size=3)), st.tuples(st.just("tuple"), st.lists(kids, max_size=4)),
    st.tuples(st.sampled_from(["dict", "odict"]), st.dictionaries(st.text("abc", min_size=1, max_size=2), kids,
                                                                  max_size=3))), max_leaves=8)


def _storage(p: P, key, cls, numel):
    p.storage(cls, key, BLOB // CLASSES[cls] if numel is None else numel)


def _simple(p: P, spec):
    key, cls, offset, shape = spec
    p.glob("torch._utils", "_rebuild_tensor_v2").mark()
    _storage(p, key, cls, None)
    p.int(offset).mark()
    for d in shape:
        p.int(d)
    p.tuple().mark()
    for s in _contiguous(shape):
        p.int(s)
    p.tuple().bool(False).glob("collections", "OrderedDict").tuple(0).reduce().tuple().reduce()


def _contiguous(shape):
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return out[::-1]


def _tensor(p: P, spec):
    _, key, cls, numel, offset, shape, stride, meta, wrap, build, other = spec
    if wrap:
        p.glob("torch._utils", "_rebuild_parameter" if wrap == "param" else "_rebuild_parameter_with_state").mark()
    p.glob("torch._utils", "_rebuild_tensor_v2").mark()
    _storage(p, key, cls, numel)
    if build == "storage-empty":
        p.op(b"}").build()
    elif build == "storage-dtype":
        p.op(b"}").str("dtype").glob("torch", "float16").op(b"s").build()
    p.int(offset).mark()
    for d in shape:
        p.int(d)
    p.tuple().mark()
    for s in (_contiguous(shape) if stride is None else (stride + [1] * len(shape))[:len(shape)]):
        p.int(s)
    p.tuple().bool(False).glob("collections", "OrderedDict").tuple(0).reduce()
    if meta:
        p.op(b"}")
        if meta != "empty":
            p.str("conj" if meta == "conj" else "neg").bool(meta != "not-neg").op(b"s")
    p.tuple().reduce()
    if build == "tensor":
        p.op(b"}").build()
    if wrap:
        p.bool(False).glob("collections", "OrderedDict").tuple(0).reduce()
        if wrap == "pstate-empty":
            p.op(b"}")
        elif wrap in ("pstate-data", "pstate-real"):
            p.op(b"}").str("data" if wrap == "pstate-data" else "real")
            _simple(p, other)
            p.op(b"s")
        elif wrap == "pstate-attr":
            p.op(b"}").str("tensor_model_parallel").bool(True).op(b"s")
        elif wrap == "pstate-slots":
            p.op(b"}").op(b"}").str("partition_dim").int(0).op(b"s").tuple(2)
        p.tuple().reduce()


def emit(p: P, spec, memo: list[int]) -> None:
    kind = spec[0]
    if kind == "ref":
        if not memo:
            p.none()
            return
        p.get(memo[spec[1] % len(memo)])
        return
    if kind == "none":
        p.none()
    elif kind == "bool":
        p.bool(spec[1])
    elif kind == "int":
        p.int(spec[1])
    elif kind == "float":
        p.float(spec[1])
    elif kind == "str":
        p.str(spec[1])
    elif kind == "bytes":
        p.glob("_codecs", "encode").str(spec[1]).str("latin1").tuple(2).reduce()
    elif kind == "dtype":
        p.glob("torch", spec[1])
    elif kind == "device":
        p.glob("torch", "device").str(spec[1])
        p.tuple(1) if spec[2] is None else p.int(spec[2]).tuple(2)
        p.reduce()
    elif kind == "complex":
        p.glob(spec[1], "complex").float(spec[2]).float(spec[3]).tuple(2).reduce()
    elif kind == "set":
        p.glob(spec[1], spec[2]).op(b"]").mark()
        for v in spec[3]:
            p.int(v)
        p.op(b"e").tuple(1).reduce()
    elif kind == "tensor":
        _tensor(p, spec)
    elif kind in ("list", "tuple"):
        p.op(b"]" if kind == "list" else b"").mark()
        for k in spec[1]:
            emit(p, k, memo)
        p.op(b"e" if kind == "list" else b"t")
    else:
        p.op(b"}") if kind == "dict" else p.glob("collections", "OrderedDict").tuple(0).reduce()
        p.mark()
        for k, v in spec[1].items():
            p.str(k)
            emit(p, v, memo)
        p.op(b"u")
    memo.append(p.put())


def _blobs() -> dict[str, bytes]:
    return {k: bytes((i * 7 + int(k) * 3) % 61 for i in range(BLOB)) for k in KEYS}  # finite in every dtype


def materialize(x, header, done=None):
    """merger's tree with each tensor read from its extents (as the merge reads model tensors)."""
    done = {} if done is None else done
    if id(x) in done:
        return done[id(x)]
    if isinstance(x, TensorRef):
        info = tensor_extents(header, {"t": x}, ["t"], header.path)["t"]
        buf = bytearray(info.nbytes)
        with open(header.path, "rb") as f:
            for e in info.extents:
                f.seek(e.offset)
                buf[e.start: e.start + e.nbytes] = f.read(e.nbytes)
        out = torch.frombuffer(buf, dtype=dtype_from_name(info.dtype)) if buf else torch.empty(
            0, dtype=dtype_from_name(info.dtype))
        out = out.reshape(info.shape)
    elif isinstance(x, StorageRef):
        raise CheckpointFormatError("a bare storage", path=header.path)
    elif isinstance(x, dict):
        out = {k: materialize(v, header, done) for k, v in x.items()}
    elif isinstance(x, (list, tuple, set, frozenset)):
        out = type(x)(materialize(v, header, done) for v in x)
    else:
        out = x
    done[id(x)] = out
    return out


def same(want, got) -> bool:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or want.dtype != got.dtype or want.shape != got.shape:
            return False
        w = want.resolve_neg().resolve_conj().contiguous().flatten()
        return torch.equal(w.view(torch.uint8) if w.numel() else w, got.contiguous().flatten().view(torch.uint8)
                           if got.numel() else got.flatten())
    if isinstance(want, torch.dtype):
        return isinstance(got, TorchDType) and got == str(want)
    if isinstance(want, torch.device):
        return isinstance(got, TorchDevice) and got == str(want)
    if isinstance(want, dict):
        return isinstance(got, dict) and list(want) == list(got) and all(same(want[k], got[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return (type(got) is (list if isinstance(want, list) else tuple) and len(want) == len(got)
                and all(same(a, b) for a, b in zip(want, got)))
    return type(want) is type(got) and want == got


def check(tmp_path, pkl: bytes, *, trailing: bytes = b""):
    """The outcome of one file: 'same', 'both refuse', 'merger refuses' or 'torch refuses'."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(torch_zip(pkl, _blobs(), trailing=trailing))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal of torch's
        want = err = None
    else:
        err = True
    try:
        header = read_header(path)
        got = materialize(header.tree, header)
    except MergerError as e:
        assert isinstance(e, CheckpointFormatError) and str(path) in str(e), e
        return "both refuse" if err is None else "merger refuses"
    if err is None:
        return "torch refuses"
    assert header.complete
    assert same(want, got), f"merger reads other values than torch:\n{want!r}\n{got!r}"
    return "same"


@pytest.mark.fuzz
@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(top=st.dictionaries(st.text("xyz", min_size=1, max_size=2), tree, min_size=1, max_size=3))
def test_merger_reads_what_torch_reads(tmp_path_factory, top):
    p = P()
    emit(p, ("dict", top), [])
    OUTCOMES[check(tmp_path_factory.mktemp("diff"), p.dump())] += 1


@pytest.mark.fuzz
def test_refusals_where_torch_reads_stay_few():
    if not OUTCOMES:
        pytest.skip("runs after test_merger_reads_what_torch_reads")
    total = sum(OUTCOMES.values())
    assert OUTCOMES["same"] >= total // 4, OUTCOMES
    assert OUTCOMES["merger refuses"] <= total // 3, OUTCOMES


# -- the constructs the attack run found, one by one -------------------------------------------------------------

def one(build, meta=None, wrap=None, numel=None, key="0", cls="FloatStorage", other=("1", "FloatStorage", 0, [3])):
    p = P()
    p.op(b"}").str("model").op(b"}").str("w")
    _tensor(p, ("tensor", key, cls, numel, 0, [3], None, meta, wrap, build, other))
    p.op(b"s").op(b"s")
    return p.dump()


@pytest.mark.parametrize("case", [dict(meta="neg"), dict(meta="not-neg"), dict(meta="conj"), dict(build="tensor"),
                                  dict(build="storage-dtype"), dict(wrap="pstate-real")])
def test_constructs_merger_cannot_read_as_torch_does_are_refused(tmp_path, case):
    assert check(tmp_path, one(case.pop("build", None), **case)) in ("merger refuses", "both refuse")


@pytest.mark.parametrize("case", [dict(meta="empty"), dict(build="storage-empty"),
                                  dict(wrap="pstate-data"), dict(wrap="pstate-attr"), dict(wrap="pstate-slots"),
                                  dict(wrap="param")])
def test_constructs_torch_reads_read_the_same(tmp_path, case):
    assert check(tmp_path, one(case.pop("build", None), **case)) == "same"


def test_parameter_state_data_replaces_the_values(tmp_path):
    pkl = one(None, wrap="pstate-data", other=("1", "HalfStorage", 2, [2, 2]))
    assert check(tmp_path, pkl) == "same"
    w = read_header(tmp_path / "ckpt.pt").tree["model"]["w"]
    assert (w.storage.key, w.storage.dtype, w.shape, w.storage_offset) == ("1", "float16", (2, 2), 2)


def test_one_key_with_two_storage_types_takes_the_first(tmp_path):
    p = P()
    p.op(b"}").mark()
    for name, cls in (("a", "FloatStorage"), ("b", "HalfStorage")):
        p.str(name)
        _simple(p, ("0", cls, 0, [2]))
    p.op(b"u")
    assert check(tmp_path, p.dump()) == "same"
    tree = read_header(tmp_path / "ckpt.pt").tree
    assert tree["a"].storage.dtype == tree["b"].storage.dtype == "float32"


@pytest.mark.parametrize("extra", [0, 1000, 7600, 65000, 69000, 69584 - 22, 69584 - 21, 75000])
def test_the_end_record_is_found_where_miniz_finds_it(tmp_path, extra):
    """Bytes after the end record: wherever torch (miniz) finds the end record, merger reads the
    same directory (up to 69584 bytes back from the end); past that window neither finds it."""
    p = P()
    p.op(b"}").str("w")
    _simple(p, ("0", "FloatStorage", 0, [3]))
    p.op(b"s")
    got = check(tmp_path, p.dump(), trailing=b"\0" * extra)
    header = read_header(tmp_path / "ckpt.pt")
    assert header.complete == (extra + 22 <= 69584)
    if extra in (0, 1000, 7600, 65000, 69000):  # where this torch reads it (it also refuses some offsets between)
        assert got == "same"
    if not header.complete:
        assert got == "torch refuses"
