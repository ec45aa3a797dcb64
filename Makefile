# Two commands on a fresh machine: `make demo` (set up, then edit a real model) and `make test` (set up, then test).
VENV ?= .venv
PYTHON ?= python3
# torch from PyTorch's CPU wheel index: on Linux, PyPI's torch is the CUDA build (several GB). On a CUDA machine:
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cu130`; `TORCH_INDEX=` takes torch from pip's own sources.
# Where that index is out of reach, pip says so once per package and uses the sources of its configuration.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BIN = $(VENV)/bin

.PHONY: install chromium test test-fast test-oldest demo lint bench bench-quality device-check

$(BIN)/malmen-hf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/python -m pip install --quiet --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,app]"
	touch $@

install: $(BIN)/malmen-hf

lint: install
	$(BIN)/ruff check malmen_hf tests benchmarks app.py notebooks/execute.py
	$(BIN)/ruff format --check malmen_hf tests benchmarks app.py notebooks/execute.py

# Chromium for the browser demo's test (tests/test_app.py), from the system's packages when it is missing and apt-get
# may install it (as root, or with sudo without a password); otherwise that test skips and says why.
APT_GET = $(if $(filter 0,$(shell id -u)),apt-get,$(if $(shell sudo -n true 2>/dev/null && echo yes),sudo -n apt-get))
chromium:
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif ! command -v apt-get >/dev/null || [ -z "$(APT_GET)" ]; then \
		echo "No Chromium, and apt-get cannot install it here: tests/test_app.py will skip."; \
	else \
		echo "Installing Chromium for tests/test_app.py: $(APT_GET) install chromium"; \
		export DEBIAN_FRONTEND=noninteractive; \
		$(APT_GET) install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		{ $(APT_GET) update -qq && $(APT_GET) install -y -qq --no-install-recommends chromium >/dev/null; } || \
		echo "Chromium could not be installed: tests/test_app.py will skip."; \
	fi

test: lint chromium
	$(BIN)/python -m pytest

# The same tests with the oldest dependency versions pyproject.toml allows (constraints/oldest.txt), in .venv-oldest.
test-oldest:
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --retries 1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	.venv-oldest/bin/python -m pip install --quiet -c constraints/oldest.txt -e ".[dev]"
	.venv-oldest/bin/python -m pytest -m "not slow"

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

demo: install
	$(BIN)/malmen-hf demo

bench: install
	$(BIN)/python benchmarks/edit_speed.py

# The checks a lent GPU machine runs in one call (benchmarks/gpu/README.md, "Device check"): there, python3 has torch
# and the carried wheels add the rest; here, .venv's python with DEVICE_CHECK_ARGS for the CPU path (see that README).
DEVICE_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
device-check:
	$(DEVICE_CHECK_PYTHON) benchmarks/device_check.py run $(DEVICE_CHECK_ARGS)

# Edit quality against the baselines. The MEND baseline is trained first when missing (about 25 minutes on 2 CPU
# cores): the shipped editor's settings (its config.json; the default layers, the last 6 down_proj), with MEND's
# summed aggregation.
MEND_EDITOR ?= runs/mend-smollm2-135m-counterfact
CF_DATA ?= ../shared/data/counterfact
$(MEND_EDITOR)/config.json: | install
	$(BIN)/malmen-hf train --model smollm2-135m --data $(CF_DATA)/train.json --output-dir $(MEND_EDITOR) \
		--aggregation sum --rank 256 --lr-init 1e-4 --token-positions all --facts-per-step 32 --max-steps 300 \
		--meta-lr 2e-4 --c-loc 3 --eval-every 25 --checkpoint-every 25

bench-quality: install $(MEND_EDITOR)/config.json
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/quality.py --malmen-editor editors/malmen-smollm2-135m-counterfact \
		--mend-editor $(MEND_EDITOR) --tune --n 1 10 100 1000 10000 --single-trials 10 --threads 2
