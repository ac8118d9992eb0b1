"""merger's default lm-eval task pack: two tasks that need no network.

=====================  =========================  ===============================================
task                   lm-eval output_type        metrics
=====================  =========================  ===============================================
``merger_pydocs_ppl``  ``loglikelihood_rolling``  word_perplexity, byte_perplexity, bits_per_byte
``merger_pydocs_mc``   ``multiple_choice``        acc, acc_norm (4 choices, chance = 0.25)
=====================  =========================  ===============================================

Both read jsonl files built from held-out Python documentation (:mod:`merger.eval.tasks.pydocs`).
lm-eval's ``dataset_path: json`` needs absolute ``data_files`` paths, so the YAML and jsonl files
are written on first use into ``<cache>/tasks/pydocs-v<PACK_VERSION>-<digest>/`` where ``<cache>``
is ``$MERGER_CACHE`` or ``~/.cache/merger`` and ``<digest>`` hashes the data. The folder is
written atomically (temporary sibling, then rename) and reused afterwards; datasets' arrow cache
for it goes to ``<cache>/datasets``, so nothing is written under ``~/.cache/huggingface``.

    from merger.eval.tasks import task_pack_dir
    task_pack_dir()  # -> ~/.cache/merger/tasks/pydocs-v1-0123456789ab  (pass as --include_path)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from merger.output.folder import atomic_folder

PACK_VERSION = "1"  # bump when the builders in pydocs.py or the YAML below change meaning
PPL_TASK = "merger_pydocs_ppl"
MC_TASK = "merger_pydocs_mc"
DEFAULT_TASKS: tuple[str, ...] = (PPL_TASK, MC_TASK)

# lm-eval task configs; {data} and {cache} are JSON-quoted absolute paths (JSON strings are YAML).
_DATA_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
"""

_PPL_YAML = """\
# merger offline task pack v{version}: perplexity on held-out Python docs passages.
""" + _DATA_YAML + """\
output_type: loglikelihood_rolling
test_split: test
num_fewshot: 0
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: {version}
"""

_MC_YAML = """\
# merger offline task pack v{version}: pick the true continuation of a held-out Python docs
# passage among 4 (the 3 others continue other documents).
""" + _DATA_YAML + """\
output_type: multiple_choice
test_split: test
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def cache_root() -> Path:
    """merger's cache folder: ``$MERGER_CACHE`` if set, else ``~/.cache/merger``."""
    env = os.environ.get("MERGER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "merger"


def _jsonl(records: list[dict]) -> bytes:
    lines = (json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    return "".join(lines).encode()


def build_data() -> dict[str, bytes]:
    """The pack's data files, ``file name -> bytes``; deterministic for a given Python docs text."""
    from merger.eval.tasks.pydocs import mc_records, ppl_records
    from merger.eval.textdata import split_docs

    _, heldout = split_docs()
    return {f"{PPL_TASK}.jsonl": _jsonl(ppl_records(heldout)),
            f"{MC_TASK}.jsonl": _jsonl(mc_records(heldout))}


def task_pack_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder holding the default task pack's YAML and jsonl files, written on first use.

    Args:
        cache_dir: merger's cache folder; defaults to :func:`cache_root`.

    Returns:
        ``<cache_dir>/tasks/pydocs-v<PACK_VERSION>-<digest>``, to pass to lm-eval as an include
        path (``TaskManager(include_path=...)`` or ``lm_eval --include_path``).
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    data = build_data()
    digest = hashlib.sha256()
    for name in sorted(data):
        digest.update(name.encode() + b"\0" + data[name])
    digest.update((_PPL_YAML + _MC_YAML).encode())
    folder = root / "tasks" / f"pydocs-v{PACK_VERSION}-{digest.hexdigest()[:12]}"
    if folder.is_dir():
        return folder
    with atomic_folder(folder) as tmp:
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)
        cache = json.dumps(str(root / "datasets"))
        for task, template in ((PPL_TASK, _PPL_YAML), (MC_TASK, _MC_YAML)):
            text = template.format(task=task, version=PACK_VERSION, cache=cache,
                                   data=json.dumps(str(folder / f"{task}.jsonl")))
            (tmp / f"{task}.yaml").write_text(text)
    return folder


__all__ = ["DEFAULT_TASKS", "MC_TASK", "PACK_VERSION", "PPL_TASK", "build_data", "cache_root",
           "task_pack_dir"]
