# merger: make install | test | fuzz | demo | wsd | warmstart | lint | bench
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned CPU wheel installs in seconds where it is available (and from PyPI elsewhere).
# A machine with its own CUDA build of torch keeps it: set TORCH_SPEC= (empty) or install into
# an environment that already has torch; pyproject only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test test-fast fuzz demo wsd warmstart nanogpt-lawa lint bench bench-nanogpt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml setup.py merger/fold/_fold.c | $(BIN)/python
	@if ! $(BIN)/python -c "import torch" 2>/dev/null && [ -n "$(TORCH_SPEC)" ]; then \
		$(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install  # without the tests marked slow (torchrun, lm-eval, model-sized data) or fuzz
	$(BIN)/python -m pytest -q -m "not slow and not fuzz"

# the fuzz tests with fresh draws and 10x the examples (FUZZ_FACTOR=); SEED=N repeats a run's draws
FUZZ_FACTOR ?= 10
fuzz: install
	MERGER_FUZZ=1 MERGER_FUZZ_FACTOR=$(FUZZ_FACTOR) MERGER_FUZZ_SEED=$(SEED) \
		$(BIN)/python -m pytest -q -m fuzz

demo: install
	$(BIN)/python examples/demo.py

wsd: install  # decay by merging vs a real LR decay on a WSD run: demo/wsd/{table.md,wsd.png}
	$(BIN)/python examples/wsd_decay.py

# merger grow on this CPU: warm vs cold start of a 2x wider tiny Pythia, 2 seeds (~8 min on 2 cores)
warmstart: install
	$(BIN)/python examples/warmstart.py

nanogpt-lawa: install
	$(BIN)/python examples/nanogpt_lawa.py

lint: install  # ruff, and every merger.x.y / file named in docstrings, comments and docs resolves
	$(BIN)/python -m ruff check merger tests examples bench tools 2>/dev/null || \
		($(BIN)/pip install -q ruff && $(BIN)/python -m ruff check merger tests examples bench tools)
	$(BIN)/python tools/check_refs.py

bench: install
	bash bench/setup.sh
	$(BIN)/python bench/run.py --shape 410m --revisions 9

bench-nanogpt: install
	$(BIN)/python bench/nanogpt.py --files 9

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache merged demo nanogpt-lawa
