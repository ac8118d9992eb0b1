"""The restricted unpickling machine under every pickle merger reads (a torch zip's ``data.pkl``,
a DCP chunk record, DCP's ``.metadata``): Python's own pure-Python unpickler, narrowed.

- Its memo is a dict: an index near 2**28 costs one entry (CPython's C unpickler allocates a memo
  array up to the largest index it is given: a 700-byte pickle then takes gigabytes).
- Only the opcodes a subclass lists run (``TORCH_OPCODES``: the set ``torch.load(weights_only=True)``
  runs); any other is refused as torch refuses it.
- APPEND only into lists, SETITEM only into dicts, BUILD and NEWOBJ only where a subclass allows
  them (:meth:`SafeUnpickler.build`, :attr:`SafeUnpickler.NEW`): torch's rules, never a ``__setstate__``.
- Every value a callable makes is charged to a budget relative to the pickle's size
  (:meth:`SafeUnpickler.charge`), so chained calls can't amplify a small file into gigabytes; a
  tuple nested deeper than :data:`MAX_DEPTH` is refused as it is built (hashing one crashes
  CPython), and so is any tree nested deeper, or referring to itself (:func:`check_depth`).

Every refusal is a ``pickle.UnpicklingError`` or the subclass's own ``CheckpointFormatError``.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from collections import Counter, OrderedDict

MAX_DEPTH = 100  # containers inside containers: a checkpoint nests a few levels; Python recurses on each

_OPS = pickle  # opcode constants
TORCH_OPCODES = frozenset(op[0] for op in (
    _OPS.APPEND, _OPS.APPENDS, _OPS.BINFLOAT, _OPS.BINGET, _OPS.BININT, _OPS.BININT1, _OPS.BININT2,
    _OPS.BINPERSID, _OPS.BINPUT, _OPS.BINUNICODE, _OPS.BUILD, _OPS.EMPTY_DICT, _OPS.EMPTY_LIST,
    _OPS.EMPTY_SET, _OPS.EMPTY_TUPLE, _OPS.GLOBAL, _OPS.LONG1, _OPS.LONG_BINGET, _OPS.LONG_BINPUT,
    _OPS.MARK, _OPS.NEWFALSE, _OPS.NEWOBJ, _OPS.NEWTRUE, _OPS.NONE, _OPS.PROTO, _OPS.REDUCE, _OPS.SETITEM,
    _OPS.SETITEMS, _OPS.SHORT_BINSTRING, _OPS.STOP, _OPS.TUPLE, _OPS.TUPLE1, _OPS.TUPLE2, _OPS.TUPLE3))
# what a plain pickle.dump (protocol 4/5) of plain records uses, beyond torch's set
WIDE_OPCODES = TORCH_OPCODES | frozenset(op[0] for op in (
    _OPS.FRAME, _OPS.MEMOIZE, _OPS.SHORT_BINUNICODE, _OPS.BINUNICODE8, _OPS.STACK_GLOBAL, _OPS.ADDITEMS,
    _OPS.FROZENSET, _OPS.SHORT_BINBYTES, _OPS.BINBYTES, _OPS.BINBYTES8, _OPS.BYTEARRAY8,
    _OPS.LONG4, _OPS.POP, _OPS.POP_MARK, _OPS.DUP, _OPS.BINSTRING, _OPS.EMPTY_SET))

_DICTS = (dict, OrderedDict, Counter)


def _refuse(op: int):
    def load(self):
        raise pickle.UnpicklingError(f"opcode {bytes([op])!r} is not one torch.load(weights_only=True) runs")
    return load


class SafeUnpickler(pickle._Unpickler):
    """The narrowed machine; subclasses say which globals resolve (``find_class``) and what BUILD does.

    Args:
        file: the pickle.
        path: where errors say they are.
        size: the pickle's bytes (the budget for what callables make is a few times this).
    """

    OPCODES: frozenset[int] = TORCH_OPCODES
    NEW: tuple[type, ...] = (OrderedDict, Counter)  # the classes NEWOBJ makes (empty, as cls.__new__ does)
    DICTS: tuple[type, ...] = _DICTS  # what SETITEM(S) may fill

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        base = pickle._Unpickler.dispatch
        table = {op: (base[op] if op in cls.OPCODES and op in base else _refuse(op)) for op in range(256)}
        table.update({op: f for op, f in ((_OPS.BUILD[0], cls._load_build), (_OPS.NEWOBJ[0], cls._load_newobj),
                                          (_OPS.REDUCE[0], cls._load_reduce), (_OPS.APPEND[0], cls._load_append),
                                          (_OPS.APPENDS[0], cls._load_appends), (_OPS.SETITEM[0], cls._load_setitem),
                                          (_OPS.SETITEMS[0], cls._load_setitems), (_OPS.TUPLE[0], cls._load_tuple),
                                          (_OPS.TUPLE1[0], cls._load_tuple1), (_OPS.TUPLE2[0], cls._load_tuple2),
                                          (_OPS.TUPLE3[0], cls._load_tuple3), (_OPS.BINPERSID[0], cls._load_persid))
                      if op in cls.OPCODES})
        cls.dispatch = table

    def __init__(self, file, path, *, size: int | None = None):
        super().__init__(file, encoding="utf-8")  # torch.load's encoding for SHORT_BINSTRING
        self.path = path
        self.budget = 4 * max(size if size is not None else 0, 1 << 16)
        self._tuples: dict[int, tuple[tuple, int]] = {}  # id -> (tuple, nesting): kept alive while loading

    # -- globals: torch maps Python 2 names for every protocol
    def find_class(self, module, name):  # pragma: no cover - every subclass defines its own
        raise pickle.UnpicklingError(f"global {module}.{name}")

    @staticmethod
    def py3_name(module: str, name: str) -> tuple[str, str]:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            return _compat_pickle.NAME_MAPPING[(module, name)]
        return _compat_pickle.IMPORT_MAPPING.get(module, module), name

    # -- the budget
    def charge(self, value):
        """Charge ``value``'s length to the budget (what a callable made); returns ``value``."""
        try:
            n = len(value)
        except TypeError:
            n = 1
        self.budget -= n + 1
        if self.budget < 0:
            raise pickle.UnpicklingError("its values grow far past the pickle's own size (a pickle built to "
                                         "exhaust memory)")
        return value

    # -- opcodes, with torch's rules
    def _load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not isinstance(args, tuple):
            raise pickle.UnpicklingError("REDUCE arguments are not a tuple")
        if not getattr(func, "_pickle_callable", False) and func not in self.CALLABLES:
            raise pickle.UnpicklingError(f"REDUCE calls {type(func).__name__} {str(func)[:60]!r}, which is no "
                                         "allowed function")
        self.stack[-1] = self.charge(func(*args))

    CALLABLES: frozenset = frozenset()  # plain classes REDUCE may call besides marked functions

    def _load_newobj(self):
        self.stack.pop()  # the arguments: cls.__new__ of these classes ignores them
        cls = self.stack.pop()
        if not (isinstance(cls, type) and cls in self.NEW):
            raise pickle.UnpicklingError(f"NEWOBJ of {cls!r:.60}: merger makes no object of that kind")
        self.append(cls())

    def _load_build(self):
        state = self.stack.pop()
        self.build(self.stack[-1], state)

    def build(self, inst, state) -> None:
        """BUILD: torch only sets attributes of an OrderedDict or Counter (no value changes)."""
        if type(inst) in (OrderedDict, Counter) and isinstance(state, dict):
            return
        raise pickle.UnpicklingError(f"BUILD on {type(inst).__name__}: torch.load changes or refuses it")

    def _load_append(self):
        item = self.stack.pop()
        if type(self.stack[-1]) is not list:
            raise pickle.UnpicklingError(f"APPEND to {type(self.stack[-1]).__name__}, not a list")
        self.stack[-1].append(item)

    def _load_appends(self):
        items = self.pop_mark()
        if type(self.stack[-1]) is not list:
            raise pickle.UnpicklingError(f"APPENDS to {type(self.stack[-1]).__name__}, not a list")
        self.stack[-1].extend(items)

    def _set(self, target, k, v):
        if type(target) not in self.DICTS:
            raise pickle.UnpicklingError(f"SETITEM into {type(target).__name__}, not a dict")
        target[k] = v

    def _load_setitem(self):
        v, k = self.stack.pop(), self.stack.pop()
        self._set(self.stack[-1], k, v)

    def _load_setitems(self):
        items = self.pop_mark()
        for i in range(0, len(items) - 1, 2):
            self._set(self.stack[-1], items[i], items[i + 1])
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with a key and no value")

    def tuple_(self, items) -> tuple:
        """A new tuple, refused when nested deeper than :data:`MAX_DEPTH` (its hash would recurse)."""
        t = tuple(items)
        depth = 1 + max((self._tuples[id(x)][1] for x in t if type(x) is tuple and id(x) in self._tuples),
                        default=0)
        if depth > MAX_DEPTH:
            raise pickle.UnpicklingError(f"tuples nested more than {MAX_DEPTH} deep")
        if depth > 1:
            self._tuples[id(t)] = (t, depth)
        elif t:
            self._tuples[id(t)] = (t, 1)
        return t

    def _load_tuple(self):
        t = self.tuple_(self.pop_mark())  # pop_mark first: it rebinds self.append
        self.append(t)

    def _load_tuple1(self):
        self.stack[-1] = self.tuple_(self.stack[-1:])

    def _load_tuple2(self):
        self.stack[-2:] = [self.tuple_(self.stack[-2:])]

    def _load_tuple3(self):
        self.stack[-3:] = [self.tuple_(self.stack[-3:])]

    def _load_persid(self):
        pid = self.stack.pop()
        self.append(self.persistent_load(pid))


def _children(x):
    if isinstance(x, dict):
        return [*x.keys(), *x.values()]
    if isinstance(x, (list, tuple, set, frozenset)):
        return x
    return None


def check_depth(root, limit: int = MAX_DEPTH) -> None:
    """Refuse a tree nested deeper than ``limit`` containers, or one that contains itself (every later
    walk of it, and torch.save of what is carried, recurses once per level). Shared subtrees count once.

    Raises:
        pickle.UnpicklingError: too deep, or a cycle.
    """
    height: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        x, done = stack.pop()
        kids = _children(x)
        if kids is None:
            continue
        i = id(x)
        if done:
            h = 1 + max((height.get(id(k), 0) for k in kids), default=0)
            open_.discard(i)
            height[i] = h
            if h > limit:
                raise pickle.UnpicklingError(f"its values are nested more than {limit} containers deep")
            continue
        if i in height:
            continue
        if i in open_:
            raise pickle.UnpicklingError("a container that contains itself")
        open_.add(i)
        stack.append((x, True))
        stack.extend((k, False) for k in kids if _children(k) is not None and id(k) not in height)
