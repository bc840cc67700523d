# Fresh machine: `make train` (set up + main job) or `make test` (set up + tests). Nothing else needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/driving_town_td3.yaml
# Extra rl.train arguments, e.g. TRAIN_ARGS="--set experiment.seed=1" (tests cut the run short).
TRAIN_ARGS ?=
# CPU torch for CI and laptops. GPU users: install your own torch into .venv first; an
# existing torch is never replaced (pyproject asks for a range, not a pin).
TORCH  ?= torch==2.13.0

.PHONY: setup train test test-fast bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

train: setup
	$(PY) -m rl.train --config $(CONFIG) $(TRAIN_ARGS)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m benchmarks.td3_vs_sb3

clean:
	rm -rf $(VENV) runs benchmarks/results .pytest_cache
