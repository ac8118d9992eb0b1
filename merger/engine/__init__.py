"""Execution: a plan becomes an output folder.

``run.py`` (the *blocks* executor: output folder, resume, pipeline, manifest hook),
``pipeline.py`` (what every pipeline shares: writer thread, resume points, coordination),
``native_pipeline.py`` and ``torch_pipeline.py`` (the two pipelines), ``choose.py`` (which one),
``resume.py`` (one resume record for the partial folder), ``stream.py`` (the *stream* schedule for
Hub revisions still to download), ``ranks.py`` + ``ranked.py`` + ``parts.py`` (torchrun/srun: each
rank folds a share of the output shards, rank 0 publishes).

**Add an executor**: see ``choose.py``.
"""
