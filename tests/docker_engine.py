"""A Docker engine for the image tests: the one that answers, else ``dockerd`` started here (root only).

``running_docker_engine()`` yields a connected ``docker.DockerClient`` and the reason it has none otherwise; the
session fixture ``docker_engine`` skips with that reason. A started daemon listens on its own socket (never the
default one, so it cannot clash with an engine the machine runs later), keeps its images in ``/var/lib/lora-moe-
docker`` (so a second test run on the same machine reuses the layers) and is stopped at the end of the session.
It runs without a bridge network or iptables rules (containers use the host network), with the overlay2 storage
driver where the kernel allows it, else vfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DATA_ROOT = Path("/var/lib/lora-moe-docker")
START_TIMEOUT_S = 60


def _connect(base_url: str | None = None):
    import docker

    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
        client.ping()
        return client
    except Exception:  # noqa: BLE001 - any failure means: no engine there
        return None


def _start_dockerd(driver: str, socket: Path, log: Path) -> tuple[subprocess.Popen, object] | None:
    command = ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false", f"--storage-driver={driver}",
               f"--data-root={DATA_ROOT / driver}", f"--exec-root={socket.parent / 'exec'}",
               f"--pidfile={socket.parent / 'dockerd.pid'}", f"--host=unix://{socket}"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        client = _connect(f"unix://{socket}")
        if client is not None:
            return proc, client
        time.sleep(0.5)
    _stop(proc)
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def running_docker_engine() -> Iterator[tuple[object | None, str]]:
    """(client, "") for a working engine, else (None, why not). Sets ``DOCKER_HOST`` while a started one runs."""
    client = _connect()
    if client is not None:
        yield client, ""
        return
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        yield None, "no Docker engine answers and none can be started here (needs root and dockerd: docker.io)"
        return
    folder = Path(tempfile.mkdtemp(prefix="lora-moe-dockerd-"))
    socket, log = folder / "docker.sock", folder / "dockerd.log"
    for driver in ("overlay2", "vfs"):
        started = _start_dockerd(driver, socket, log)
        if started is not None:
            break
    if started is None:
        yield None, f"dockerd did not start with overlay2 or vfs (log: {log})"
        return
    proc, client = started
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{socket}"  # the code under test connects with docker.from_env()
    try:
        yield client, ""
    finally:
        client.close()
        if old is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = old
        _stop(proc)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_engine():
    with running_docker_engine() as (client, reason):
        if client is None:
            pytest.skip(reason)
        yield client
