"""User-facing errors: one clear line on stderr and exit code 2, never a bare traceback."""

from __future__ import annotations

import errno
import re
import unicodedata

from lora_moe_core.redaction import redact

EXIT_USER_ERROR = 2
# Write errors that mean "the disk (or the quota, or the file-size limit) is full": the user frees space.
DISK_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file system or the process's file-size limit"}  # fmt: skip
#: A word (a key, a path, a value) longer than this is shown by its start and end: a 100,000-part dotted key
#: quoted whole would bury the reason and flood the terminal.
MAX_WORD_CHARS = 300
#: The longest message shown; what is past it is cut (the reason comes first in every message of ours).
MAX_MESSAGE_CHARS = 4000
# Characters that must not reach a terminal raw: controls (ESC starts an ANSI sequence that recolours or moves
# the cursor, CR rewrites the line), format characters (bidi overrides and isolates, zero-width ones: text
# that displays other than it reads), lone surrogates and the line/paragraph separators.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _escape(char: str) -> str:
    if unicodedata.category(char) not in _UNSAFE_CATEGORIES:
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _shorten(word: str) -> str:
    if len(word) <= MAX_WORD_CHARS:
        return word
    return f"{word[:150]}...{word[-100:]} ({len(word):,} characters)"


def one_line(message: object) -> str:
    """``message`` made safe to print as one terminal line: whitespace runs become one space, secrets ``***``
    (:func:`~lora_moe_core.redaction.redact`), control/bidi/format characters visible escapes (``\\x1b``,
    ``\\u202e``), over-long words shortened to their ends and the whole bounded. Whatever a message quotes
    (a hostile key, a file name, a URL) cannot inject a terminal sequence or a second line."""
    text = " ".join(redact(str(message)).split())  # redacted first: a secret may span lines
    text = "".join(_escape(char) for char in text) if not text.isprintable() else text
    if any(len(word) > MAX_WORD_CHARS for word in text.split(" ")):
        text = " ".join(_shorten(word) for word in text.split(" "))
    return text if len(text) <= MAX_MESSAGE_CHARS else f"{text[:MAX_MESSAGE_CHARS]}... (message cut)"


class UserError(Exception):
    """An error caused by user input (a flag, a file, a config value).

    The CLI prints ``error: <message>`` as one line and exits with code 2. Library code raises it
    instead of calling ``sys.exit`` so that callers (tests, KFP components) can catch it. The message goes
    through :func:`one_line`: secret values from the environment and URL passwords become ``***``, control and
    bidi characters are escaped and over-long quoted words shortened, so any quoted input is safe to print.
    """

    def __init__(self, message: str):
        super().__init__(one_line(message))


class DiskFullError(UserError):
    """A write that failed because the disk (or quota, or file-size limit) is full: one line naming the file; the
    ``reason`` and ``path`` stay available to a caller that can say more (the trainer names its last save)."""

    def __init__(self, reason: str, path: object):
        self.reason, self.path = reason, path
        super().__init__(f"cannot write {path}: {reason}; free space and rerun")


class Stopped(Exception):
    """A run stopped by a signal after a clean save: the CLI prints the message as it is and exits ``exit_code``
    (128 + the signal's number, the shell's convention, so that a Job controller sees a failure, not a success)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(one_line(message))
        self.exit_code = exit_code


def disk_full_reason(exc: BaseException) -> str | None:
    """The full-disk condition behind a failed write, or None when ``exc`` is another error.

    Understands ``OSError``, safetensors' ``SafetensorError``, whose Rust writer reports "... (os error 28)", and
    errors that carry no errno but say "[Errno 27]" (PyAV's, wrapped by its muxer).
    """
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"\(os error (\d+)\)|\[Errno (\d+)\]", str(exc))):
        code = int(found[1] or found[2])
    return DISK_FULL.get(code)
