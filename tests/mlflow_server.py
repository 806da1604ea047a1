"""A real MLflow tracking server for tests: ``mlflow server`` on loopback with a sqlite store.

``running_mlflow_server()`` is a plain context manager (usable outside pytest). Session-scoped fixtures:

- ``mlflow_server``: artifacts proxied to a local folder (``--artifacts-destination <tmp>/artifacts``);
- ``mlflow_s3_server``: artifacts proxied to ``s3://mlflow/artifacts`` on the SeaweedFS ``s3_server`` fixture
  (skipped when boto3, which MLflow's S3 artifact store needs, is not installed).

Make them global with, in ``tests/conftest.py``::

    from tests.mlflow_server import mlflow_s3_server, mlflow_server  # noqa: F401

A start takes ~13 s on a 2-core box (CLI import, sqlite migrations, then the uvicorn worker imports the app).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.s3_server import S3Server


@dataclass(frozen=True)
class MlflowServer:
    """Connection details of a running server."""

    uri: str  # http://127.0.0.1:<port>, what MLFLOW_TRACKING_URI is set to
    backend_store_uri: str
    artifacts_destination: str
    root: Path  # temp folder holding the db, the local artifacts and server.log
    start_seconds: float  # wall time from spawn to /health answering OK


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, uri: str, timeout_s: float) -> bool:
    """Poll ``/health`` until it says OK; False if the server died (e.g. lost a port race) or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200 and response.read().strip() == b"OK":
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a foreign process reused the group id
        return False
    return True


def _stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the whole group (the CLI and its uvicorn worker), then SIGKILL what is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session=True: the CLI leads its own process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


def _server_command(root: Path, port: int, artifacts_destination: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_destination,
    ]


@contextlib.contextmanager
def running_mlflow_server(
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 60.0,
    stop_grace_s: float = 10.0,
) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` in a temp dir, yield once ``/health`` is OK, stop it and clean up.

    ``artifacts_destination`` defaults to ``<tmp>/artifacts``; ``env`` adds variables for the server
    (e.g. S3 endpoint and keys for an ``s3://`` destination).
    """
    root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    destination = artifacts_destination or str(root / "artifacts")
    server_env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server_env.pop("MLFLOW_TRACKING_URI", None)
    proc: subprocess.Popen | None = None
    try:
        for _attempt in range(3):  # a port found free can be taken before the server binds it
            port = _free_port()
            uri = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            with open(root / "server.log", "ab") as log:
                proc = subprocess.Popen(
                    _server_command(root, port, destination),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=server_env,
                    cwd=root,
                    start_new_session=True,  # its own process group, so the worker is stopped with it
                )
            if _wait_healthy(proc, uri, timeout_s):
                break
            _stop(proc, stop_grace_s)
        else:
            tail = (root / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"mlflow server did not answer /health in {timeout_s:.0f} s; log tail:\n{tail}")
        yield MlflowServer(uri, f"sqlite:///{root / 'mlflow.db'}", destination, root, time.monotonic() - started)
    finally:
        if proc is not None:
            _stop(proc, stop_grace_s)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[MlflowServer]:
    """One MLflow server (local-folder artifacts) for the whole test session."""
    with running_mlflow_server() as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_s3_server(request: pytest.FixtureRequest) -> Iterator[MlflowServer]:
    """An MLflow server whose artifacts go to ``s3://mlflow/artifacts`` on the SeaweedFS test server."""
    if importlib.util.find_spec("boto3") is None:  # checked first: no S3 server is started for nothing
        pytest.skip("boto3 is not installed: MLflow's S3 artifact store needs it (pip install boto3)")
    s3_server: S3Server = request.getfixturevalue("s3_server")
    with running_mlflow_server("s3://mlflow/artifacts", env=s3_server.env()) as server:
        yield server
