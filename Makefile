# Two commands on a fresh machine: `make demo` (set up, then edit a real model) and `make test` (set up, then test).
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine run e.g. `make install TORCH="torch==2.13.0"` with the CUDA index in pip's config.
TORCH ?= torch==2.13.0
BIN = $(VENV)/bin

.PHONY: install test test-fast demo lint bench bench-quality

$(BIN)/malmen-hf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/malmen-hf

lint: install
	$(BIN)/ruff check malmen_hf tests benchmarks
	$(BIN)/ruff format --check malmen_hf tests benchmarks

test: lint
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

demo: install
	$(BIN)/malmen-hf demo

bench: install
	$(BIN)/python benchmarks/edit_speed.py

# Edit quality against the baselines. MEND_EDITOR: an editor trained with --aggregation sum (README "Benchmarks").
MEND_EDITOR ?= runs/mend-smollm2-135m-counterfact
bench-quality: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/quality.py --malmen-editor editors/malmen-smollm2-135m-counterfact \
		--mend-editor $(MEND_EDITOR) --tune
