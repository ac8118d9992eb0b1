"""Evaluation: lm-eval-harness on merged models (``harness.py``: :func:`harness.evaluate`, one
table of models with deltas against the first), the in-process held-out scorer and lm-eval
scorer for sweeps (``scoring.py``), the LAWA sweep (``sweep.py``), and the offline task pack
(``tasks/``, over Python's own docs from ``textdata.py``).

**Add a task pack**: a subfolder of ``tasks/`` that writes lm-eval YAML over local jsonl files
(see ``tasks/__init__.py``), named in ``tasks.DEFAULT_TASKS`` if it should run by default;
tests in ``tests/eval/`` run it through lm-eval for real on a tiny model.
lm-eval and torch are imported only when an evaluation runs. Every transformers and lm-eval load
passes ``trust_remote_code=False``: no model's or tokenizer's own code ever runs (``remote_code.py``).
"""
