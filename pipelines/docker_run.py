"""``lora-moe pipeline run --runner docker``: every step in its own container, from the images the cluster runs.

``kfp.local.DockerRunner`` starts each task in the image the pipeline names (``<registry>/<name>:<tag>``, built by
``lora-moe pipeline images``), as the images' non-root uid, on the host network (so loopback SeaweedFS/MinIO and
``mlflow server`` are reached as from this process). The containers see only what a pod would: the environment
listed here (endpoints and credentials, never the host's whole environment) and the run's own folders, mounted at
the same paths. Afterwards the files the containers wrote are handed back to the user who started the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.images import IMAGE_UID
from lora_moe_core.errors import UserError

# What a step container gets from this process's environment: the S3 and MLflow settings a pod gets from its
# ConfigMap and Secrets (components/k8s.py), the thread count, and KFP's MLflow integration variables.
PASSED_ENV = ("S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
              "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "MINIO_ACCESS_KEY", "MINIO_SECRET_KEY",
              "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_LOGGING_LEVEL", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID",
              "OMP_NUM_THREADS", "SSL_CERT_FILE")  # fmt: skip


@dataclass(frozen=True)
class DockerPlan:
    """What the containers of one run are given."""

    images: tuple[str, ...]  # every image the pipeline names
    folders: tuple[Path, ...]  # written by the steps, mounted at the same path (run folder, local store, sqlite's)
    environment: dict[str, str]
    pipeline_root: Path  # inside a folder; kfp.local makes it here, the containers write each task's folder in it

    def runner_args(self) -> dict:
        """Keyword arguments of ``kfp.local.DockerRunner`` (``docker`` SDK ``containers.run`` arguments)."""
        from docker.types import Mount

        # one mount per tree: a folder inside another one is already visible
        tops = [f for f in self.folders if not any(f != o and f.is_relative_to(o) for o in self.folders)]
        mounts = [Mount(target=str(f), source=str(f), type="bind") for f in tops]
        return {"network_mode": "host", "user": f"{IMAGE_UID}:{IMAGE_UID}", "environment": dict(self.environment),
                "mounts": mounts, "shm_size": "1g"}  # fmt: skip


def container_environment(env: dict[str, str]) -> dict[str, str]:
    """The variables of ``env`` that a step container receives (see ``PASSED_ENV``)."""
    return {key: env[key] for key in PASSED_ENV if env.get(key)}


def local_folders(output_dir: Path, store: str, tracking_uri: str) -> tuple[Path, ...]:
    """The host folders the steps write: the run folder, a local store, and the folder of a sqlite/file store."""
    folders = [output_dir.resolve()]
    if not store.startswith("s3://"):
        folders.append(Path(store).resolve())
    for prefix in ("sqlite:///", "file://"):
        if tracking_uri.startswith(prefix):
            path = Path(tracking_uri[len(prefix) :])
            folders.append((path.parent if prefix == "sqlite:///" else path).resolve())
    return tuple(dict.fromkeys(folders))


def engine(what: str = "--runner docker"):
    """A connected ``docker.DockerClient``; one line when no engine answers."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - the SDK raises several kinds; all mean the same to the user
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise UserError(f"{what}: no Docker engine answers at {where} ({type(exc).__name__})") from None


def check_images(client, images: tuple[str, ...]) -> None:
    """Refuse before any step runs when an image is missing (kfp.local would try to pull it from a registry)."""
    present = {tag for image in client.images.list() for tag in image.tags}
    missing = [image for image in images if image not in present]
    if missing:
        raise UserError(f"--runner docker: image {missing[0]} is not in the local engine; build it with `make images` "
                        "(lora-moe pipeline images) and pass the same --image_registry/--image_tag")  # fmt: skip


@contextmanager
def docker_runner(plan: DockerPlan) -> Iterator[object]:
    """A ``kfp.local.DockerRunner`` for ``plan``. The mounted folders are opened to the containers' uid for the run
    and given back (owner and mode) to the user who started it afterwards, also when a step failed."""
    from kfp import local

    client = engine()
    check_images(client, plan.images)
    modes = {}
    plan.pipeline_root.mkdir(parents=True, exist_ok=True)
    for folder in (*plan.folders, plan.pipeline_root):
        folder.mkdir(parents=True, exist_ok=True)
        modes[folder] = folder.stat().st_mode & 0o7777
        folder.chmod(0o777)  # the steps run as uid 10001; the folders are this user's
    try:
        yield local.DockerRunner(**plan.runner_args())
    finally:
        _give_back(client, plan, modes)


def _give_back(client, plan: DockerPlan, modes: dict[Path, int]) -> None:
    """chown what the containers wrote to this process's uid:gid (one short root container: this user may not own
    uid 10001's files), then restore the folders' modes."""
    owner = f"{os.getuid()}:{os.getgid()}"
    targets = [str(folder) for folder in plan.folders]
    volumes = {target: {"bind": target, "mode": "rw"} for target in targets}
    client.containers.run(plan.images[0], ["chown", "-R", owner, *targets], user="0:0", volumes=volumes,
                          network_mode="none", remove=True)  # fmt: skip
    for folder, mode in modes.items():
        folder.chmod(mode)
