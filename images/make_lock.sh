#!/usr/bin/env bash
# Regenerate requirements.lock (runtime dependencies of pyproject.toml, no dev extras) and images/trainer-cuda.lock
# (the CUDA wheels of PyPI's torch build on top of it). Run from the repository root with Python 3.11:
#   bash images/make_lock.sh            # or: make lock
# Needs PyPI; about 2 minutes. Writes only the two lock files (the work happens in a temporary folder).
set -euo pipefail

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_VERSION=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
[ -n "$TORCH_VERSION" ] || { echo "pyproject.toml pins no torch==VERSION" >&2; exit 1; }
# NVML bindings for the GPU system metrics of training runs (lora_moe_core.tracking.system): trainer image only
NVML_VERSION=13.615.71
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "the images run Python 3.11: set PYTHON=python3.11" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
pip="$work/venv/bin/pip"
"$pip" install --quiet --disable-pip-version-check pip==26.3

# 1. The CPU build of torch, so that no CUDA wheel lands in requirements.lock: from a local wheel where pip's
#    configuration provides one (this project's machines), else from the PyTorch CPU index.
#    --no-deps: torch's own dependencies come from PyPI with the package in step 2.
"$pip" install --quiet --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null \
  || "$pip" install --quiet --no-deps "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu

# 2. The package, non-editable and without extras, from a copy (a build writes into its source tree).
mkdir "$work/src"
cp -r pyproject.toml README.md lora_moe_core "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$pip" install --quiet "$work/src"
"$pip" check

{
  cat <<EOF
# requirements.lock: the exact runtime dependency set of lora-moe-core (no dev extras), for images/*.Dockerfile.
# Made by images/make_lock.sh (Python 3.11, Linux x86_64): a fresh venv, the CPU build of torch==$TORCH_VERSION, then the
# package itself (non-editable, no extras), then \`pip freeze --all --exclude lora-moe-core --exclude pip\`.
# torch is written without its local label: \`torch==$TORCH_VERSION\` matches every build of that release (the trainer
# image installs PyPI's CUDA 13.0 build, the CPU image the +cpu build from the PyTorch CPU index).
# setuptools stays: torch requires setuptools>=77.0.3 at run time.
# Regenerate after any dependency change in pyproject.toml; tests/test_deploy_files.py checks that they agree.
EOF
  "$pip" freeze --all --exclude lora-moe-core --exclude pip | sed "s/^torch==$TORCH_VERSION+cpu\$/torch==$TORCH_VERSION/"
} > "$work/requirements.lock"

# 3. What PyPI's torch (the CUDA build on Linux x86_64) adds: resolve it with the new lock, ignoring local wheels.
"$pip" install --quiet --isolated --dry-run --ignore-installed --report "$work/report.json" \
  "torch==$TORCH_VERSION" "nvidia-ml-py==$NVML_VERSION" -r "$work/requirements.lock"
"$work/venv/bin/python" - "$work/requirements.lock" "$work/report.json" "$work/trainer-cuda.lock" "$TORCH_VERSION" <<'EOF'
import json
import sys

from packaging.utils import canonicalize_name

lock_path, report_path, out_path, torch_version = sys.argv[1:]
locked = {}
for line in open(lock_path):
    if "==" in line and not line.startswith("#"):
        name, version = line.strip().split("==")
        locked[canonicalize_name(name)] = version
extra, changed = [], []
for item in json.load(open(report_path))["install"]:
    name, version = canonicalize_name(item["metadata"]["name"]), item["metadata"]["version"]
    if name not in locked:
        extra.append(f"{name}=={version}")
    elif locked[name] != version:
        changed.append(f"{name}: lock {locked[name]}, CUDA build {version}")
if changed:
    sys.exit("the CUDA build of torch would change locked versions: " + "; ".join(changed))
header = f"""# images/trainer-cuda.lock: the CUDA runtime wheels that PyPI's torch=={torch_version} (the CUDA build, Linux x86_64)
# pulls in on top of requirements.lock. Used only by images/Dockerfile (TORCH_VARIANT=cuda). Made by images/make_lock.sh:
#   pip install --isolated --dry-run --ignore-installed --report report.json torch=={torch_version} \\
#       nvidia-ml-py (NVML bindings: GPU utilisation/memory/power system metrics in MLflow) -r requirements.lock
# then every package of the report's "install" list that requirements.lock does not name. Some of these are
# ranges in torch's metadata (cuda-bindings, cuda-pathfinder, nvidia-nvjitlink): pinned here so that a rebuild
# gets the same bytes.
"""
open(out_path, "w").write(header + "".join(line + "\n" for line in sorted(extra)))
EOF

cp "$work/requirements.lock" requirements.lock
cp "$work/trainer-cuda.lock" images/trainer-cuda.lock
echo "wrote requirements.lock ($(grep -c '^[^#]' requirements.lock) pins)" \
  "and images/trainer-cuda.lock ($(grep -c '^[^#]' images/trainer-cuda.lock) pins)"
