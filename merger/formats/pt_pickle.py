"""A ``torch.save`` pickle read as ``torch.load(weights_only=True)`` reads it, into inert records.

The grammar is torch's (torch's ``torch._weights_only_unpickler`` module): its opcodes, its container rules
(``pickle_machine``), Python 2 names mapped as torch maps them (``__builtin__.set`` is ``set``),
and of its globals those whose values merger can read the same:

- ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`` becomes a
  :class:`TensorRef`; a ``neg``/``conj`` bit in ``metadata`` (a negative view: ``x.conj().imag``,
  ``torch._neg_view``) is kept as ``TensorRef.view``, and a model tensor with one is refused
  (``pt_header.tensor_extents``): its stored bytes are not its values;
- ``_rebuild_parameter`` is its tensor; ``_rebuild_parameter_with_state`` applies ``state`` as
  torch's ``_set_obj_state`` does: ``data`` replaces the tensor, ``real``/``imag`` (which write
  into it) are refused, any other attribute is inert;
- a storage ``("storage", <Storage class>, key, location, numel)`` is a :class:`StorageRef`; a key
  seen before is the first record again (torch caches the first, whatever the later type says);
- BUILD on a storage with an empty state is nothing (torch keeps it); on a tensor, or with any
  state that sets a storage's attributes, it is refused; on an OrderedDict it sets attributes only;
- ``_codecs.encode`` only as protocol 2 writes bytes (``latin1``; text codecs), ``bytearray`` only
  of bytes or text, ``torch.Size`` only of ints: no call makes much more than its input.

:class:`TreeUnpickler` adds the plain values a training checkpoint carries (dtypes and devices as
:class:`TorchDType` / :class:`TorchDevice`, ``str`` subclasses that ``pt_header.to_plain`` turns back
into torch objects, ``set``, ``frozenset``, ``complex``, ``slice``, Lightning's ``AttributeDict``).
Every other global is refused: no class is imported and no code runs.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections import Counter, OrderedDict
from dataclasses import dataclass

from merger.formats.base import RESAVE, fail
from merger.formats.pickle_machine import SafeUnpickler, check_depth
from merger.units import itemsize

RESAVE_PLAIN = ("re-save it with plain values, e.g. torch.save({'model': model.state_dict(), "
                "'model_args': dict(...), 'iter_num': step}, path), or save model.state_dict() alone")
_TORCH_DTYPES = ("float16", "float32", "float64", "bfloat16", "half", "float", "double", "int8", "int16",
                 "int32", "int64", "uint8", "bool", "long", "int", "short", "complex64", "complex128", "cfloat",
                 "cdouble", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2")

STORAGE_DTYPES = {  # torch's storage classes (as the pickle names them) -> canonical dtype names
    "HalfStorage": "float16", "FloatStorage": "float32", "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16", "ByteStorage": "uint8", "CharStorage": "int8",
    "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64",
    "BoolStorage": "bool",
}
_TEXT_CODECS = frozenset(codecs.lookup(c).name for c in ("latin1", "utf-8", "ascii"))


@dataclass(frozen=True)
class _StorageType:
    dtype: str


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    view: str = ""  # "neg" / "conj": torch reads the stored values negated or conjugated


class TorchDType(str):
    """A ``torch.<dtype>`` global in a carried value: equal to ``"torch.<name>"``, saved back as the dtype."""


class TorchDevice(str):
    """A ``torch.device(...)`` in a carried value: equal to ``"cuda:0"``, saved back as the device."""


class _PlainDict(dict):
    """A dict that accepts attributes (Lightning's ``AttributeDict`` and friends land here)."""


def _callable(f):
    f._pickle_callable = True
    return f


def _count(x) -> bool:
    """A non-negative int (not a bool, float or anything else a crafted pickle could hold)."""
    return type(x) is int and x >= 0


def _tensor(storage, storage_offset, size, stride, view: str = "") -> TensorRef:
    if not (_count(storage_offset) and isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
            and all(_count(d) for d in size) and all(_count(s) for s in stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError(f"a tensor record with offset {storage_offset!r:.40}, shape {size!r:.80} "
                                     f"and stride {stride!r:.80} (negative, non-integer or mismatched)")
    return TensorRef(storage, storage_offset, tuple(size), tuple(stride), view)


@_callable
def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    view = ""
    if metadata:  # torch: set_tensor_metadata(tensor, metadata) when truthy
        if not isinstance(metadata, dict):
            raise pickle.UnpicklingError(f"a tensor record whose metadata is {type(metadata).__name__}")
        if "conj" in metadata:  # torch sets the bit for the key, whatever its value says
            view = "conj"
        elif "neg" in metadata:
            view = "neg"
    return _tensor(storage, storage_offset, size, stride, view)


@_callable
def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, TensorRef):
        raise pickle.UnpicklingError(f"a parameter record over {type(data).__name__}, not a tensor")
    return data


@_callable
def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    """torch: ``Parameter(data)``, then ``setattr(param, k, v)`` for each item of ``state`` (a dict, or
    a (dict, slots dict) pair): ``data`` replaces the values."""
    out = _rebuild_parameter(data, requires_grad, backward_hooks)
    if isinstance(state, tuple):
        if len(state) != 2:
            raise pickle.UnpicklingError("a parameter record with a malformed state")
        parts = state
    else:
        parts = (state,)
    for part in parts:
        if not part:
            continue
        if not isinstance(part, dict):
            raise pickle.UnpicklingError(f"a parameter record whose state is {type(part).__name__}")
        for k, v in part.items():
            if k == "data":
                if not isinstance(v, TensorRef):
                    raise pickle.UnpicklingError("a parameter record whose state sets data to a non-tensor")
                out = v
            elif k in ("real", "imag", "__class__"):  # setters that write values, or change what it is
                raise pickle.UnpicklingError(f"a parameter record whose state sets {k!r}")
    return out


@_callable
def _encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as protocol 2 pickles bytes: a str in a text codec (no codec grows it much)."""
    if not (type(obj) is str and type(encoding) is str and type(errors) is str
            and codecs.lookup(encoding).name in _TEXT_CODECS):
        raise pickle.UnpicklingError(f"_codecs.encode of {type(obj).__name__} with {str(encoding)[:20]!r}: merger "
                                     "reads only bytes as pickle writes them (latin1)")
    return codecs.encode(obj, encoding, errors)


@_callable
def _bytearray(*args):
    if not args or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))) or (
            len(args) in (2, 3) and type(args[0]) is str):
        return bytearray(*args)
    raise pickle.UnpicklingError("bytearray of something other than bytes or text")


@_callable
def _size(dims=()):
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else None
    if dims is None or not all(type(d) is int for d in dims):
        raise pickle.UnpicklingError("torch.Size of something other than ints")
    return dims


@_callable
def _device(*args):
    if not (1 <= len(args) <= 2 and all(type(a) in (str, int) for a in args)) or len(str(args[0])) > 64:
        raise pickle.UnpicklingError(f"torch.device{args!r:.60}")
    return TorchDevice(":".join(map(str, args)))


@_callable
def _set(items=()):
    return set(items)


@_callable
def _frozenset(items=()):
    return frozenset(items)


@_callable
def _complex(*args):
    if not all(type(a) in (int, float, str) for a in args) or any(type(a) is str and len(a) > 64 for a in args):
        raise pickle.UnpicklingError("complex of something other than numbers")
    return complex(*args)


@_callable
def _slice(*args):
    return slice(*args)


@_callable
def _ordered_dict(*args):
    return OrderedDict(*args)


@_callable
def _counter(*args):
    return Counter(*args)


class StateDictUnpickler(SafeUnpickler):
    """Resolves only the globals a state dict needs; everything else is refused. Every tensor here is
    read: a negative or conjugate view is refused as it is read."""

    _GLOBALS = {
        ("collections", "OrderedDict"): _ordered_dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, path, *, size: int | None = None):
        super().__init__(file, path, size=size)
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module, name):
        given = f"{module}.{name}"  # as the pickle spells it, for the error
        module, name = self.py3_name(module, name)
        found = self._GLOBALS.get((module, name))
        if found is not None:
            return found
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch.storage" and name == "UntypedStorage":
            return _StorageType("uint8")  # torch reads an untyped storage as bytes
        raise fail(self.path, f"holds a non-tensor object ({given}); merger never unpickles "
                               "arbitrary objects", "save a plain state dict, or convert it to safetensors")

    def _load_reduce(self):
        super()._load_reduce()
        t = self.stack[-1]
        if isinstance(t, TensorRef) and t.view and type(self) is StateDictUnpickler:
            raise fail(self.path, f"holds a {'negative' if t.view == 'neg' else 'conjugate'} view (torch reads its "
                                  "stored values negated): merger reads stored bytes only",
                       "save resolved tensors: {k: v.resolve_neg().resolve_conj() for k, v in sd.items()}")

    def persistent_load(self, pid):
        # torch: ("storage", storage type, key, location, numel), the type a storage class
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], _StorageType) and type(pid[2]) in (str, int) and _count(pid[4])):
            raise fail(self.path, f"malformed storage record in data.pkl: {pid!r:.80}", RESAVE)
        key = str(pid[2])
        first = self.storages.get(key)
        if first is not None:  # torch.load reuses the storage it loaded first under this key
            return first
        ref = StorageRef(key, pid[1].dtype, pid[4])
        if ref.numel:  # torch caches a storage with data; an empty one is loaded again by the next record
            self.storages[key] = ref
        return ref

    def build(self, inst, state) -> None:
        if isinstance(inst, StorageRef) and not state:
            return  # torch: nothing to set; the storage stays as loaded
        if isinstance(inst, (StorageRef, TensorRef)):
            raise pickle.UnpicklingError(f"BUILD on a {'storage' if isinstance(inst, StorageRef) else 'tensor'} "
                                         "record (torch.load sets its attributes or refuses it)")
        super().build(inst, state)


_PLAIN_GLOBALS = {
    ("torch", "Size"): _size, ("torch", "device"): _device,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("_codecs", "encode"): _encode,  # bytes, in pickle protocol 2
    ("builtins", "bytearray"): _bytearray,
    ("collections", "Counter"): _counter,
    ("builtins", "set"): _set, ("builtins", "frozenset"): _frozenset,
    ("builtins", "slice"): _slice, ("builtins", "complex"): _complex,
    ("lightning.fabric.utilities.data", "AttributeDict"): _PlainDict,
    ("lightning_fabric.utilities.data", "AttributeDict"): _PlainDict,
    ("pytorch_lightning.utilities.parsing", "AttributeDict"): _PlainDict,
}


class TreeUnpickler(StateDictUnpickler):
    """``torch_zip``'s header unpickler, widened to the plain values a training checkpoint holds."""

    NEW = (OrderedDict, Counter, _PlainDict)
    DICTS = (dict, OrderedDict, Counter, _PlainDict)
    CALLABLES = frozenset({_PlainDict})

    def find_class(self, module, name):
        given = f"{module}.{name}"  # as the pickle spells it, for the error
        module, name = self.py3_name(module, name)
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if module == "torch" and name in _TORCH_DTYPES:
            return TorchDType(f"torch.{name}")  # a dtype in a config: its name, saved back as the dtype
        if module in ("collections", "torch", "torch._utils", "torch.storage"):
            try:
                return super().find_class(module, name)
            except Exception:  # noqa: BLE001 - refused below with our own words
                pass
        raise fail(self.path, f"its pickle needs the class or function {given}; merger reads only "
                              "tensors and plain Python values (it imports no class and runs no code)",
                   RESAVE_PLAIN)

    def build(self, inst, state) -> None:
        if type(inst) is _PlainDict and isinstance(state, dict):
            return  # attributes of an AttributeDict: its items are what it holds
        super().build(inst, state)


def walk(tree):
    """Every node of ``tree``, each shared or repeated subtree once."""
    seen: set[int] = set()
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, (dict, list, tuple, set, frozenset)):
            if id(x) in seen:
                continue
            seen.add(id(x))
            stack.extend(x.values() if isinstance(x, dict) else x)
        yield x


def storages(tree) -> dict[str, int]:
    """Every storage the tree refers to: key -> bytes."""
    return {x.storage.key: x.storage.numel * itemsize(x.storage.dtype) for x in walk(tree)
            if isinstance(x, TensorRef) and isinstance(x.storage, StorageRef)}


def unpickle(data: bytes, path, unpickler: type = None) -> tuple[object, int]:
    """The tree, and how many bytes of ``data`` the pickle used.

    Raises:
        CheckpointFormatError: a global merger doesn't read, a construct torch would read otherwise,
            values that outgrow the pickle, nesting deeper than ``pickle_machine.MAX_DEPTH``, a corrupt pickle.
    """
    buf = io.BytesIO(data)
    try:
        tree = (unpickler or TreeUnpickler)(buf, path, size=len(data)).load()
        check_depth(tree)
    except pickle.UnpicklingError as e:
        raise fail(path, f"corrupt pickle in data.pkl ({e})", RESAVE) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError, OverflowError,
            RecursionError, LookupError) as e:  # what a corrupt or crafted pickle makes the unpickler raise
        raise fail(path, f"corrupt pickle in data.pkl ({type(e).__name__}: {e})", RESAVE) from None
    return tree, buf.tell()
