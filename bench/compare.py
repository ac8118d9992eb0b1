"""Compare two merged model folders tensor by tensor: the benchmark's cheap correctness check.

    python bench/compare.py OUT_DIR REFERENCE_DIR      # prints a JSON summary

Distances are reported as max abs diff and max distance in units in the last place (ulp) of the
16/32-bit float dtype, counted on the ordered integer line of the bit patterns, so 1 ulp means
"the neighbouring representable value". Tensors are read one at a time (safetensors mmap).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BUFFER_SUFFIXES = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
_INT_VIEW = {2: torch.int16, 4: torch.int32}


def open_tensors(folder: Path) -> dict[str, callable]:
    """Tensor name -> zero-argument loader, for a HF folder of safetensors or .bin (maybe sharded)."""
    from safetensors import safe_open

    st = sorted(folder.glob("*.safetensors"))
    if st:
        out = {}
        for f in st:
            h = safe_open(str(f), "pt")
            out.update({k: (lambda h=h, k=k: h.get_tensor(k)) for k in h.keys()})
        return out
    out = {}
    for f in sorted(folder.glob("*.bin")):
        sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        out.update({k: (lambda v=v: v) for k, v in sd.items()})
    if not out:
        raise FileNotFoundError(f"no *.safetensors or *.bin in {folder}")
    return out


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Max distance in ulps between two float tensors of one 16/32-bit dtype (NaN == NaN)."""
    iv = _INT_VIEW[a.element_size()]
    bits = 8 * a.element_size()

    def ordered(x: torch.Tensor) -> torch.Tensor:
        u = x.reshape(-1).view(iv).to(torch.int64) & ((1 << bits) - 1)
        sign = 1 << (bits - 1)
        return torch.where(u >= sign, sign - u, u)  # -0 and +0 both map to 0

    both_nan = (torch.isnan(a) & torch.isnan(b)).reshape(-1)
    d = (ordered(a) - ordered(b)).abs().masked_fill(both_nan, 0)
    return int(d.max()) if d.numel() else 0


def compare_outputs(out: Path, ref: Path) -> dict:
    """Summary of how ``out`` differs from ``ref``: names, dtypes, max abs and ulp distance."""
    a, b = open_tensors(Path(out)), open_tensors(Path(ref))
    res = {"tensors": len(b), "missing": sorted(set(b) - set(a)), "extra": sorted(set(a) - set(b)),
           "dtype_changed": {}, "buffers_not_exact": [], "bit_identical": 0, "max_abs": 0.0,
           "max_ulp": 0, "worst": None}
    for name in sorted(set(a) & set(b)):
        x, y = a[name](), b[name]()
        if x.dtype != y.dtype or x.shape != y.shape:
            res["dtype_changed"][name] = f"{y.dtype}{tuple(y.shape)} -> {x.dtype}{tuple(x.shape)}"
        same = x.dtype == y.dtype and x.shape == y.shape and torch.equal(
            x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
        if same:
            res["bit_identical"] += 1
            continue
        if name.endswith(BUFFER_SUFFIXES) or not y.is_floating_point():
            res["buffers_not_exact"].append(name)
        if x.shape != y.shape:
            continue
        xd, yd = x.double(), y.double()
        finite = torch.isfinite(xd) & torch.isfinite(yd)
        diff = (xd - yd).abs().where(finite, torch.zeros((), dtype=torch.float64))
        if not bool((torch.isfinite(xd) == torch.isfinite(yd)).all()):
            res["buffers_not_exact"].append(name + " (non-finite differ)")
        m = float(diff.max()) if diff.numel() else 0.0
        if m > res["max_abs"]:
            res["max_abs"], res["worst"] = m, name
        if x.dtype == y.dtype and x.is_floating_point() and x.element_size() in _INT_VIEW:
            res["max_ulp"] = max(res["max_ulp"], ulp_distance(x, y))
    # keep the report short: one example and a count
    if len(res["dtype_changed"]) > 4:
        first = next(iter(res["dtype_changed"].items()))
        res["dtype_changed"] = {first[0]: first[1], "...": f"{len(res['dtype_changed'])} tensors"}
    if len(res["buffers_not_exact"]) > 4:
        res["buffers_not_exact"] = res["buffers_not_exact"][:1] + [f"... {len(res['buffers_not_exact'])} tensors"]
    return res


if __name__ == "__main__":
    print(json.dumps(compare_outputs(Path(sys.argv[1]), Path(sys.argv[2])), indent=2))
