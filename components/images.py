"""The one place that names container images: ``<registry>/<name>:<tag>``.

The registry and tag come from ``LORA_MOE_IMAGE_REGISTRY`` and ``LORA_MOE_IMAGE_TAG`` (read when this module is
imported; default tag ``dev``). ``lora-moe pipeline compile --image_tag T`` overrides them per compile through
:class:`components.k8s.ClusterSettings`, which sets the image of every task it places.
"""

from __future__ import annotations

import os
import re

DEFAULT_REGISTRY = "registry.example.com"  # a placeholder, like manifests/: set LORA_MOE_IMAGE_REGISTRY
DEFAULT_TAG = "dev"
TRAINER = "lora-moe-trainer"  # images/Dockerfile, TORCH_VARIANT=cuda; caching, training, evaluation, inference
LIGHT = "lora-moe-cpu"  # images/Dockerfile, TORCH_VARIANT=cpu; tracking, data checks, labelling, import, registry

# The numeric uid:gid that images/*.Dockerfile run as (`USER 10001:10001`); the pipeline asks KFP for the same
# (components.k8s), and the manifests use it. Numeric, so that the kubelet can check runAsNonRoot.
IMAGE_UID = 10001
TAG_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")  # the OCI tag grammar


def default_tag() -> str:
    return os.environ.get("LORA_MOE_IMAGE_TAG") or DEFAULT_TAG


def default_registry() -> str:
    return (os.environ.get("LORA_MOE_IMAGE_REGISTRY") or DEFAULT_REGISTRY).rstrip("/")


def image_ref(name: str, tag: str | None = None, registry: str | None = None) -> str:
    """``registry/name:tag``; the environment's (or the default) registry and tag where not given."""
    return f"{(registry or default_registry()).rstrip('/')}/{name}:{tag or default_tag()}"


TRAINER_IMAGE = image_ref(TRAINER)
LIGHT_IMAGE = image_ref(LIGHT)
