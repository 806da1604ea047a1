"""lora_moe_core.storage.store against a real SeaweedFS server (``weed mini``) and the local file system."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lora_moe_core.errors import UserError
from lora_moe_core.storage.store import MIN_PART_SIZE, S3Settings, Storage, is_s3, join, parse_s3, resolve_under
from tests.s3_server import S3Server

MIB = 1024 * 1024


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def store(sleeps: list[float]) -> Storage:
    """Small parts so an ~11 MiB file goes multipart; backoff recorded instead of slept."""
    return Storage(part_size=MIN_PART_SIZE, sleep=sleeps.append)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty folder: a tmp dir, or a unique prefix in the test bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    request.getfixturevalue("s3_env")
    return f"s3://test/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"


def _one_line(exc: pytest.ExceptionInfo[UserError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_parse_and_join() -> None:
    assert is_s3("s3://b/k") and not is_s3("/data/x") and not is_s3(Path("s3x"))
    assert parse_s3("s3://my-bucket/a/b.bin") == ("my-bucket", "a/b.bin")
    assert parse_s3("s3://my-bucket") == ("my-bucket", "")
    for bad in ("s3://", "s3://B/k", "s3://a/k", "s3://bad_bucket/k", "/local/path"):
        with pytest.raises(UserError):
            parse_s3(bad)
    assert join("s3://bk0/x/", "/y/", "z.bin") == "s3://bk0/x/y/z.bin"
    assert join("s3://bk0", "k") == join("s3://bk0/", "k") == "s3://bk0/k"
    assert join("/data", "a", "/b/") == "/data/a/b"
    assert Storage.join("/data") == "/data"


def test_resolve_under(tmp_path: Path) -> None:
    (tmp_path / "clips").mkdir()
    assert resolve_under(tmp_path, "clips/a.mp4") == (tmp_path / "clips" / "a.mp4").resolve()
    assert resolve_under(tmp_path, "clips/../b.txt") == (tmp_path / "b.txt").resolve()
    for bad in ("../../etc/passwd", "/etc/passwd", "clips/../../x", str(tmp_path / "clips")):
        with pytest.raises(UserError, match="escapes|must be relative") as exc:
            resolve_under(tmp_path, bad)
        _one_line(exc)
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(UserError, match="escapes"):
        resolve_under(tmp_path, "link/passwd")


def test_round_trip_bytes(store: Storage, root: str) -> None:
    uri = join(root, "dir", "blob.bin")
    assert not store.exists(uri)
    store.write_bytes(uri, b"hello")
    assert store.exists(uri) and store.read_bytes(uri) == b"hello"
    store.write_bytes(uri, b"")  # overwrite, and the empty edge case
    assert store.read_bytes(uri) == b""
    if not is_s3(root):
        assert [p.name for p in Path(root, "dir").iterdir()] == ["blob.bin"]  # no temp files left


def test_multipart_upload_download_verified(store: Storage, root: str, tmp_path: Path, s3_server: S3Server) -> None:
    src = tmp_path / "big.bin"
    data = os.urandom(11 * MIB + 123)  # three parts of 5 MiB
    src.write_bytes(data)
    uri = join(root, "big.bin")
    store.upload(src, uri)
    if is_s3(uri):
        from minio import Minio

        client = Minio(s3_server.endpoint_url[7:], s3_server.access_key, s3_server.secret_key, secure=False)
        stat = client.stat_object(*parse_s3(uri))
        assert stat.size == len(data) and stat.etag.endswith("-3")  # really multipart
        assert stat.metadata["x-amz-meta-sha256"] == hashlib.sha256(data).hexdigest()
    out = store.download(uri, tmp_path / "out" / "big.bin")
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.bin"]  # atomic: no temp file left behind
    assert store.read_bytes(uri) == data


def test_download_detects_a_corrupt_object(
    s3_env: S3Server, store: Storage, sleeps: list[float], tmp_path: Path
) -> None:
    import io

    from minio import Minio

    client = Minio(s3_env.endpoint_url[7:], s3_env.access_key, s3_env.secret_key, secure=False)
    wrong = {"x-amz-meta-sha256": hashlib.sha256(b"something else").hexdigest()}
    client.put_object("test", "corrupt/blob", io.BytesIO(b"payload"), 7, metadata=wrong)
    with pytest.raises(UserError, match="checksum mismatch after download"):
        store.download("s3://test/corrupt/blob", tmp_path / "blob")
    assert list(tmp_path.iterdir()) == [] and sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]  # retried, then refused
    client.put_object("test", "plain/blob", io.BytesIO(b"payload"), 7)  # no sha256 metadata: ETag (MD5) check
    assert store.read_bytes("s3://test/plain/blob") == b"payload"


def test_list_exists_delete(store: Storage, root: str) -> None:
    for rel in ("a/1.txt", "a/b/2.txt", "ab/3.txt"):
        store.write_bytes(join(root, rel), rel.encode())
    assert store.list(join(root, "a")) == [join(root, "a/1.txt"), join(root, "a/b/2.txt")]  # not "ab/"
    assert store.list(root + "/") == [join(root, r) for r in ("a/1.txt", "a/b/2.txt", "ab/3.txt")]
    assert store.list(join(root, "missing")) == []
    assert store.exists(join(root, "a")) and store.exists(join(root, "a/b/2.txt"))
    assert not store.exists(join(root, "a/b/9.txt")) and not store.exists(join(root, "zz"))
    store.delete(join(root, "a/1.txt"))
    store.delete(join(root, "a/1.txt"))  # deleting a missing object is fine, as in S3
    assert not store.exists(join(root, "a/1.txt"))
    assert store.list(join(root, "a")) == [join(root, "a/b/2.txt")]


def test_open_local(store: Storage, root: str) -> None:
    uri = join(root, "clip.json")
    store.write_bytes(uri, b'{"a": 1}')
    with store.open_local(uri) as path:
        assert path.name == "clip.json" and path.read_bytes() == b'{"a": 1}'
    assert path.exists() != is_s3(uri)  # the temp download is gone, the local file is not
    with pytest.raises(UserError, match="does not exist"):
        with store.open_local(join(root, "nope.json")):
            pass


def test_sync_dirs(store: Storage, root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for rel, content in {"a.txt": b"a", "sub/b.bin": os.urandom(1000), "sub/deep/c": b""}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(content)
    remote = join(root, "cache")
    assert store.sync_dir_to(src, remote) == ["a.txt", "sub/b.bin", "sub/deep/c"]
    assert store.sync_dir_to(src, remote) == []  # unchanged: nothing copied
    (src / "a.txt").write_bytes(b"changed")
    if not is_s3(root):  # local sync compares size + mtime; make sure the mtime moves
        os.utime(src / "a.txt", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert store.sync_dir_to(src, remote) == ["a.txt"]
    dst = tmp_path / "dst"
    assert store.sync_dir_from(remote, dst) == ["a.txt", "sub/b.bin", "sub/deep/c"]
    assert store.sync_dir_from(remote, dst) == []
    for rel in ("a.txt", "sub/b.bin", "sub/deep/c"):
        assert (dst / rel).read_bytes() == (src / rel).read_bytes()
    with pytest.raises(UserError, match="not a local directory"):
        store.sync_dir_to(tmp_path / "missing", remote)


@pytest.mark.parametrize("variable", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, sleeps: list[float], store: Storage, variable: str
) -> None:
    store.write_bytes("s3://test/creds/x", b"x")
    monkeypatch.setenv(variable, "wrong-Secret-9f8e7d")
    for call in (lambda: store.read_bytes("s3://test/creds/x"), lambda: store.list("s3://test/creds")):
        with pytest.raises(UserError) as exc:
            call()
        message = _one_line(exc)
        assert "access denied" in message and "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message
        assert "wrong-Secret-9f8e7d" not in message and s3_env.secret_key not in message
    assert sleeps == []  # a 403 is not retried


def test_missing_object_and_bucket(store: Storage, s3_env: S3Server, tmp_path: Path, sleeps: list[float]) -> None:
    with pytest.raises(UserError) as exc:
        store.read_bytes("s3://test/no/such/key")
    assert _one_line(exc) == "s3://test/no/such/key does not exist"
    target = tmp_path / "out.bin"
    with pytest.raises(UserError, match="does not exist"):
        store.download("s3://test/no/such/key", target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no partial file left behind
    for call in (
        lambda: store.read_bytes("s3://no-such-bucket/k"),
        lambda: store.write_bytes("s3://no-such-bucket/k", b"x"),
        lambda: store.list("s3://no-such-bucket/prefix"),
        lambda: store.delete("s3://no-such-bucket/k"),
    ):
        with pytest.raises(UserError) as exc:
            call()
        assert _one_line(exc) == "bucket 'no-such-bucket' does not exist"
    assert not store.exists("s3://no-such-bucket/k")
    assert sleeps == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_fails_fast_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    env = {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s3cr3t!"}
    sleeps: list[float] = []
    started = time.monotonic()
    with pytest.raises(UserError) as exc:
        Storage(env=env, sleep=sleeps.append).read_bytes("s3://test/k")
    message = _one_line(exc)
    assert message.startswith(f"cannot reach S3 endpoint http://127.0.0.1:{port} (") and "after 6 tries" in message
    assert "s3cr3t!" not in message
    assert sleeps == pytest.approx([0.5, 1.0, 2.0, 4.0, 8.0])  # exponential, bounded
    assert time.monotonic() - started < 2.0
    # the real sleep works too, and stays short with a tiny base
    started = time.monotonic()
    with pytest.raises(UserError, match="cannot reach"):
        Storage(env=env, tries=3, backoff_s=0.01).exists("s3://test/k")
    assert time.monotonic() - started < 1.0


def test_transient_errors_are_retried_and_access_errors_are_not(s3_env: S3Server) -> None:
    from minio.error import S3Error, ServerError

    sleeps: list[float] = []
    store = Storage(sleep=sleeps.append)
    failures = [ServerError("503", 503), ServerError("502", 502)]

    def flaky(_client: object) -> str:
        if failures:
            raise failures.pop(0)
        return "ok"

    assert store._run("s3://test/k", flaky) == "ok" and sleeps == [0.5, 1.0]

    def slow_down(_client: object) -> None:
        raise S3Error(None, "SlowDown", "Please reduce your request rate.", "/test/k", "r", "h")

    with pytest.raises(UserError, match="S3 server error SlowDown after 6 tries"):
        store._run("s3://test/k", slow_down)
    sleeps.clear()

    def denied(_client: object) -> None:
        raise S3Error(None, "AccessDenied", "Access Denied.", "/test/k", "r", "h")

    with pytest.raises(UserError, match="access denied"):
        store._run("s3://test/k", denied)
    assert sleeps == []


def test_missing_settings_name_variables_not_values(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "top-secret-value"}
    with pytest.raises(UserError) as exc:
        Storage(env=env).read_bytes("s3://test/k")
    message = _one_line(exc)
    assert "S3_ENDPOINT_URL" in message and "AWS_ACCESS_KEY_ID" in message and "top-secret-value" not in message
    assert "AWS_SECRET_ACCESS_KEY" not in message  # it is set
    bad = {"S3_ENDPOINT_URL": "minio-service:9000", "MINIO_ACCESS_KEY": "k", "MINIO_SECRET_KEY": "top-secret-value"}
    with pytest.raises(UserError, match=r"must look like http\(s\)://host\[:port\]") as exc:
        Storage(env=bad).exists("s3://test/k")
    assert "top-secret-value" not in _one_line(exc)
    settings = S3Settings.from_env({**bad, "S3_ENDPOINT_URL": "https://user:pw@s3.example.com/"})
    assert settings.endpoint_url == "https://s3.example.com" and "top-secret-value" not in repr(settings)


def test_local_errors_are_user_errors(store: Storage, tmp_path: Path) -> None:
    for call in (
        lambda: store.read_bytes(tmp_path / "missing.bin"),
        lambda: store.upload(tmp_path / "missing.bin", tmp_path / "copy.bin"),
        lambda: store.download(tmp_path / "missing.bin", tmp_path / "copy.bin"),
        lambda: store.sync_dir_from(tmp_path / "missing", tmp_path / "dst"),
    ):
        with pytest.raises(UserError, match="missing"):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match="directory"):
        store.read_bytes(tmp_path / "d")
    with pytest.raises(UserError, match="must be a local path"):
        store.upload("s3://test/k", tmp_path / "x")
    with pytest.raises(UserError, match="names a folder"):
        store.read_bytes("s3://test/folder/")
    with pytest.raises(UserError, match="not allowed"):
        store.write_bytes("s3://test/x/../../evil.txt", b"x")


def test_import_does_not_touch_minio_or_the_environment() -> None:
    code = "import sys, lora_moe_core.storage.store; assert 'minio' not in sys.modules and 'urllib3' not in sys.modules"
    env = {"PATH": os.environ.get("PATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1])
