"""How ``storage.store.Storage`` moves bytes to and from S3: verified uploads that survive a server restart,
checked streaming downloads, and the worker pool of the folder syncs.

Every request goes through a ``Runner`` (``Storage._run`` bound to a URI) that retries transient failures with
bounded backoff and turns the others into one-line UserErrors. Multipart uploads call minio's own request methods
(``_create_multipart_upload``, ``_upload_part``, ``_complete_multipart_upload``, ``_abort_multipart_upload``;
minio is pinned) because its ``put_object`` cannot retry one part, keeps several parts per call in memory, and
loses its abort when the server is down.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from lora_moe_core.errors import UserError
from lora_moe_core.storage.s3_backend import _ETAG_RE, _META_SHA256, _MISSING_CODES, MIB, _Digests, _expected_checksums
from lora_moe_core.storage.s3_backend import _IntegrityError as IntegrityError

T = TypeVar("T")
R = TypeVar("R")
Runner = Callable[[Callable[[Any], Any]], Any]  # runs ``operation(client)``, retrying transient failures
Progress = Callable[[int, int], None]  # called with (bytes done so far, total bytes or -1 if unknown)
log = logging.getLogger(__name__)


class UploadLost(Exception):
    """The server no longer knows a multipart upload (aborted, wiped, or completed by a request whose reply was
    lost); the caller checks the stored object and starts over if it is not the data."""


def _part_reader(source: Path | bytes) -> contextlib.AbstractContextManager[Callable[[int, int], bytes]]:
    """``read(offset, size)`` over a file (kept open) or bytes; UserError if the file shrank meanwhile."""

    @contextlib.contextmanager
    def from_file(path: Path) -> Iterator[Callable[[int, int], bytes]]:
        def read(offset: int, size: int) -> bytes:
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise UserError(f"{path} changed while it was being uploaded")
            return data

        try:
            with open(path, "rb") as handle:
                yield read
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc}") from exc

    if isinstance(source, Path):
        return from_file(source)
    return contextlib.nullcontext(lambda offset, size: source[offset : offset + size])


def _known_upload(call: Callable[[], T]) -> T:
    """``call()``, with S3's NoSuchUpload turned into UploadLost (not an error to retry or to report as-is)."""
    from minio.error import S3Error

    try:
        return call()
    except S3Error as exc:
        if exc.code == "NoSuchUpload":
            raise UploadLost(exc.code) from exc
        raise


def upload(
    run: Runner, run_once: Runner, bucket: str, key: str, source: Path | bytes, digests: _Digests, progress: Progress
) -> None:
    """Send one object with its SHA256 as metadata: one PUT up to the part size, else a multipart upload.

    Each request is retried on its own, so after an outage a multipart upload goes on from the part that failed
    (its upload id survives a server restart), with one part in memory at a time. The object becomes visible
    only when the upload completes; if anything fails the upload is aborted (one try: the server may be gone).
    """
    metadata = {_META_SHA256: digests.sha256}
    if digests.size <= digests.part_size:
        with _part_reader(source) as read:
            data = read(0, digests.size)
        run(lambda client: client.put_object(
            bucket, key, io.BytesIO(data), len(data), metadata=metadata, part_size=digests.part_size,
            num_parallel_uploads=1,
        ))  # fmt: skip
        return progress(digests.size, digests.size)
    headers = {"Content-Type": "application/octet-stream", **metadata}
    upload_id = run(lambda client: client._create_multipart_upload(bucket, key, dict(headers)))
    try:
        parts = []
        with _part_reader(source) as read:
            for number, offset in enumerate(range(0, digests.size, digests.part_size), start=1):
                size = min(digests.part_size, digests.size - offset)
                parts.append(_upload_part(run, bucket, key, upload_id, number, read(offset, size)))
                progress(offset + size, digests.size)
        run(lambda client: _known_upload(lambda: client._complete_multipart_upload(bucket, key, upload_id, parts)))
    except UploadLost:
        raise  # nothing left to abort
    except BaseException:
        try:
            run_once(lambda client: client._abort_multipart_upload(bucket, key, upload_id))
        except Exception as exc:  # the object stays invisible; only the parts' space is held
            log.warning(
                "s3://%s/%s: could not abort multipart upload %s (%s); its parts stay on the server until a bucket "
                "lifecycle rule (AbortIncompleteMultipartUpload) removes them", bucket, key, upload_id, exc,
            )  # fmt: skip
        raise


def _upload_part(run: Runner, bucket: str, key: str, upload_id: str, number: int, data: bytes) -> Any:
    from minio.datatypes import Part

    def send(client: Any) -> str:
        return _known_upload(lambda: client._upload_part(bucket, key, data, None, upload_id, number))

    return Part(number, run(send))


def stat_or_none(run: Runner, bucket: str, key: str) -> Any | None:
    """The object's stat, None if there is no such object (a missing bucket is still an error)."""
    from minio.error import S3Error

    def stat(client: Any) -> Any | None:
        try:
            return client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_CODES and exc.code != "NoSuchBucket":
                return None
            raise

    return run(stat)


def stored_mismatch(uri: str, stat: Any | None, digests: _Digests) -> str:
    """Why the stored object is not the uploaded data: size, our SHA256 metadata, the server's ETag ('' if it is)."""
    if stat is None:
        return f"{uri}: no object after the upload"
    etag = (stat.etag or "").strip('"').lower()
    if stat.size != digests.size or (stat.metadata or {}).get(_META_SHA256, "").lower() != digests.sha256:
        return f"{uri}: stored size/sha256 differ from the local data after upload"
    if _ETAG_RE.fullmatch(etag) and etag != digests.etag:  # the server's own checksum of what it got
        return f"{uri}: stored ETag {etag} differs from the local {digests.etag}"
    return ""


def read_object(client: Any, uri: str, bucket: str, key: str, sink: BinaryIO, progress: Progress) -> None:
    """Stream one object into ``sink`` (emptied first, so a retry starts clean) and check its length and SHA256
    (our metadata) or MD5 (a single-part ETag); IntegrityError on a mismatch."""
    sink.seek(0)
    sink.truncate()
    response = client.get_object(bucket, key)
    try:
        expected, length = _expected_checksums(response.headers), response.headers.get("content-length")
        hashers = {name: hashlib.new(name) for name in expected}
        for chunk in response.stream(MIB):
            sink.write(chunk)
            for hasher in hashers.values():
                hasher.update(chunk)
            progress(sink.tell(), -1 if length is None else int(length))
        if length is not None and int(length) != sink.tell():
            raise IntegrityError(f"{uri}: got {sink.tell()} bytes, expected {length}")
        if any(hashers[name].hexdigest() != value for name, value in expected.items()):
            raise IntegrityError(f"{uri}: checksum mismatch after download")
    finally:
        response.close()
        response.release_conn()


def parallel(workers: int, items: Iterable[T], transfer: Callable[[T], R]) -> list[R]:
    """``transfer`` over ``items`` on up to ``workers`` threads, results in order. The first failure cancels what
    has not started, waits for what has, and is raised."""
    items = list(items)
    if workers <= 1 or len(items) < 2:
        return [transfer(item) for item in items]
    pool = concurrent.futures.ThreadPoolExecutor(min(workers, len(items)), "storage")
    try:  # not ``with``: its exit would still run every queued transfer after a failure or Ctrl-C
        futures = [pool.submit(transfer, item) for item in items]
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_EXCEPTION)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    # futures before the first failure had all started (the queue is FIFO), so none of them is cancelled
    return [future.result() for future in futures]
