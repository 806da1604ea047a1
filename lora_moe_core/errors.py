"""User-facing errors: one clear line on stderr and exit code 2, never a bare traceback."""

from __future__ import annotations

import errno
import re

from lora_moe_core.redaction import redact

EXIT_USER_ERROR = 2
# Write errors that mean "the disk (or the quota, or the file-size limit) is full": the user frees space.
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system or the process's file-size limit"}  # fmt: skip


class UserError(Exception):
    """An error caused by user input (a flag, a file, a config value).

    The CLI prints ``error: <message>`` as one line and exits with code 2. Library code raises it
    instead of calling ``sys.exit`` so that callers (tests, KFP components) can catch it. Secret values from the
    environment and URL passwords in the message become ``***`` (``lora_moe_core.redaction``).
    """

    def __init__(self, message: str):
        super().__init__(" ".join(redact(str(message)).split()))  # redacted first: a secret may span lines


def disk_full_reason(exc: BaseException) -> str | None:
    """The full-disk condition behind a failed write, or None when ``exc`` is another error.

    Understands ``OSError`` and safetensors' ``SafetensorError``, whose Rust writer reports "... (os error 28)".
    """
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(exc))):
        code = int(found[1])
    return DISK_FULL.get(code)
