# syntax=docker/dockerfile:1
# CUDA trainer image: every GPU step of the pipeline (cache, stage1, stage2, evaluate, infer) and the optional
# PyTorchJob. KFP runs our lightweight components in it with install_kfp_package=False: no pip at pod start.
# Build from the repository root (images/README.md):
#   docker build -f images/trainer.Dockerfile --build-arg GIT_SHA=$(git rev-parse --short HEAD) \
#       -t REGISTRY/lora-moe-trainer:$(git rev-parse --short HEAD) .
#
# Base image: python:3.11-slim-bookworm, not a CUDA image. PyPI's torch==2.13.0 for Linux x86_64 IS the CUDA build
# (torch.version.cuda == "13.0"): it brings the CUDA 13.0 runtime, cuDNN 9.20 and NCCL 2.29 as pip wheels
# (images/trainer-cuda.lock), so a CUDA base image would only add a second copy. The node supplies the driver
# (NVIDIA device plugin / container toolkit); CUDA 13.0 needs driver >= 580. The same Python (3.11) as the lock file.
# PyAV's wheel bundles FFmpeg with libx264 (av.libs/), so no system FFmpeg is installed.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: a venv with the locked dependencies, then the package ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. Lock files first: this layer (about 6 GB of wheels) is rebuilt only when a lock changes, not on a code change.
COPY requirements.lock images/trainer-cuda.lock /tmp/locks/
RUN pip install pip==26.3 \
 && pip install -r /tmp/locks/requirements.lock -r /tmp/locks/trainer-cuda.lock

# 2. The package itself (lora_moe_core, components, pipelines: pyproject.toml packages all three; its dependencies
#    are all locked above) and the KFP SDK at the version that compiles the pipeline (components run with
#    install_kfp_package=False, so the image must carry kfp==<SDK version>).
COPY pyproject.toml README.md /src/
COPY lora_moe_core /src/lora_moe_core
COPY components /src/components
COPY pipelines /src/pipelines
RUN pip install --no-deps /src "kfp==2.17.3" \
 && pip check \
 && python -c "import importlib.metadata as m; assert m.version('kfp') == '2.17.3'; assert m.version('torch').split('+')[0] == '2.13.0'"

# ---- runtime: the venv, the configs, a non-root user; no compiler, no pip cache, no secrets ----
FROM ${PYTHON_IMAGE} AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="lora-moe-trainer" \
      org.opencontainers.image.description="WAN2.2 LoRA-MoE training image (CUDA 13.0, torch 2.13.0)" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric uid (10001, components/images.py IMAGE_UID) so that the kubelet can enforce runAsNonRoot; above the
# range of host accounts. The folders the app writes (HOME, /cache) belong to it and to group 0 with group write,
# so they also work where the platform picks an arbitrary uid in group 0 (OpenShift).
RUN groupadd --gid 10001 lora \
 && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/lora --shell /usr/sbin/nologin lora \
 && mkdir -p /cache/huggingface /cache/lora_moe \
 && chown -R 10001:0 /cache /home/lora \
 && chmod -R g=u /cache /home/lora

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# the real folder: configs/ at the repository root is a link to it
COPY lora_moe_core/configs /app/configs

# HF_HUB_OFFLINE: weights come from s3:// or a mounted folder, never from a hub at run time.
# /cache: mount a volume here for model weights and latents (LORA_MOE_CACHE); /tmp must be writable too.
# NVIDIA_VISIBLE_DEVICES is left to the device plugin: setting it to "all" here would expose every GPU of the node
# to pods that requested none.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lora \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    LORA_MOE_CACHE=/cache/lora_moe \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    LORA_MOE_GIT_SHA=${GIT_SHA}

USER 10001:10001
CMD ["lora-moe", "--help"]
