"""Fixtures for tests, examples and benchmarks, never imported by merger's runtime code:
synthetic Pythia-shaped trajectories (``synth.py``), a hand-written HF cache (``hubcache.py``),
a byte-level tokenizer (``tokenizer.py``)."""
