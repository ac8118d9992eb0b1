"""``merger.json`` (what was merged and how, with provenance) and the README model card."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

from merger import __version__
from merger.engine.run import Result
from merger.formats import of
from merger.output.convert import OUTPUTS
from merger.output.folder import PROGRESS
from merger.output.owned import PARTIAL_MARK
from merger.plan import Plan, output_dtypes
from merger.units import format_size


def source_files(plan: Plan, result: Result) -> list[list[dict]]:
    """Per source: its weight files with size and sha256 (computed, or known from the Hub)."""
    out = []
    for s in plan.sources:
        if s.files:  # Hub revisions: listed when resolved (they may be deleted by now: --no-keep)
            out.append([{"file": f, "size": size, "sha256": sha or (s.path and result.file_hashes.get(
                            str(Path(s.path) / f)))} for f, size, sha in s.files  # no LFS sha256: hashed
                        if f.endswith((".bin", ".safetensors", ".index.json"))])
            continue
        names = of(s.path).weight_files(s.path)
        rows = []
        for f in names:
            p = str((Path(s.path) if os.path.isdir(s.path) else Path(s.path).parent) / f)  # a file: torch_pt
            sha = result.file_hashes.get(p) or result.file_hashes.get(os.path.realpath(p))
            st = os.stat(p)
            rows.append({"file": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
        out.append(rows)
    return out


def torch_version() -> str | None:
    """The installed torch's version, without importing torch (1 s) when nothing has yet; None without torch."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    from importlib import metadata  # 10-20 ms: only here, where torch wasn't needed

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def manifest(plan: Plan, result: Result, *, command: list[str] | None) -> dict:
    """The contents of ``merger.json``."""
    files = source_files(plan, result)
    return {
        "merger_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "method": plan.options.method.describe(),
        "weights": list(plan.weights),
        "accumulate": plan.options.accumulate,
        "dtypes": output_dtypes(plan),
        "device": plan.device,
        "schedule": plan.schedule,
        "kernel": result.kernel,
        "max_memory": plan.max_memory,
        "sources": [dict(s.to_dict(), weight=w, files=f) for s, w, f in zip(plan.sources, plan.weights, files)],
        "output": {"shards": [s.filename for s in plan.shards], "bytes": result.written_bytes,
                   "copied_from_latest": list(plan.copy_files)},
        "copied_tensors": result.copied_tensors,
        "duplicate_revisions": [list(p) for p in result.duplicates],
        "warnings": list(dict.fromkeys([*plan.warnings, *result.warnings])),  # the plan's, then the run's
        "timings": {"total_s": round(result.seconds, 3), **{f"{k}_busy_s": v for k, v in result.timings.items()}},
        "read_bytes": result.read_bytes,
        "peak_rss": result.peak_rss,
        "environment": {"python": platform.python_version(), "torch": torch_version(),
                        "platform": platform.platform()},
    }


def model_card(plan: Plan, result: Result) -> str:
    """README.md for the merged folder: front matter, what was averaged, with which weights."""
    first = plan.sources[0]
    repo = first.repo_id
    lines = ["---", "library_name: transformers", "tags:", "- merger", "- checkpoint-averaging"]
    if repo:
        lines += ["base_model:", f"- {repo}"]
    lines += ["---", "", f"# {Path(result.output).name}", "",
              f"A {plan.options.method.describe()} average of {len(plan.sources)} checkpoints "
              f"of one training run{f' of `{repo}`' if repo else ''}, made with "
              f"[merger](https://pypi.org/project/merger/) {__version__}.", "",
              "| # | revision | step | weight | commit / path |", "|---|---|---|---|---|"]
    for i, (s, w) in enumerate(zip(plan.sources, plan.weights), 1):
        where = f"`{s.commit[:12]}`" if s.commit else f"`{s.path}`"
        lines.append(f"| {i} | {s.name} | {s.step if s.step is not None else ''} | {w:.6g} | {where} |")
    lines += ["", f"Floating tensors: weighted sum accumulated in {plan.options.accumulate}, cast once to "
              f"{', '.join(sorted(set(output_dtypes(plan).values())))}. "
              f"{len(result.copied_tensors)} tensors identical in every input were copied bit for bit; "
              f"config and tokenizer files are those of {plan.sources[-1].name}.", "",
              f"Output: {format_size(result.written_bytes)} in {len(plan.shards)} shard(s). "
              "Full provenance (file sizes, sha256, timings) is in `merger.json`.", ""]
    return "\n".join(lines)


def write(folder: Path, plan: Plan, result: Result, *, command: list[str] | None) -> None:
    m = manifest(plan, result, command=command)
    m["output"]["format"] = plan.output_format
    if OUTPUTS.get(plan.output_format):  # converted: the engine's shards are gone, list what replaced them
        skip = (*plan.copy_files, PROGRESS, PARTIAL_MARK)
        m["output"]["shards"] = sorted(p.name for p in folder.iterdir() if p.name not in skip)
    (folder / "merger.json").write_text(json.dumps(m, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(plan, result), errors="backslashreplace")  # non-UTF-8 paths
