"""User-facing errors: one clear line on stderr and exit code 2, never a bare traceback."""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by user input (a flag, a file, a config value).

    The CLI prints ``error: <message>`` as one line and exits with code 2. Library code raises it
    instead of calling ``sys.exit`` so that callers (tests, KFP components) can catch it.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
