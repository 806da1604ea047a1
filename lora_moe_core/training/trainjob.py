"""The Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) that runs Stage 2 on several nodes.

:func:`build_trainjob` is a pure function from a typed :class:`TrainJobRequest` to the object's JSON: the
``torch-distributed`` ClusterTrainingRuntime, ``numNodes``, the GPUs of each node as ``resourcesPerNode``, and the
placement a single-pod Stage-2 step gets from the pipeline (node selector, tolerations, a memory-backed
``/dev/shm``, CPU/memory requests, the non-root uid, image pull secrets, the MinIO/MLflow endpoints and the
credentials as ``secretKeyRef`` environment variables) as a ``runtimePatches`` entry of the ``node`` replicated
job (Trainer >= 2.2; the older ``podSpecOverrides`` is gone). Written for, and checked against, the TrainJob CRD of
Kubeflow Trainer v2.3.0. Talking to the cluster is :mod:`lora_moe_core.training.trainjob_client`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lora_moe_core.errors import UserError

API_GROUP = "trainer.kubeflow.org"
API_VERSION = "v1alpha1"
PLURAL = "trainjobs"
RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Kubeflow Trainer ships (torchrun on every node)
NODE = "node"  # the runtime's replicated job and container name: the Torch plugin sets PET_* env only there
PATCH_MANAGER = "lora-moe/stage2-launcher"  # who wrote the runtime patch (Trainer keeps one per manager)
PART_OF = {"app.kubernetes.io/part-of": "lora-moe", "app.kubernetes.io/component": "stage2-trainjob"}
_RFC1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # the CRD's CEL rule on metadata.name (at most 63)
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


@dataclass(frozen=True)
class SecretEnv:
    """An environment variable read from a key of a Secret (``optional``: the pod starts without the Secret)."""

    name: str
    secret: str
    key: str
    optional: bool = False


@dataclass(frozen=True)
class Placement:
    """Where and how every node pod runs: what ``components.k8s.gpu_task`` and ``use_credentials`` give the
    single-pod Stage-2 step, as plain values (the pipeline writes it at compile time; :meth:`to_dict` /
    :meth:`from_dict` carry it through a pipeline parameter)."""

    image: str
    accelerator_type: str = "nvidia.com/gpu"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()  # Kubernetes toleration objects
    cpu_request: str = "8"
    memory_request: str = "96Gi"
    shm_size: str = "32Gi"
    run_as_user: int = 10001
    image_pull_secrets: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    secret_env: tuple[SecretEnv, ...] = ()
    runtime: str = RUNTIME
    timeout_s: int = 3 * 24 * 3600  # the TrainJob's activeDeadlineSeconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Placement:
        """The inverse of :meth:`to_dict`; UserError on an unknown or missing key or a wrong type."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(values) - known):
            raise UserError(f"TrainJob placement: unknown key(s) {', '.join(unknown)}")
        if "image" not in values:
            raise UserError("TrainJob placement: no image")
        # a KFP pipeline parameter holds every number as a float: 259200.0 is the int it was compiled from
        numbers = {k: int(v) for k in ("timeout_s", "run_as_user")
                   if isinstance(v := values.get(k), float) and v.is_integer()}  # fmt: skip
        values = {**values, **numbers}
        try:
            placement = cls(**{
                **values,
                "node_selector": dict(values.get("node_selector", {})),
                "tolerations": tuple(dict(t) for t in values.get("tolerations", ())),
                "image_pull_secrets": tuple(values.get("image_pull_secrets", ())),
                "env": dict(values.get("env", {})),
                "secret_env": tuple(SecretEnv(**s) for s in values.get("secret_env", ())),
            })  # fmt: skip
        except TypeError as exc:
            raise UserError(f"TrainJob placement: {exc}") from None
        return placement.validate()

    def validate(self) -> Placement:
        """UserError (one line) on what the API server would refuse, before anything is created."""
        if not self.image or any(c.isspace() for c in self.image):
            raise UserError(f"TrainJob placement: invalid image {self.image!r}")
        if not isinstance(self.timeout_s, int) or self.timeout_s <= 0:
            raise UserError(f"TrainJob placement: timeout_s {self.timeout_s!r} must be a positive number of seconds")
        if not isinstance(self.run_as_user, int) or self.run_as_user <= 0:
            raise UserError(f"TrainJob placement: run_as_user {self.run_as_user!r} must be a non-root uid")
        for name in [*self.env, *(s.name for s in self.secret_env)]:
            if not _ENV_NAME.fullmatch(name):
                raise UserError(f"TrainJob placement: {name!r} is not an environment variable name")
        return self


@dataclass(frozen=True)
class TrainJobRequest:
    """One multi-node Stage-2 run: ``num_nodes`` pods of ``gpus_per_node`` GPUs each, running ``command``."""

    name: str
    namespace: str
    num_nodes: int
    gpus_per_node: int
    command: tuple[str, ...]
    placement: Placement
    env: dict[str, str] = field(default_factory=dict)  # per run (the MLflow parent run, KFP ids), after placement's
    annotations: dict[str, str] = field(default_factory=dict)

    def validate(self) -> TrainJobRequest:
        if len(self.name) > 63 or not _RFC1035.fullmatch(self.name):
            raise UserError(f"TrainJob name {self.name!r} must be an RFC 1035 label of at most 63 characters")
        if not _RFC1035.fullmatch(self.namespace) or len(self.namespace) > 63:
            raise UserError(f"namespace {self.namespace!r} is not a Kubernetes namespace name")
        if not isinstance(self.num_nodes, int) or self.num_nodes < 1:
            raise UserError(f"stage2_num_nodes {self.num_nodes!r} must be at least 1")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise UserError(f"GPUs per node {self.gpus_per_node!r} must be at least 1")
        if not self.command:
            raise UserError("TrainJob: no command")
        self.placement.validate()
        return self


def trainjob_name(run_id: str, task: str) -> str:
    """A stable name per pipeline run and task: a retried launcher finds the TrainJob its first attempt made
    (the SDK's random names would start a second one)."""
    digest = hashlib.sha256(f"{run_id}\0{task}".encode()).hexdigest()[:12]
    return f"lora-moe-s2-{digest}"


def _env(request: TrainJobRequest) -> list[dict[str, Any]]:
    plain = {**request.placement.env, **request.env}
    env: list[dict[str, Any]] = [{"name": k, "value": str(v)} for k, v in plain.items()]
    for item in request.placement.secret_env:
        ref = {"name": item.secret, "key": item.key, **({"optional": True} if item.optional else {})}
        env.append({"name": item.name, "valueFrom": {"secretKeyRef": ref}})
    return env


def _pod_patch(placement: Placement) -> dict[str, Any]:
    """The node pods' spec patch: placement and hardening (KFP gives its task pods the same)."""
    uid = placement.run_as_user
    pod: dict[str, Any] = {
        "securityContext": {"runAsUser": uid, "runAsGroup": uid, "runAsNonRoot": True, "fsGroup": uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": placement.shm_size}}],
        "containers": [{
            "name": NODE,
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],  # NCCL and data-loader workers
            "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                "capabilities": {"drop": ["ALL"]}},
        }],
    }  # fmt: skip
    if placement.node_selector:
        pod["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        pod["tolerations"] = [dict(t) for t in placement.tolerations]
    if placement.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": name} for name in placement.image_pull_secrets]
    return pod


def build_trainjob(request: TrainJobRequest) -> dict[str, Any]:
    """The TrainJob object for ``request`` (validated first), ready for ``create_namespaced_custom_object``."""
    request.validate()
    placement = request.placement
    gpus = str(request.gpus_per_node)
    pod_template = {"metadata": {"labels": dict(PART_OF)}, "spec": _pod_patch(placement)}
    patch = {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
            {"name": NODE, "template": {"spec": {"template": pod_template}}},
        ]}}},
    }  # fmt: skip
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": request.name,
            "namespace": request.namespace,
            "labels": dict(PART_OF),
            "annotations": dict(request.annotations),
        },  # fmt: skip
        "spec": {
            "runtimeRef": {"name": placement.runtime, "apiGroup": API_GROUP, "kind": "ClusterTrainingRuntime"},
            "activeDeadlineSeconds": placement.timeout_s,
            "trainer": {
                "image": placement.image,
                "command": list(request.command),
                "numNodes": request.num_nodes,
                "env": _env(request),
                "resourcesPerNode": {
                    "requests": {
                        "cpu": placement.cpu_request,
                        "memory": placement.memory_request,
                        placement.accelerator_type: gpus,
                    },
                    "limits": {placement.accelerator_type: gpus},
                },  # fmt: skip
            },
            "runtimePatches": [patch],
        },
    }
