# cmv-persuasion. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_ROOT ?= runs
RUN_ID ?= demo
RECIPE ?= configs/demo.yaml

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all test-gpu bench bench-clean bench-train bench-judge bench-generate clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-22s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare requirement would pull a multi-GB CUDA build on CPU machines
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with every CPU extra and the test tools

demo: install ## run the whole pipeline locally on the embedded default model (minutes on CPU)
	$(VENV)/bin/cmv run --config $(RECIPE) --root $(RUN_ROOT) --run-id $(RUN_ID)

test: install ## run the default test suite (unit + integration; no slow or GPU tests)
	$(VENV)/bin/pytest -m "not slow and not gpu" -q

test-all: install ## every CPU test, the slow ones too
	$(VENV)/bin/pytest -m "not gpu" -q

test-gpu: install ## the GPU-marked tests (needs CUDA)
	$(VENV)/bin/pytest -m gpu -q

bench: bench-clean ## benchmark the clean stage on a dump of the real data's size

bench-clean: install
	$(PY) benchmarks/bench_clean.py

bench-train: install ## training tokens/s on CPU, tiny and demo recipes, packing on/off
	$(PY) benchmarks/bench_train.py

bench-judge: install ## 500 judgments against a local server with 100 ms latency vs the ideal
	$(PY) benchmarks/bench_judge.py

bench-generate: install ## batched vs one-at-a-time generation on CPU with the demo model
	$(PY) benchmarks/bench_generate.py

clean-runs: ## delete local run artifacts
	rm -rf $(RUN_ROOT)

# --- images (k8s helper) ---
# --- end images ---
