"""Outputs: the atomic, locked output folder (``folder.py``), safetensors shards and their index
(``shards.py``), and ``merger.json`` + the model card (``manifest.py``).

**Add an output file**: write it into the partial folder from a ``finalize`` hook (see
``engine/run.py``), never into the final folder; :meth:`folder.OutputDir.publish` renames the whole
folder at once, so a crash never leaves a half-written model. Use :func:`folder.write_atomic` for
a single file outside a merge.
"""
