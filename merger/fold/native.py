"""The native CPU kernel (``_fold.c``) through ctypes, and its state across a run.

One call reads one slice of one tensor from every input (``pread`` into per-thread buffers that
stay in the CPU caches) and writes the merged bytes: no ``import torch``, no input buffers in Python, and
the GIL is released for the call, so pipeline threads fold slices in parallel. The bits are the
torch kernel's (``torch_kernel.py``), which the tests check for every dtype pair and weighting.

A tensor whose inputs differ in dtype (``TensorPlan.in_dtypes``) is folded by the torch kernel,
from the same fd's (:meth:`NativeKernel._fold_mixed`): the C job has one input dtype, and such
tensors are rare (a run whose last step was saved in bf16); the common case stays native.

The library is built with the package (``setup.py``, optional: a machine without a C compiler
gets the torch kernel). :func:`unavailable` says why it can't be used, or None;
``MERGER_KERNEL=torch`` in the environment turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from functools import lru_cache
from pathlib import Path

from merger.errors import MergerError
from merger.fold.rules import FoldRule, acc_dtype, differing_error, nonfinite_error, overflow_error
from merger.formats import clip
from merger.formats.reading import truncated_error
from merger.plan.plan import TensorPlan
from merger.units import SIZES

ABI_VERSION = 3
CODES = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
RAW = 4  # not floating: identical in every input, copied
ST_OK, ST_NONFINITE, ST_OVERFLOW, ST_READ, ST_EOF, ST_DIFFERS, ST_NOMEM = range(7)
FIN_NONE, FIN_DIVIDE, FIN_SCALE = range(3)


class Job(ctypes.Structure):
    """``merger_job`` in ``_fold.c``."""

    _fields_ = [
        ("n", ctypes.c_int32), ("in_dtype", ctypes.c_int32), ("out_dtype", ctypes.c_int32),
        ("acc_dtype", ctypes.c_int32), ("itemsize", ctypes.c_int32), ("copy_identical", ctypes.c_int32),
        ("allow_nonfinite", ctypes.c_int32), ("finish", ctypes.c_int32), ("finish_value", ctypes.c_double),
        ("ext_first", ctypes.POINTER(ctypes.c_int32)), ("ext_fd", ctypes.POINTER(ctypes.c_int32)),
        ("ext_off", ctypes.POINTER(ctypes.c_int64)), ("ext_end", ctypes.POINTER(ctypes.c_int64)),
        ("weights", ctypes.POINTER(ctypes.c_double)),
        ("count", ctypes.c_int64), ("chunk", ctypes.c_int64), ("sub", ctypes.c_int64),
        ("out", ctypes.c_void_p), ("same_as_prev", ctypes.POINTER(ctypes.c_uint8)),
        ("differs", ctypes.POINTER(ctypes.c_uint8)),
        ("status", ctypes.c_int32), ("all_copied", ctypes.c_int32), ("err_input", ctypes.c_int32),
        ("err_extent", ctypes.c_int32), ("err_errno", ctypes.c_int32), ("err_element", ctypes.c_int64),
    ]


def library_path() -> Path | None:
    """The built ``_fold`` library next to this file, if any."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        p = here / f"_fold{suffix}"
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = library_path()
    if path is None:
        return None, "merger/_fold was not built (no C compiler at install?): reinstall with one"
    try:
        lib = ctypes.CDLL(str(path))  # CDLL: calls release the GIL
    except OSError as e:
        return None, f"can't load {path.name}: {e}"
    if lib.merger_abi_version() != ABI_VERSION:
        return None, f"{path.name} is from another merger version: reinstall merger"
    if not lib.merger_supported():
        return None, "this CPU (or build) has no AVX2/FMA/F16C"
    lib.merger_fold.argtypes = [ctypes.POINTER(Job)]
    lib.merger_fold.restype = ctypes.c_int
    return lib, None


def unavailable() -> str | None:
    """Why the native kernel can't run here, or None when it can."""
    if os.environ.get("MERGER_KERNEL", "").lower() == "torch":
        return "MERGER_KERNEL=torch"
    return _load()[1]


def sub_elements(n_inputs: int, itemsize: int) -> int:
    """Elements folded at a time: every input's share fits ``SIZES.cache_bytes`` (a power of two)."""
    per = max(SIZES.min_sub, SIZES.cache_bytes // (n_inputs * itemsize))
    return min(SIZES.chunk, 1 << (per.bit_length() - 1))


class NativeKernel:
    """Folds slices with ``_fold.c``; the same state and errors as :class:`merger.fold.torch_kernel.Kernel`.

    Thread-safe for :meth:`fold` calls on different output ranges: each call works on its own
    copies of the state and :meth:`merge` folds them in, in slice order.
    """

    def __init__(self, weights: list[float], names: list[str], *, accumulate: str = "auto",
                 allow_nonfinite: bool = False):
        lib, why = _load()
        if lib is None:
            raise MergerError(f"the native kernel is not available: {why}", hint="set MERGER_KERNEL=torch")
        self.lib = lib
        self.rule = FoldRule.of(weights)
        self.names = list(names)
        self.n = len(names)
        self.accumulate = accumulate
        self.allow_nonfinite = allow_nonfinite
        self.same_as_prev = [False] + [True] * (self.n - 1)
        self.copied: dict[str, bool] = {}
        self._given = [float(w) for w in weights]  # for the torch kernel of mixed-dtype tensors
        self._weights = (ctypes.c_double * self.n)(*self.rule.weights)
        fin = FIN_DIVIDE if self.rule.divide is not None else FIN_SCALE if self.rule.scale is not None else FIN_NONE
        self._finish = fin, float(self.rule.divide or self.rule.scale or 0.0)

    def duplicates(self) -> list[tuple[str, str]]:
        """Pairs (older, newer) of consecutive inputs whose tensors were bit-identical."""
        return [(self.names[i - 1], self.names[i]) for i, s in enumerate(self.same_as_prev) if s]

    def fold(self, t: TensorPlan, start: int, stop: int, fds: dict[str, int], out_address: int) -> Job:
        """Merge elements ``start:stop`` of ``t`` (``start`` a multiple of ``SIZES.chunk``) into memory at
        ``out_address``, reading each input's extents from ``fds`` (path -> open fd); returns the
        finished job for :meth:`merge`."""
        if t.in_dtypes:
            return self._fold_mixed(t, start, stop, fds, out_address)
        n = self.n
        job = Job()
        job.n = n
        if t.averaged:
            job.in_dtype, job.out_dtype = CODES[t.dtype], CODES[t.out_dtype]
            job.acc_dtype = CODES[acc_dtype(self.accumulate, t.itemsize, t.out_itemsize)]
        else:
            job.in_dtype = job.out_dtype = RAW
        job.itemsize = t.itemsize
        job.copy_identical = int(self.rule.copy_identical)
        job.allow_nonfinite = int(self.allow_nonfinite)
        job.finish, job.finish_value = self._finish
        isz = t.itemsize
        first, fd, off, end, paths = [0], [], [], [], []
        for ext in t.locs:  # each input's extents of this slice: one, but for chunked formats (DCP)
            for e in clip(ext, start * isz, stop * isz):
                fd.append(fds[e.path])
                off.append(e.offset)
                end.append((e.start + e.nbytes) // isz)
                paths.append(e.path)
            first.append(len(fd))
        job.ext_first = (ctypes.c_int32 * (n + 1))(*first)
        job.ext_fd = (ctypes.c_int32 * len(fd))(*fd)
        job.ext_off = (ctypes.c_int64 * len(off))(*off)
        job.ext_end = (ctypes.c_int64 * len(end))(*end)
        job.paths = paths  # for error messages (a Python attribute, not a field)
        job.weights = self._weights
        job.count, job.chunk, job.sub = stop - start, SIZES.chunk, sub_elements(n, t.itemsize)
        job.out = out_address
        job.same_as_prev = (ctypes.c_uint8 * n)(*self.same_as_prev)
        job.differs = (ctypes.c_uint8 * n)()
        self.lib.merger_fold(ctypes.byref(job))
        return job

    def _fold_mixed(self, t: TensorPlan, start: int, stop: int, fds: dict[str, int], out_address: int) -> Job:
        """A tensor whose inputs differ in dtype, through the torch kernel (a fresh one per call: its
        scratch buffers aren't shared between threads); its errors are raised here, in slice order
        too (the pipeline takes the calls' results in order)."""
        import torch

        from merger.fold.torch_kernel import Kernel
        from merger.formats.reading import read_extents

        xs = []
        for i, ext in enumerate(t.locs):
            isz = t.input_itemsize(i)
            buf = torch.empty((stop - start) * isz, dtype=torch.uint8)
            read_extents(fds, ext, start * isz, memoryview(buf.numpy()))
            xs.append(buf)
        nbytes = (stop - start) * t.out_itemsize
        out = torch.frombuffer((ctypes.c_char * nbytes).from_address(out_address), dtype=torch.uint8) \
            if nbytes else torch.empty(0, dtype=torch.uint8)
        k = Kernel(self._given, self.names, accumulate=self.accumulate, allow_nonfinite=self.allow_nonfinite)
        k.same_as_prev = list(self.same_as_prev)
        k.fold(t, xs, out)
        job = Job()
        job.status, job.all_copied = ST_OK, 0
        job.same_as_prev = (ctypes.c_uint8 * self.n)(*k.same_as_prev)
        return job

    def merge(self, t: TensorPlan, job: Job) -> None:
        """Take a finished job's state in, or raise its error (in slice order: call in that order)."""
        st = job.status
        if st == ST_OK:
            for i in range(1, self.n):
                self.same_as_prev[i] = self.same_as_prev[i] and bool(job.same_as_prev[i])
            self.copied[t.name] = self.copied.get(t.name, True) and bool(job.all_copied)
            return
        if st == ST_NONFINITE:
            raise nonfinite_error(t.name, self.names[job.err_input])
        if st == ST_OVERFLOW:
            raise overflow_error(t.name, t.out_dtype)
        if st == ST_DIFFERS:
            raise differing_error(t.name, t.dtype, self.names[0],
                                  [self.names[i] for i in range(1, self.n) if job.differs[i]])
        path = job.paths[job.err_extent] if job.err_extent >= 0 else "an input"
        if st == ST_EOF:
            raise truncated_error(path, job.err_element)
        if st == ST_READ:
            raise OSError(job.err_errno, os.strerror(job.err_errno), path)
        raise MemoryError("the native kernel could not allocate its buffers")
