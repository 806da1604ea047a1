"""Where and how each task runs on the cluster: image, GPU node pool, resources, timeouts, retries, credentials.

Everything cluster-specific is a compile-time :class:`ClusterSettings` (``lora-moe pipeline compile`` flags, or
the ``LORA_MOE_GPU_*`` variables of ``manifests/base/gpu-pool.configmap.yaml``), so the same pipeline code compiles
for any cluster. ``gpu_task`` is the one helper for GPU placement; ``cpu_task`` places the small steps;
``use_credentials`` mounts the MinIO and MLflow secrets as environment variables, the only way credentials reach a
step (never pipeline parameters). ``kfp.local`` ignores all of it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from kfp import kubernetes

from components import images
from components.images import IMAGE_UID
from lora_moe_core.errors import UserError
from lora_moe_core.guards.urls import check_http_url

# Secret key -> environment variable (manifests/base/minio-credentials.secret.yaml). The MLflow secret is optional:
# a server without authentication needs none; with authentication it holds any of these keys.
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET_KEYS = {
    key: key for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
}

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DURATION = re.compile(r"^\d+(s|m|h)$")
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
LAUNCHER_MARGIN_S = 1800  # the TrainJob launcher outwaits the TrainJob's activeDeadlineSeconds by this much


def _check_url(url: str, what: str) -> None:
    """The library's URL check (IPv6 brackets, ports, spaces) as a SettingsError: the YAML would carry it."""
    try:
        check_http_url(url, what)
    except UserError as exc:
        raise SettingsError(str(exc)) from None


class SettingsError(ValueError):
    """A cluster setting that Kubernetes would refuse (the CLI turns it into one ``error:`` line)."""


@dataclass(frozen=True)
class Toleration:
    """A pod toleration; no ``value`` means ``operator: Exists``."""

    key: str
    effect: str = "NoSchedule"
    value: str | None = None

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """``KEY[=VALUE][:EFFECT]``, e.g. ``nvidia.com/gpu:NoSchedule`` or ``pool=a100:NoExecute``."""
        spec, has_effect, effect = text.rpartition(":")  # label keys and values hold no ':'
        spec = spec if has_effect else effect
        effect = effect if has_effect else ""
        key, has_value, value = spec.partition("=")
        return cls(key=key, effect=effect or "NoSchedule", value=value if has_value else None)


def parse_selector(text: str) -> tuple[tuple[str, str], ...]:
    """``key=value[,key=value…]`` → pairs; SettingsError for an entry without ``=``."""
    pairs = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        key, has_value, value = entry.partition("=")
        if not has_value:
            raise SettingsError(f"node selector {entry!r} must be key=value, e.g. lora-moe/pool=gpu")
        pairs.append((key, value))
    return tuple(pairs)


@dataclass(frozen=True)
class ClusterSettings:
    """Compile-time cluster knobs. Defaults match manifests/ (MinIO ``minio:9000``, MLflow ``mlflow:5000``, GPU nodes
    labelled ``lora-moe/pool=gpu`` and tainted ``nvidia.com/gpu``)."""

    image_tag: str = field(default_factory=images.default_tag)
    image_registry: str = field(default_factory=images.default_registry)
    accelerator_type: str = "nvidia.com/gpu"
    gpu_node_selector: tuple[tuple[str, str], ...] = (("lora-moe/pool", "gpu"),)
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),)
    shm_size: str = "32Gi"  # memory-backed /dev/shm for data-loader workers and NCCL
    gpu_cpu_request: str = "8"
    gpu_memory_request: str = "96Gi"  # A14B: two 14B DiTs are loaded through host memory
    cpu_cpu_request: str = "1"
    cpu_memory_request: str = "4Gi"
    train_timeout_s: int = 3 * 24 * 3600
    gpu_timeout_s: int = 12 * 3600
    cpu_timeout_s: int = 3600
    gpu_retries: int = 2  # a pre-empted (spot) GPU node: the step runs again
    cpu_retries: int = 1
    retry_backoff: str = "120s"
    s3_endpoint_url: str = "http://minio:9000"  # not secrets: plain environment variables of each step;
    mlflow_tracking_uri: str = "http://mlflow:5000"  # "" leaves them to the pod's environment (and to kfp.local's)
    s3_secret: str = "minio-credentials"
    mlflow_secret: str = "mlflow-credentials"
    image_pull_secrets: tuple[str, ...] = ()
    run_as_user: int = IMAGE_UID  # uid and gid of every task container: the images' USER
    # stage2_num_nodes > 1 → a TrainJob launcher (dsl.If/Else, the checkpoint through dsl.OneOf). kfp.local has no
    # cluster to launch on and resolves no dsl.OneOf of artifacts: local runs compile today's single Stage-2 step.
    trainjob_stage2: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> ClusterSettings:
        """Defaults, then the ``LORA_MOE_GPU_*`` variables of the gpu-pool ConfigMap, then ``overrides``."""
        env = os.environ if env is None else env
        values: dict = {}
        if env.get("LORA_MOE_GPU_RESOURCE"):
            values["accelerator_type"] = env["LORA_MOE_GPU_RESOURCE"]
        if env.get("LORA_MOE_GPU_NODE_SELECTOR"):
            values["gpu_node_selector"] = parse_selector(env["LORA_MOE_GPU_NODE_SELECTOR"])
        if env.get("LORA_MOE_GPU_TOLERATION_KEY"):
            operator = env.get("LORA_MOE_GPU_TOLERATION_OPERATOR", "Exists")
            if operator not in ("Exists", "Equal"):
                raise SettingsError(f"LORA_MOE_GPU_TOLERATION_OPERATOR {operator!r} must be Exists or Equal")
            value = env.get("LORA_MOE_GPU_TOLERATION_VALUE", "") if operator == "Equal" else None
            values["gpu_tolerations"] = (
                Toleration(
                    env["LORA_MOE_GPU_TOLERATION_KEY"], env.get("LORA_MOE_GPU_TOLERATION_EFFECT", "NoSchedule"), value
                ),
            )
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def image(self, name: str) -> str:
        return images.image_ref(name, self.image_tag, self.image_registry)

    @property
    def trainer_image(self) -> str:
        return self.image(images.TRAINER)

    @property
    def light_image(self) -> str:
        return self.image(images.LIGHT)

    def validate(self) -> ClusterSettings:
        """Raise :class:`SettingsError` (one line) on anything Kubernetes or the registry would refuse."""
        if not images.TAG_PATTERN.fullmatch(self.image_tag):
            raise SettingsError(f"invalid image tag {self.image_tag!r}: letters, digits, '_', '.', '-', at most 128")
        if not self.image_registry or any(c.isspace() or not c.isprintable() for c in self.image_registry):
            raise SettingsError(f"invalid image registry {self.image_registry!r}")
        for what, name in (
            ("MinIO credentials secret", self.s3_secret),
            ("MLflow credentials secret", self.mlflow_secret),
            *(("image pull secret", n) for n in self.image_pull_secrets),
        ):
            _check_dns1123(what, name)
        for what, url, secret in (
            ("S3 endpoint", self.s3_endpoint_url, self.s3_secret),
            ("MLflow tracking URI", self.mlflow_tracking_uri, self.mlflow_secret),
        ):
            # user:password@ would sit in the compiled YAML in clear. Any '@' counts (a raw '/' in a password moves
            # it out of urlsplit's netloc), and the message shows only what follows it.
            if "@" in url:
                raise SettingsError(
                    f"{what} holds credentials (user:password@): put them in the Secret {secret!r} and give only "
                    f"the address after the '@' ({url.rpartition('@')[2]})"
                )
            if url:
                _check_url(url, what)
        _check_resource_name(self.accelerator_type)
        if self.run_as_user <= 0:
            raise SettingsError(f"run-as user {self.run_as_user} must be a non-root uid (> 0), e.g. {IMAGE_UID}")
        if not self.gpu_node_selector:
            raise SettingsError("the GPU node selector is empty: GPU steps would land on any node")
        for key, value in self.gpu_node_selector:
            _check_label(key, value)
        for toleration in self.gpu_tolerations:
            _check_label(toleration.key, toleration.value or "")
            if toleration.effect not in EFFECTS:
                raise SettingsError(f"toleration effect {toleration.effect!r} is not one of {', '.join(EFFECTS)}")
        for what, quantity in (
            ("shm size", self.shm_size),
            ("GPU-step CPU request", self.gpu_cpu_request),
            ("GPU-step memory request", self.gpu_memory_request),
            ("CPU-step CPU request", self.cpu_cpu_request),
            ("CPU-step memory request", self.cpu_memory_request),
        ):
            if not _QUANTITY.fullmatch(quantity):
                raise SettingsError(f"{what} {quantity!r} is not a Kubernetes quantity (e.g. 500m, 8, 64Gi)")
        if (
            min(self.train_timeout_s, self.gpu_timeout_s, self.cpu_timeout_s) <= 0
            or min(self.gpu_retries, self.cpu_retries) < 0
        ):
            raise SettingsError("timeouts must be > 0 seconds and retries >= 0")
        if not _DURATION.fullmatch(self.retry_backoff):
            raise SettingsError(f"retry backoff {self.retry_backoff!r} must look like 120s, 5m or 1h")
        return self


def _check_dns1123(what: str, name: str) -> None:
    if not name or len(name) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise SettingsError(
            f"{what} name {name!r} is not a valid Kubernetes name "
            "(DNS-1123: lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"
        )


def _check_resource_name(name: str) -> None:
    """An extended resource name such as ``nvidia.com/gpu`` or ``amd.com/gpu``: a DNS-1123 domain, '/', a label
    name. Anything else (a newline, a space, YAML) would be refused by Kubernetes only when a GPU step starts."""
    domain, slash, resource = name.partition("/")
    if not (slash and _DNS1123_SUBDOMAIN.fullmatch(domain) and len(resource) <= 63 and resource
            and _LABEL_NAME.fullmatch(resource)):  # fmt: skip
        raise SettingsError(f"accelerator type {name!r} is not a Kubernetes resource name such as nvidia.com/gpu")


def _check_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (
        not name
        or len(name) > 63
        or not _LABEL_NAME.fullmatch(name)
        or (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.fullmatch(prefix)))
    ):
        raise SettingsError(f"invalid node label key {key!r} (e.g. lora-moe/pool or cloud.google.com/gke-nodepool)")
    if len(value) > 63 or not _LABEL_NAME.fullmatch(value):
        raise SettingsError(f"invalid node label value {value!r} for {key!r} (at most 63 of A-Z a-z 0-9 - _ .)")


def _common(task, settings: ClusterSettings, image: str, timeout_s: int, caching: bool):
    task.container_spec.image = image  # the compile's registry and tag win over the decorator's default
    task.set_caching_options(caching)
    kubernetes.set_timeout(task, timeout_s)
    # runAsUser/runAsGroup of the task container. KFP backends that know this field apply the uid and gid (the
    # backend adds allowPrivilegeEscalation: false, drop ALL and RuntimeDefault seccomp itself); older ones ignore
    # it. runAsNonRoot is sent too, but the backend source we read does not apply it: see manifests/README.md.
    kubernetes.set_security_context(
        task, run_as_user=settings.run_as_user, run_as_group=settings.run_as_user, run_as_non_root=True
    )
    if settings.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(settings.image_pull_secrets))
    return task


def gpu_task(task, settings: ClusterSettings, gpus=1, timeout_s: int | None = None, caching: bool = False):
    """Place ``task`` on the GPU pool: ``gpus`` accelerators (an int or a pipeline parameter), the pool's node
    selector and tolerations, a memory-backed ``/dev/shm``, CPU/memory requests, a timeout, retries with backoff
    (pre-empted nodes) and the trainer image. Caching is off unless asked for."""
    _common(task, settings, settings.trainer_image, timeout_s or settings.gpu_timeout_s, caching)
    task.set_accelerator_type(settings.accelerator_type).set_accelerator_limit(gpus)
    task.set_cpu_request(settings.gpu_cpu_request).set_memory_request(settings.gpu_memory_request)
    for key, value in settings.gpu_node_selector:
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in settings.gpu_tolerations:
        operator = "Equal" if toleration.value is not None else "Exists"
        kubernetes.add_toleration(
            task, key=toleration.key, operator=operator, value=toleration.value, effect=toleration.effect
        )
    kubernetes.empty_dir_mount(
        task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=settings.shm_size
    )
    if settings.gpu_retries:
        task.set_retry(num_retries=settings.gpu_retries, backoff_duration=settings.retry_backoff, backoff_factor=2.0)
    return task


def cpu_task(task, settings: ClusterSettings, image: str | None = None, caching: bool = False):
    """Place a small step on any node: the light CPU image (or ``image``), small requests, a short timeout."""
    _common(task, settings, image or settings.light_image, settings.cpu_timeout_s, caching)
    task.set_cpu_request(settings.cpu_cpu_request).set_memory_request(settings.cpu_memory_request)
    if settings.cpu_retries:
        task.set_retry(num_retries=settings.cpu_retries, backoff_duration="30s")
    return task


def use_credentials(task, settings: ClusterSettings, s3: bool = True, mlflow: bool = True):
    """Give a step MinIO and/or MLflow: credentials from the secrets (``use_secret_as_env``), endpoints as plain
    environment variables."""
    if s3:
        kubernetes.use_secret_as_env(task, secret_name=settings.s3_secret, secret_key_to_env=S3_SECRET_KEYS)
        if settings.s3_endpoint_url:
            task.set_env_variable("S3_ENDPOINT_URL", settings.s3_endpoint_url)
    if mlflow:
        kubernetes.use_secret_as_env(
            task, secret_name=settings.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True
        )
        if settings.mlflow_tracking_uri:
            task.set_env_variable("MLFLOW_TRACKING_URI", settings.mlflow_tracking_uri)
    return task


def trainjob_placement(settings: ClusterSettings) -> dict:
    """What ``gpu_task`` and ``use_credentials`` give a GPU step, for the pods of a Stage-2 TrainJob (as the
    JSON of ``lora_moe_core.training.trainjob.Placement``): the launcher passes it on at run time."""
    from lora_moe_core.training.trainjob import Placement, SecretEnv

    tolerations = [
        {"key": t.key, "operator": "Equal" if t.value is not None else "Exists", "effect": t.effect,
         **({"value": t.value} if t.value is not None else {})}
        for t in settings.gpu_tolerations
    ]  # fmt: skip
    env = {"S3_ENDPOINT_URL": settings.s3_endpoint_url, "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri}
    secret_env = [SecretEnv(name, settings.s3_secret, key) for key, name in S3_SECRET_KEYS.items()]
    secret_env += [
        SecretEnv(name, settings.mlflow_secret, key, optional=True) for key, name in MLFLOW_SECRET_KEYS.items()
    ]
    placement = Placement(
        image=settings.trainer_image,
        accelerator_type=settings.accelerator_type,
        node_selector=dict(settings.gpu_node_selector),
        tolerations=tuple(tolerations),
        cpu_request=settings.gpu_cpu_request,
        memory_request=settings.gpu_memory_request,
        shm_size=settings.shm_size,
        run_as_user=settings.run_as_user,
        image_pull_secrets=settings.image_pull_secrets,
        env={k: v for k, v in env.items() if v},  # "" leaves them to the pod's environment, as use_credentials
        secret_env=tuple(secret_env),
        timeout_s=settings.train_timeout_s,
    )
    return placement.validate().to_dict()


def launcher_task(task, settings: ClusterSettings):
    """Place the Stage-2 TrainJob launcher: a small CPU pod (the GPUs are the TrainJob's) that waits as long as
    training may run, plus a margin to see the TrainJob's own deadline pass; retried like a GPU step, and a
    retry follows or replaces the TrainJob of the first attempt."""
    _common(task, settings, settings.light_image, settings.train_timeout_s + LAUNCHER_MARGIN_S, caching=False)
    task.set_cpu_request(settings.cpu_cpu_request).set_memory_request(settings.cpu_memory_request)
    if settings.gpu_retries:
        task.set_retry(num_retries=settings.gpu_retries, backoff_duration=settings.retry_backoff, backoff_factor=2.0)
    return task
