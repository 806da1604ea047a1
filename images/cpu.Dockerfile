# syntax=docker/dockerfile:1
# Light CPU image: caption labelling, pipeline compile/submit, registry and other steps that need no GPU.
# Build from the repository root (images/README.md):
#   docker build -f images/cpu.Dockerfile --build-arg GIT_SHA=$(git rev-parse --short HEAD) \
#       -t REGISTRY/lora-moe-cpu:$(git rev-parse --short HEAD) .
#
# torch comes from the PyTorch CPU index (2.13.0+cpu, about 200 MB instead of the CUDA build's 6 GB); the version is
# read from requirements.lock so that the lock stays the one place where it is pinned.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. Lock file first (layer caching). The CPU torch wheel goes in first (--no-deps): `torch==2.13.0` in the lock is
#    then already met by 2.13.0+cpu, and pip does not fetch the CUDA build from PyPI.
COPY requirements.lock /tmp/locks/
RUN pip install pip==26.3 \
 && pip install --no-deps "$(grep '^torch==' /tmp/locks/requirements.lock)" --index-url https://download.pytorch.org/whl/cpu \
 && pip install -r /tmp/locks/requirements.lock

# 2. The package (lora_moe_core, components, pipelines: pyproject.toml packages all three) and the KFP SDK at the
#    version that compiles the pipeline.
COPY pyproject.toml README.md /src/
COPY lora_moe_core /src/lora_moe_core
COPY components /src/components
COPY pipelines /src/pipelines
RUN pip install --no-deps /src "kfp==2.17.3" \
 && pip check \
 && python -c "import importlib.metadata as m; assert m.version('kfp') == '2.17.3'; assert m.version('torch') == '2.13.0+cpu'"

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="lora-moe-cpu" \
      org.opencontainers.image.description="WAN2.2 LoRA-MoE light CPU image (labelling, compile, registry)" \
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

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/lora \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/cache/huggingface \
    LORA_MOE_CACHE=/cache/lora_moe \
    MPLCONFIGDIR=/tmp/matplotlib \
    LORA_MOE_GIT_SHA=${GIT_SHA}

USER 10001:10001
CMD ["lora-moe", "--help"]
