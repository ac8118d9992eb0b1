"""The native CPU kernel (``_fold.c``) gives the torch kernel's bits, state and errors.

The torch kernel (``merger/fold/torch_kernel.py``) is the definition; here both fold the same inputs, read
from real files at unaligned offsets, for every input/output/accumulation dtype, for equal,
unequal and unnormalised weights, with partial chunks, chunks identical in every input (copied)
and slices cut at chunk boundaries.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import pytest
import torch

from merger.fold import native
from merger.errors import CheckpointFormatError, TensorError
from merger.fold.torch_kernel import Kernel
from merger.formats import Extent
from merger.plan import TensorPlan
from merger.units import SIZES

CHUNK = SIZES.chunk  # the default sizes: this module never changes them

pytestmark = pytest.mark.skipif(native.unavailable() is not None and native.unavailable() != "MERGER_KERNEL=torch",
                                reason=f"native kernel unavailable: {native.unavailable()}")
HEADER = 13  # bytes before the tensor in each file: every read is unaligned

WEIGHTS = {
    "uniform": [1 / 5] * 5,  # LAWA: plain sum, one division
    "ema": [0.1, 0.3, 0.2, 0.25, 0.15],  # unequal, summing to 1: fma per input
    "sum": [1.0] * 5,  # --no-normalize equal weights: plain sum, no copies
    "scaled": [0.5] * 5,  # equal, not averaging: sum then * 0.5
    "unnormalised": [0.5, 1.5, -0.25, 2.0, 0.125],
}


def test_native_kernel_is_built_here():
    """Where CI runs (x86-64 Linux with a C compiler) the package must have built the kernel."""
    if sys.platform != "linux" or platform.machine() != "x86_64" or not shutil.which("cc"):
        pytest.skip("the native kernel is only required on x86-64 Linux with a C compiler")
    lib, why = native._load()
    assert lib is not None, why


def write_inputs(tmp: Path, xs: list[torch.Tensor], cuts: list[list[int]] | None = None
                 ) -> tuple[dict[str, int], list[tuple[Extent, ...]]]:
    """Each input in a file after ``HEADER`` bytes; with ``cuts[i]`` (element indices), input i is
    split into several files at those elements, the pieces written in reverse file order (as a
    chunked format such as DCP stores a tensor), every piece after its own odd-sized header."""
    fds, locs = {}, []
    for i, x in enumerate(xs):
        data = x.contiguous().view(torch.uint8).numpy().tobytes()
        bounds = [0, *(c * x.element_size() for c in (cuts[i] if cuts else [])), len(data)]
        exts = []
        for j, (a, b) in enumerate(zip(bounds, bounds[1:])):
            p = tmp / (f"in{i}.bin" if len(bounds) == 2 else f"in{i}-{j}.bin")
            pad = HEADER + 3 * j
            p.write_bytes(b"h" * pad + data[a:b])
            fds[str(p)] = os.open(p, os.O_RDONLY)
            exts.append(Extent(str(p), pad, a, b - a))
        locs.append(tuple(exts))
    return fds, locs


def raw(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.uint8)


def name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def native_fold(k: native.NativeKernel, t: TensorPlan, fds: dict[str, int], cuts: list[int]) -> torch.Tensor:
    out = torch.full((t.numel * t.out_itemsize,), 0xAB, dtype=torch.uint8)
    for a, b in zip(cuts, cuts[1:]):
        job = k.fold(t, a, b, fds, out.data_ptr() + a * t.out_itemsize)
        k.merge(t, job)
    return out


def make_inputs(dtype: torch.dtype, n_el: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_el, generator=g, dtype=torch.float64) * 3
    xs = [(base + 0.05 * torch.randn(n_el, generator=g, dtype=torch.float64)).to(dtype) for _ in range(5)]
    for x in xs[1:]:  # chunk 1 identical in every input, with an -inf: copied (when weights sum to 1)
        x[CHUNK: 2 * CHUNK] = xs[0][CHUNK: 2 * CHUNK]
    for x in xs:
        x[CHUNK + 7] = float("-inf")
        x[:50] = torch.tensor([6e-8, -6e-8, 1e-5, 65000.0, -0.0] * 10, dtype=torch.float64).to(dtype)  # denormals
    return xs


DTYPES = [(torch.float16, torch.float16, "auto"), (torch.bfloat16, torch.bfloat16, "auto"),
          (torch.float32, torch.float32, "auto"), (torch.float64, torch.float64, "auto"),
          (torch.float16, torch.float32, "auto"), (torch.float32, torch.float16, "auto"),
          (torch.float32, torch.bfloat16, "auto"), (torch.bfloat16, torch.float16, "auto"),
          (torch.float16, torch.float16, "float64"), (torch.bfloat16, torch.bfloat16, "float64"),
          (torch.float32, torch.float32, "float32"), (torch.float64, torch.float16, "float32"),
          (torch.float64, torch.bfloat16, "auto")]


@pytest.mark.parametrize("method", list(WEIGHTS))
@pytest.mark.parametrize("dtype,out_dtype,accumulate", DTYPES,
                         ids=lambda v: name(v) if isinstance(v, torch.dtype) else v)
def test_native_bits_equal_torch_kernel(tmp_path, dtype, out_dtype, accumulate, method):
    n_el = 3 * CHUNK + 1237  # a partial last chunk, not a multiple of 8
    xs = make_inputs(dtype, n_el)
    fds, locs = write_inputs(tmp_path, xs)
    w = WEIGHTS[method]
    names = [f"step{i}" for i in range(5)]
    t = TensorPlan("w", name(dtype), name(out_dtype), (n_el,), True, tuple(locs), 0, 0)
    try:
        ref = torch.empty(n_el * out_dtype.itemsize, dtype=torch.uint8)
        tk = Kernel(w, names, accumulate=accumulate, allow_nonfinite=True)
        tk._fold_cpu(t, [raw(x) for x in xs], ref)
        for cuts in ([0, n_el], [0, 2 * CHUNK, n_el], [0, CHUNK, 2 * CHUNK, 3 * CHUNK, n_el]):
            nk = native.NativeKernel(w, names, accumulate=accumulate, allow_nonfinite=True)
            out = native_fold(nk, t, fds, cuts)
            if not torch.equal(out, ref):
                o, r = out.view(out_dtype), ref.view(out_dtype)
                bad = ((o != r) & ~(o.isnan() & r.isnan())).nonzero()[:5, 0].tolist()
                assert not bad, f"differs at {bad}: native {o[bad].tolist()} torch {r[bad].tolist()}"
            assert nk.copied == tk.copied and nk.same_as_prev == tk.same_as_prev
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.parametrize("dtype,out_dtype,accumulate", DTYPES[:4] + DTYPES[8:9],
                         ids=lambda v: name(v) if isinstance(v, torch.dtype) else v)
def test_native_reads_tensors_split_across_files(tmp_path, dtype, out_dtype, accumulate):
    """A tensor whose bytes lie in several files (one extent per chunk, as DCP stores it), chunked
    differently in every input, cut at and off rule-chunk and read-piece boundaries: the same bits
    as the one-extent torch fold, and the same kernel state."""
    n_el = 3 * CHUNK + 1237
    xs = make_inputs(dtype, n_el, seed=1)
    cuts = [[], [CHUNK], [5, CHUNK + 3, 2 * CHUNK], [n_el // 2], [1, 2, 3 * CHUNK + 1]]
    fds, locs = write_inputs(tmp_path, xs, cuts)
    w, names = WEIGHTS["ema"], [f"step{i}" for i in range(5)]
    t = TensorPlan("w", name(dtype), name(out_dtype), (n_el,), True, tuple(locs), 0, 0)
    try:
        ref = torch.empty(n_el * out_dtype.itemsize, dtype=torch.uint8)
        tk = Kernel(w, names, accumulate=accumulate, allow_nonfinite=True)
        tk._fold_cpu(t, [raw(x) for x in xs], ref)
        for slices in ([0, n_el], [0, CHUNK, 2 * CHUNK, n_el]):
            nk = native.NativeKernel(w, names, accumulate=accumulate, allow_nonfinite=True)
            out = native_fold(nk, t, fds, slices)
            assert torch.equal(out, ref)
            assert nk.copied == tk.copied and nk.same_as_prev == tk.same_as_prev
    finally:
        for fd in fds.values():
            os.close(fd)


def test_native_state_copies_and_duplicates(tmp_path):
    a, b = torch.randn(3000).half(), torch.randn(3000).half()
    fds, locs = write_inputs(tmp_path, [a, a, b])
    t = TensorPlan("w", "float16", "float16", (3000,), True, tuple(locs), 0, 0)
    k = native.NativeKernel([1 / 3] * 3, ["s0", "s1", "s2"])
    native_fold(k, t, fds, [0, 3000])
    assert k.duplicates() == [("s0", "s1")] and k.copied == {"w": False}
    fds2, locs2 = write_inputs(tmp_path, [b, b, b])  # identical everywhere: copied bit for bit
    t2 = TensorPlan("inv_freq", "float16", "float16", (3000,), True, tuple(locs2), 0, 0)
    out = native_fold(k, t2, fds2, [0, 3000])
    assert torch.equal(out, raw(b)) and k.copied["inv_freq"] is True


def test_native_nan_overflow_and_differing_buffers(tmp_path):
    xs = [torch.randn(CHUNK + 5).half() for _ in range(3)]
    xs[2][CHUNK + 2] = float("nan")
    fds, locs = write_inputs(tmp_path, xs)
    t = TensorPlan("w", "float16", "float16", (CHUNK + 5,), True, tuple(locs), 0, 0)
    with pytest.raises(TensorError, match="'w' holds NaN or Inf in step3"):
        native_fold(native.NativeKernel([1 / 3] * 3, ["step1", "step2", "step3"]), t, fds, [0, CHUNK + 5])
    native_fold(native.NativeKernel([1 / 3] * 3, ["step1", "step2", "step3"], allow_nonfinite=True), t, fds,
                [0, CHUNK + 5])

    big = [torch.full((10,), 70000.0), torch.full((10,), 80000.0)]
    fds, locs = write_inputs(tmp_path, big)
    t = TensorPlan("w", "float32", "float16", (10,), True, tuple(locs), 0, 0)
    with pytest.raises(TensorError, match="overflows float16"):
        native_fold(native.NativeKernel([0.5, 0.5], ["a", "b"]), t, fds, [0, 10])

    ints = [torch.arange(100), torch.arange(100), torch.arange(100) + 1]
    fds, locs = write_inputs(tmp_path, ints)
    t = TensorPlan("position_ids", "int64", "int64", (100,), False, tuple(locs), 0, 0)
    with pytest.raises(TensorError, match=r"differs between revisions: a vs c"):
        native_fold(native.NativeKernel([1 / 3] * 3, ["a", "b", "c"]), t, fds, [0, 100])
    fds, locs = write_inputs(tmp_path, ints[:2])
    t = TensorPlan("position_ids", "int64", "int64", (100,), False, tuple(locs), 0, 0)
    k = native.NativeKernel([0.5, 0.5], ["a", "b"])
    assert torch.equal(native_fold(k, t, fds, [0, 100]).view(torch.int64), ints[0]) and k.copied["position_ids"]


def test_native_truncated_input(tmp_path):
    xs = [torch.randn(5000).half() for _ in range(2)]
    fds, locs = write_inputs(tmp_path, xs)
    os.truncate(locs[1][0].path, HEADER + 4000)
    t = TensorPlan("w", "float16", "float16", (5000,), True, tuple(locs), 0, 0)
    with pytest.raises(CheckpointFormatError, match=r"in1.bin: file ended after 4013 bytes"):
        native_fold(native.NativeKernel([0.5, 0.5], ["a", "b"]), t, fds, [0, 5000])


def test_sub_elements_fit_the_cache():
    assert native.sub_elements(9, 2) * 9 * 2 <= SIZES.cache_bytes
    assert native.sub_elements(1, 8) <= CHUNK and CHUNK % native.sub_elements(1, 8) == 0
    assert native.sub_elements(4096, 8) == SIZES.min_sub
    assert ctypes.sizeof(native.Job) == 8 * 4 + 8 + 5 * 8 + 3 * 8 + 3 * 8 + 6 * 4 + 8


# -- through the CLI: the native pipeline is the CPU default, the torch one gives the same bytes --------

def _average(root: Path, out: Path, *extra: str):
    from typer.testing import CliRunner

    from merger.cli import app

    return CliRunner().invoke(app, ["average", str(root), "--revisions", "step1000..step4000", "-o", str(out),
                                    "--max-memory", "8MB", "--max-shard-size", "1MB", *extra])


@pytest.mark.parametrize("method", [[], ["--method", "ema", "--decay", "0.7"], ["--dtype", "float32"]],
                         ids=["uniform", "ema", "to-float32"])
def test_cli_native_and_torch_pipelines_write_the_same_bytes(tmp_path, monkeypatch, method):
    from helpers import WIDE, files_equal, make_run

    root, _ = make_run(tmp_path / "run", shape=WIDE, steps=(1000, 2000, 3000, 4000))
    r = _average(root, tmp_path / "native", *method)
    assert r.exit_code == 0, r.output
    monkeypatch.setenv("MERGER_KERNEL", "torch")
    r = _average(root, tmp_path / "torch", *method)
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "native").glob("model-*.safetensors"))) > 1  # several shards, many blocks
    assert files_equal(tmp_path / "native", tmp_path / "torch")
    kernels = [json.loads((tmp_path / d / "merger.json").read_text())["kernel"] for d in ("native", "torch")]
    assert kernels == ["native", "torch"]


def test_cli_kernel_choice_and_forced_native(tmp_path, monkeypatch):
    from helpers import make_run

    root, _ = make_run(tmp_path / "run", steps=(1000, 2000, 3000, 4000))
    r = _average(root, tmp_path / "plan", "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert (d["kernel"], d["kernel_note"]) == ("native", None) and d["estimated_memory"] > 0
    r = _average(root, tmp_path / "plan", "--dry-run", "--json", "--hash")  # hashing reads through torch
    assert (json.loads(r.stdout)["kernel"], json.loads(r.stdout)["kernel_note"]) == ("torch", "--hash")
    monkeypatch.setenv("MERGER_KERNEL", "native")  # a fallback is then an error, before anything is written
    r = _average(root, tmp_path / "out", "--hash")
    assert r.exit_code == 1 and "MERGER_KERNEL=native, but the native kernel can't run: --hash" in r.output
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# -- ShardWriter.write_owned: whole pages straight from the caller's buffer ------------------------------

@pytest.mark.fuzz
@pytest.mark.parametrize("header_len", [8 + 16, 8 + 4088, 8 + 8000])
def test_write_owned_gives_the_bytes_and_checksum_of_write(tmp_path, header_len, rng):
    import mmap

    from merger.output.crc import file_checksum
    from merger.output.shards import DIRECT_ALIGN, ShardWriter

    header = b"H" * header_len
    pieces = [rng.randbytes(n) for n in (3, 9000, 70000, 4096, 1, 123457, 20000)]
    data = b"".join(pieces)
    a = ShardWriter(tmp_path / "a.safetensors", header, len(data), hash=True)
    b = ShardWriter(tmp_path / "b.safetensors", header, len(data), hash=True)
    buf = mmap.mmap(-1, 1 << 20)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    off, futs, free = 0, [], 0  # buffer bytes before `free` belong to earlier writes (maybe in flight)
    for i, p in enumerate(pieces):
        a.write(p, off)
        # half the pieces at the file position's offset within a page (written in place), half not
        at = free + (header_len + off - free) % DIRECT_ALIGN + (0 if i % 2 == 0 else 8)
        free = at + len(p)
        buf[at: at + len(p)] = p
        futs.append(b.write_owned(memoryview(buf)[at: at + len(p)], off, base + at))
        off += len(p)
    assert any(f is not None for f in futs) or not b._stages  # in place where O_DIRECT works here
    for f in futs:
        b.wait(f)
    sa, sb = a.finish(), b.finish()
    assert (tmp_path / "b.safetensors").read_bytes() == header + data == (tmp_path / "a.safetensors").read_bytes()
    assert sa == sb == file_checksum(tmp_path / "a.safetensors")
