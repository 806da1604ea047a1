"""S3 internals behind ``lora_moe_core.storage.store.Storage``: settings, checksums, error classification, client.

Nothing here touches the network or imports minio/urllib3 at import time; ``_classify`` and ``_make_client``
import them when first called. The transfers themselves are in ``lora_moe_core.storage.s3_transfer``.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from lora_moe_core.errors import UserError
from lora_moe_core.guards.urls import check_http_url

MIB = 1024 * 1024
# Uploads above this go multipart. Each transfer worker holds one part in memory, so workers × part size bounds
# the buffers (8 × 16 MiB = 128 MiB, as boto3's 10 × 8 MiB); parts stay few enough (1 600 for 25 GiB).
DEFAULT_PART_SIZE = 16 * MIB
MIN_PART_SIZE = 5 * MIB  # the S3 minimum
MAX_BACKOFF_S = 10.0  # cap on one retry wait
_MAX_PARTS = 10_000
_META_SHA256 = "x-amz-meta-sha256"
_ETAG_RE = re.compile(r"[0-9a-f]{32}(-[0-9]+)?")
_ACCESS_CODES = {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken"}
_RETRY_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}
_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound"}
_TRANSIENT = {"connect", "server", "integrity"}


def _strip_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/")


@dataclass(frozen=True)
class S3Settings:
    """Endpoint and credentials for s3:// URIs; secrets are kept out of ``repr``."""

    endpoint_url: str
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)
    session_token: str | None = field(default=None, repr=False)
    region: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """Read ``S3_ENDPOINT_URL`` or ``MLFLOW_S3_ENDPOINT_URL`` (http/https decides TLS), ``AWS_ACCESS_KEY_ID``/
        ``AWS_SECRET_ACCESS_KEY`` or ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY``, optional ``AWS_SESSION_TOKEN`` and
        ``AWS_REGION``/``AWS_DEFAULT_REGION`` now; UserError naming missing variables (never values)."""
        env = os.environ if env is None else env
        endpoint = env.get("S3_ENDPOINT_URL") or env.get("MLFLOW_S3_ENDPOINT_URL") or ""
        access = env.get("AWS_ACCESS_KEY_ID") or env.get("MINIO_ACCESS_KEY") or ""
        secret = env.get("AWS_SECRET_ACCESS_KEY") or env.get("MINIO_SECRET_KEY") or ""
        required = {
            "S3_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL)": endpoint,
            "AWS_ACCESS_KEY_ID (or MINIO_ACCESS_KEY)": access,
            "AWS_SECRET_ACCESS_KEY (or MINIO_SECRET_KEY)": secret,
        }
        if missing := [name for name, value in required.items() if not value]:
            raise UserError(f"s3:// URIs need these environment variables set: {', '.join(missing)}")
        source = "S3_ENDPOINT_URL" if env.get("S3_ENDPOINT_URL") else "MLFLOW_S3_ENDPOINT_URL"
        check_http_url(endpoint, f"S3 endpoint ({source})", allow_path=False)
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        return cls(_strip_userinfo(endpoint), access, secret, env.get("AWS_SESSION_TOKEN") or None, region)


class _IntegrityError(Exception):
    """Size or checksum mismatch after a transfer; retried like a transient failure."""


@dataclass(frozen=True)
class _Digests:
    size: int
    sha256: str
    etag: str  # the ETag S3 computes for this content uploaded with part_size (plain MD5 for one part)
    part_size: int


def _digests(stream: BinaryIO, size: int, preferred_part_size: int) -> _Digests:
    """SHA256 and expected ETag in one pass; the part size grows (MiB steps) to stay within 10 000 parts."""
    part_size = max(preferred_part_size, MIN_PART_SIZE, math.ceil(math.ceil(size / _MAX_PARTS) / MIB) * MIB)
    sha, part_md5s = hashlib.sha256(), []
    while True:
        part, filled = hashlib.md5(), 0
        while filled < part_size and (chunk := stream.read(min(MIB, part_size - filled))):
            sha.update(chunk)
            part.update(chunk)
            filled += len(chunk)
        if filled or not part_md5s:
            part_md5s.append(part.digest())
        if filled < part_size:
            break
    etag = part_md5s[0].hex()
    if len(part_md5s) > 1:
        etag = f"{hashlib.md5(b''.join(part_md5s)).hexdigest()}-{len(part_md5s)}"
    return _Digests(size, sha.hexdigest(), etag, part_size)


def _expected_checksums(headers: Mapping[str, str]) -> dict[str, str]:
    """What a download can be checked against: our SHA256 metadata, else a single-part (plain MD5) ETag."""
    if sha := headers.get(_META_SHA256):
        return {"sha256": sha.lower()}
    etag = (headers.get("etag") or "").strip('"').lower()
    return {"md5": etag} if re.fullmatch(r"[0-9a-f]{32}", etag) else {}


def _reason(exc: BaseException) -> str:
    """A short cause for a connection failure (e.g. 'Connection refused'), without object reprs."""
    current: BaseException | None = exc
    for _ in range(6):
        if current is None:
            break
        if isinstance(current, OSError) and current.strerror:
            return current.strerror
        reason = getattr(current, "reason", None)
        current = reason if isinstance(reason, BaseException) else (current.__cause__ or current.__context__)
    return type(exc).__name__


def _code(exc: BaseException) -> str:
    """The S3 error code or HTTP status of a failure, else its type name."""
    return str(getattr(exc, "code", None) or getattr(exc, "status_code", None) or type(exc).__name__)


def _classify(exc: BaseException) -> str | None:
    """'denied', 'no_bucket', 'no_key', 'server', 'connect', 'integrity' or 's3'; None: not an S3 failure."""
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(exc, _IntegrityError):
        return "integrity"
    if isinstance(exc, S3Error):
        status, code = (exc.response.status if exc.response is not None else 0), exc.code or ""
        if code in _ACCESS_CODES or status == 403:
            return "denied"
        if code in _MISSING_CODES or status == 404:
            return "no_bucket" if code == "NoSuchBucket" else "no_key"
        return "server" if code in _RETRY_CODES or status >= 500 else "s3"
    if isinstance(exc, (ServerError, InvalidResponseError)):
        status = exc.status_code if isinstance(exc, ServerError) else int(getattr(exc, "_code", 0) or 0)
        return {403: "denied", 404: "no_key"}.get(status, "server" if status >= 500 else "s3")
    if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
        return "connect"
    return None


def _make_client(settings: S3Settings, timeout_s: float, pool_size: int = 10) -> Any:
    import certifi
    import urllib3
    from minio import Minio

    # retries=False: minio's default pool retries 5x internally, which would stack with (and slow) our backoff.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=10.0, read=timeout_s),
        maxsize=pool_size,  # connections kept per host: one per transfer worker
        retries=False,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
    )
    parts = urllib.parse.urlsplit(settings.endpoint_url)
    return Minio(
        parts.netloc,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        session_token=settings.session_token,
        secure=parts.scheme == "https",
        region=settings.region,
        http_client=http,
    )
