#!/bin/sh
# Install the locked dependencies into the active venv (builder stage of images/Dockerfile).
#   install_locked.sh <torch variant: cuda|cpu> <requirements.lock> [trainer-cuda.lock]
# Reads the build arguments INDEX_URL, EXTRA_INDEX_URL, TORCH_INDEX_URL from the environment (Docker exposes ARGs to
# RUN) and /tmp/build-inputs/{ca.pem,wheels/} (images/build-inputs/README.md). Nothing here reaches the runtime stage.
set -eu
variant=$1 lock=$2 cuda_lock=${3:-}
inputs=/tmp/build-inputs
[ -s "$inputs/ca.pem" ] && export PIP_CERT="$inputs/ca.pem"
export PIP_INDEX_URL="${INDEX_URL:-https://pypi.org/simple}"
[ -n "${EXTRA_INDEX_URL:-}" ] && export PIP_EXTRA_INDEX_URL="$EXTRA_INDEX_URL"
if ls "$inputs"/wheels/*.whl >/dev/null 2>&1; then export PIP_FIND_LINKS="$inputs/wheels"; fi

pip install pip==26.3
torch_pin=$(grep '^torch==' "$lock")
case "$variant" in
  cuda)  # PyPI's torch for Linux x86_64 is the CUDA build; its CUDA wheels are pinned in the second lock
    [ -n "$cuda_lock" ] || { echo "the cuda variant needs images/trainer-cuda.lock" >&2; exit 1; }
    pip install -r "$lock" -r "$cuda_lock" ;;
  cpu)   # the CPU build first (--no-deps), so that `torch==X` in the lock is met and the CUDA build never comes
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
      pip install --no-deps "$torch_pin" --index-url "$TORCH_INDEX_URL"
    else  # an air-gapped build: the CPU wheel must be among the build's wheels
      pip install --no-deps "$torch_pin" --no-index --find-links "$inputs/wheels"
    fi
    pip install -r "$lock" ;;
  *) echo "TORCH_VARIANT must be cuda or cpu, not $variant" >&2; exit 1 ;;
esac
