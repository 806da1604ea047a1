"""One interface over local paths and ``s3://bucket/key`` URIs (MinIO, SeaweedFS, AWS) for every stage.

S3 settings are read from the environment at call time (see ``S3Settings.from_env``) and never appear in
messages; failures become one-line ``UserError``s. Each request is retried on connection errors, 5xx/SlowDown and
checksum mismatches with bounded exponential backoff (logged as warnings); access, missing-object and
missing-bucket errors are not. Multipart uploads resume at the failed part after an outage and are aborted if
they fail; an object becomes visible only whole. Uploads store their SHA256 as ``x-amz-meta-sha256`` and are
checked against the stored size, that SHA256 and the server's ETag; downloads are checked against size and SHA256
(or a plain-MD5 ETag) and land atomically. Folder syncs move ``workers`` files at once, one part each in memory.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from lora_moe_core.errors import UserError, disk_full_reason
from lora_moe_core.guards.files import os_reason, read_regular_bytes, removed_on_failure
from lora_moe_core.storage.s3_backend import (
    _MISSING_CODES,
    _TRANSIENT,
    DEFAULT_PART_SIZE,
    MAX_BACKOFF_S,
    MIN_PART_SIZE,
    S3Settings,
    _classify,
    _code,
    _Digests,
    _digests,
    _make_client,
    _reason,
)
from lora_moe_core.storage.s3_transfer import UploadLost, parallel, read_object, stat_or_none, stored_mismatch, upload

T = TypeVar("T")
log = logging.getLogger(__name__)
PathOrUri = str | os.PathLike[str]
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_s3(uri: PathOrUri) -> bool:
    """True for ``s3://`` URIs, False for local paths."""
    return os.fspath(uri).startswith("s3://")


def parse_s3(uri: PathOrUri) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (bucket root)."""
    text = os.fspath(uri)
    if not is_s3(text):
        raise UserError(f"{text!r} is not an s3://bucket/key URI")
    bucket, _, key = text[len("s3://") :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or ".." in bucket:
        raise UserError(f"{text!r}: invalid bucket name {bucket!r} (3-63 characters of a-z, 0-9, '.', '-')")
    return bucket, key


def join(base_uri: PathOrUri, *parts: str) -> str:
    """``base/part/...`` for either kind; slashes around parts are dropped. Not a safety check: see resolve_under."""
    base = os.fspath(base_uri)
    pieces = [str(part).strip("/") for part in parts if str(part).strip("/")]
    if is_s3(base):
        parse_s3(base)
        return "/".join([base.rstrip("/"), *pieces]) if pieces else base
    return str(Path(base, *pieces))


def resolve_under(root: PathOrUri, relative: PathOrUri) -> Path:
    """``root/relative`` resolved; UserError for absolute paths and anything (``..``, symlinks) escaping root."""
    text = os.fspath(relative)
    if os.path.isabs(text):
        raise UserError(f"path {text!r} must be relative to {root}")
    try:
        base = Path(root).resolve()
        candidate = (base / text).resolve()
    except (ValueError, OSError) as exc:  # NUL bytes, symlink loops
        raise UserError(f"invalid path {text!r} under {root}: {exc}") from exc
    if not candidate.is_relative_to(base):
        raise UserError(f"path {text!r} escapes {root}")
    return candidate


def _file_digests(path: Path, preferred_part_size: int) -> _Digests:
    with _local_errors(path), open(path, "rb") as handle:
        return _digests(handle, os.fstat(handle.fileno()).st_size, preferred_part_size)


@contextlib.contextmanager
def _local_errors(path: PathOrUri, written: PathOrUri | None = None) -> Iterator[None]:
    """Turn file-system errors into one-line UserErrors; a full disk is named after ``written``."""
    try:
        yield
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename or path} does not exist") from exc
    except FileExistsError as exc:  # mkdir of a parent folder that is a file
        raise UserError(f"cannot write {written or path}: {exc.filename} is a file, not a folder") from exc
    except (IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        raise UserError(f"{exc.filename or path}: {exc.strerror}") from exc
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise UserError(f"{written or path}: {os_reason(exc)}") from exc
        if (reason := disk_full_reason(exc)) is None:
            raise
        raise UserError(f"cannot write {written or exc.filename or path}: {reason}") from exc


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; it replaces ``path`` only if the block succeeds."""
    with removed_on_failure(path.parent):  # a folder made for this file goes again when the write fails
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _local_files(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file()) if root.is_dir() else []


def _sync_local(src: Path, dst: Path) -> list[str]:
    """Copy files from src to dst whose size or mtime differ (copy2 keeps mtime); returns relative paths."""
    copied = []
    for path in _local_files(src):
        rel, stat = path.relative_to(src), path.stat()
        target = dst / rel
        if target.is_file() and (target.stat().st_size, target.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            continue
        with _local_errors(path, target), _atomic_target(target) as tmp:
            shutil.copy2(path, tmp)
        copied.append(rel.as_posix())
    return copied


class Storage:
    """Read, write, list and copy local paths and s3:// URIs with the same calls.

    Does no I/O until used. ``env`` replaces ``os.environ`` (read at each call). ``tries``, ``backoff_s``
    and ``sleep`` bound and inject the retry backoff per request (waits of ``backoff_s * 2**k``, at most 10 s;
    the defaults ride out a ~15 s outage). ``part_size`` is the preferred multipart part size and ``workers``
    how many files ``sync_dir_to``/``sync_dir_from`` move at once: each holds one part in memory, so buffers
    stay under ``workers * part_size``. ``progress(uri, done_bytes, total_bytes)`` is called, from the
    transfer threads, after each uploaded part and downloaded MiB. ``cache_dir`` is where ``open_local``
    puts its temporary downloads (system temp dir by default).
    """

    join = staticmethod(join)

    def __init__(
        self,
        *,
        env: Mapping[str, str] | None = None,
        tries: int = 6,
        backoff_s: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        part_size: int = DEFAULT_PART_SIZE,
        workers: int = 8,
        timeout_s: float = 300.0,
        cache_dir: PathOrUri | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ):
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (the S3 minimum)")
        self.tries, self.backoff_s, self.part_size, self.timeout_s = max(1, tries), backoff_s, part_size, timeout_s
        self.workers, self.cache_dir, self.progress = max(1, workers), cache_dir, progress or (lambda *_: None)
        self._env, self._sleep = env, sleep
        self._cached: tuple[S3Settings, Any] | None = None

    def _wait(self, message: str, attempt: int, tries: int) -> None:
        delay = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
        log.warning("%s; try %d of %d in %.1f s", message, attempt + 1, tries, delay)
        self._sleep(delay)

    def _run(self, uri: str, operation: Callable[[Any], T], tries: int | None = None) -> T:
        """``operation(client)``, retried with bounded backoff on transient failures (``tries`` times, default
        ``self.tries``); failures become UserErrors."""
        settings = S3Settings.from_env(self._env)
        if self._cached is None or self._cached[0] != settings:  # rebuilt when the environment changes
            self._cached = (settings, _make_client(settings, self.timeout_s, self.workers + 2))
        client, tries = self._cached[1], tries or self.tries
        for attempt in range(1, tries + 1):
            try:
                return operation(client)
            except Exception as exc:
                kind = _classify(exc)
                if kind is None:
                    raise
                if kind in _TRANSIENT and attempt < tries:
                    cause = {"connect": f"cannot reach S3 ({_reason(exc)})", "server": f"S3 error {_code(exc)}"}
                    self._wait(str(exc) if kind == "integrity" else f"{uri}: {cause[kind]}", attempt, tries)
                    continue
                raise self._user_error(uri, kind, exc, client, settings, tries) from exc
        raise AssertionError("unreachable")

    def _user_error(
        self, uri: str, kind: str, exc: BaseException, client: Any, settings: S3Settings, tries: int
    ) -> UserError:
        bucket, _ = parse_s3(uri)
        if kind == "no_key":
            with contextlib.suppress(Exception):  # a HEAD 404 does not say whether the bucket is missing
                kind = kind if client.bucket_exists(bucket) else "no_bucket"
        code = _code(exc)
        messages = {
            "denied": f"{uri}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)",
            "no_bucket": f"bucket '{bucket}' does not exist",
            "no_key": f"{uri} does not exist",
            "connect": f"cannot reach S3 endpoint {settings.endpoint_url} ({_reason(exc)}) after {tries} tries",
            "integrity": f"{exc} (after {tries} tries)",
            "server": f"{uri}: S3 server error {code} after {tries} tries",
        }
        return UserError(messages.get(kind, f"{uri}: S3 error {code}"))

    @staticmethod
    def _object(uri: str) -> tuple[str, str]:
        bucket, key = parse_s3(uri)
        if not key or key.endswith("/"):
            raise UserError(f"{uri!r} names a folder, not an object")
        if {".", ".."} & set(key.split("/")):  # minio refuses these, and they are traversal bait
            raise UserError(f"{uri!r}: '.' and '..' are not allowed in object keys")
        return bucket, key

    def _put(self, uri: str, digests: _Digests, source: Path | bytes) -> None:
        """Upload (see ``s3_transfer.upload``), then check the stored size, SHA256 and ETag; a mismatch or a lost
        multipart upload starts it over, at most ``tries`` times."""
        bucket, key = self._object(uri)
        run, once = functools.partial(self._run, uri), functools.partial(self._run, uri, tries=1)
        for attempt in range(1, self.tries + 1):
            with contextlib.suppress(UploadLost):  # the check below tells whether it completed anyway
                upload(run, once, bucket, key, source, digests, functools.partial(self.progress, uri))
            problem = stored_mismatch(uri, stat_or_none(run, bucket, key), digests)
            if not problem:
                return
            if attempt < self.tries:
                self._wait(problem, attempt, self.tries)
        raise UserError(f"{problem} (after {self.tries} tries)")

    def _fetch(self, uri: str, sink: BinaryIO) -> None:
        """Stream one object into ``sink`` and check its size and checksum (see ``s3_transfer.read_object``)."""
        bucket, key = self._object(uri)
        report = functools.partial(self.progress, uri)
        self._run(uri, lambda client: read_object(client, uri, bucket, key, sink, report))

    def _s3_objects(self, uri: str) -> dict[str, tuple[int, str]]:
        """``{relative key: (size, etag)}`` for every object under the folder ``uri``."""
        bucket, key = parse_s3(uri)
        prefix = key if not key or key.endswith("/") else key + "/"
        items = self._run(uri, lambda client: list(client.list_objects(bucket, prefix=prefix, recursive=True)))
        return {
            item.object_name[len(prefix) :]: (item.size, (item.etag or "").strip('"').lower())
            for item in items
            if not item.is_dir and not item.object_name.endswith("/")
        }

    def exists(self, uri: PathOrUri) -> bool:
        """True for an existing file/object or a non-empty folder; False if the bucket is missing."""
        text = os.fspath(uri)
        if not is_s3(text):
            return Path(text).exists()
        from minio.error import S3Error

        bucket, key = parse_s3(text)
        prefix = key if not key or key.endswith("/") else key + "/"

        def probe(client: Any) -> bool:
            try:
                if key and not key.endswith("/"):
                    try:
                        client.stat_object(bucket, key)
                        return True
                    except S3Error as exc:  # not an object, but it may still be a folder
                        if exc.code not in _MISSING_CODES:
                            raise
                return any(True for _ in client.list_objects(bucket, prefix=prefix, recursive=True))
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return False
                raise

        return self._run(text, probe)

    def read_bytes(self, uri: PathOrUri) -> bytes:
        """The whole content of a file or object."""
        text = os.fspath(uri)
        if not is_s3(text):
            return read_regular_bytes(text)  # never a FIFO or a device: reading one could block forever
        buffer = io.BytesIO()
        self._fetch(text, buffer)
        return buffer.getvalue()

    def write_bytes(self, uri: PathOrUri, data: bytes) -> None:
        """Write a whole file/object: atomically for local paths (temp + os.replace), verified for S3."""
        text, data = os.fspath(uri), bytes(data)
        if is_s3(text):
            return self._put(text, _digests(io.BytesIO(data), len(data), self.part_size), data)
        with _local_errors(text, text), _atomic_target(Path(text)) as tmp:
            tmp.write_bytes(data)

    def download(self, uri: PathOrUri, local_path: PathOrUri) -> Path:
        """Copy a file/object to a local path atomically (parents created); returns the local path."""
        text, target = os.fspath(uri), Path(local_path)
        if is_s3(local_path):
            raise UserError(f"download target {os.fspath(local_path)!r} must be a local path")
        if is_s3(text):
            self._object(text)
        with _local_errors(text, target), _atomic_target(target) as tmp:
            if not is_s3(text):
                shutil.copy2(text, tmp)
            else:
                with open(tmp, "wb") as sink:
                    self._fetch(text, sink)
        return target

    def upload(self, local_path: PathOrUri, uri: PathOrUri) -> None:
        """Copy a local file to a path/object; S3 uploads are multipart above ``part_size`` and verified."""
        if is_s3(local_path):
            raise UserError(f"upload source {os.fspath(local_path)!r} must be a local path")
        src, text = Path(local_path), os.fspath(uri)
        if is_s3(text):
            return self._put(text, _file_digests(src, self.part_size), src)
        with _local_errors(src, text), _atomic_target(Path(text)) as tmp:
            shutil.copy2(src, tmp)

    def list(self, prefix_uri: PathOrUri) -> list[str]:
        """Every file/object under a folder (recursive, sorted), as paths/URIs; [] if there are none."""
        text = os.fspath(prefix_uri)
        if not is_s3(text):
            return [str(path) for path in _local_files(Path(text))]
        base = text if text.endswith("/") else text + "/"
        return [base + rel for rel in sorted(self._s3_objects(text))]

    def sizes(self, prefix_uri: PathOrUri) -> dict[str, int]:
        """``{path or URI: size in bytes}`` of every file/object under a folder (one listing on S3)."""
        text = os.fspath(prefix_uri)
        if not is_s3(text):
            return {str(path): path.stat().st_size for path in _local_files(Path(text))}
        base = text if text.endswith("/") else text + "/"
        return {base + rel: size for rel, (size, _) in self._s3_objects(text).items()}

    def delete(self, uri: PathOrUri) -> None:
        """Delete one file/object; deleting a missing one is not an error (as in S3)."""
        text = os.fspath(uri)
        if not is_s3(text):
            with _local_errors(text):
                return Path(text).unlink(missing_ok=True)
        bucket, key = self._object(text)
        self._run(text, lambda client: client.remove_object(bucket, key))

    @contextlib.contextmanager
    def open_local(self, uri: PathOrUri) -> Iterator[Path]:
        """A local path with the content of ``uri``: the path itself, or a temp download deleted on exit."""
        text = os.fspath(uri)
        if not is_s3(text):
            if not Path(text).exists():
                raise UserError(f"{text} does not exist")
            yield Path(text)
            return
        _, key = self._object(text)
        with tempfile.TemporaryDirectory(prefix="lora-moe-s3-", dir=self.cache_dir) as tmp:
            yield self.download(text, Path(tmp) / Path(key).name)

    def sync_dir_to(self, local_dir: PathOrUri, uri: PathOrUri) -> list[str]:
        """Copy files under ``local_dir`` to ``uri/<rel>`` unless identical there (size+ETag, or size+mtime
        locally); never deletes; returns the relative paths copied."""
        src, text = Path(local_dir), os.fspath(uri)
        if is_s3(local_dir) or not src.is_dir():
            raise UserError(f"{os.fspath(local_dir)} is not a local directory")
        if not is_s3(text):
            return _sync_local(src, Path(text))
        remote = self._s3_objects(text)

        def push(path: Path) -> str | None:
            rel, digests = path.relative_to(src).as_posix(), _file_digests(path, self.part_size)
            if remote.get(rel) == (digests.size, digests.etag):
                return None
            self._put(join(text, rel), digests, path)
            return rel

        return [rel for rel in parallel(self.workers, _local_files(src), push) if rel is not None]

    def sync_file_from(self, uri: PathOrUri, local_path: PathOrUri) -> bool:
        """Download one object to ``local_path`` unless the file there is identical (size and ETag); True if copied."""
        text, target = os.fspath(uri), Path(local_path)
        parent, _, name = text.rstrip("/").rpartition("/")
        found = self._s3_objects(parent).get(name)
        if found is None:
            raise UserError(f"{text} does not exist")
        if target.is_file() and target.stat().st_size == found[0]:
            if _file_digests(target, self.part_size).etag == found[1]:
                return False
        self.download(text, target)
        return True

    def sync_dir_from(self, uri: PathOrUri, local_dir: PathOrUri) -> list[str]:
        """Copy everything under ``uri`` into ``local_dir`` unless identical there (as ``sync_dir_to``), refusing
        keys that would land outside it; never deletes; returns the relative paths copied."""
        text, dst = os.fspath(uri), Path(local_dir)
        if not is_s3(text):
            if not Path(text).is_dir():
                raise UserError(f"{text} is not a directory")
            return _sync_local(Path(text), dst)
        wanted = [(rel, size, etag, resolve_under(dst, rel)) for rel, (size, etag) in self._s3_objects(text).items()]

        def pull(item: tuple[str, int, str, Path]) -> str | None:
            rel, size, etag, target = item
            if target.is_file() and target.stat().st_size == size:
                if _file_digests(target, self.part_size).etag == etag:
                    return None
            self.download(join(text, rel), target)
            return rel

        return [rel for rel in parallel(self.workers, sorted(wanted), pull) if rel is not None]
