"""Signals that stop a command cleanly: SIGTERM ends training after the current step, Ctrl-C waits for a publish.

Kubernetes (and torchrun, forwarding it to its workers) sends SIGTERM, then SIGKILL after the grace period
(``terminationGracePeriodSeconds``, 30 s by default). :class:`GracefulStop` turns the first SIGTERM into a flag
that the training loop reads after each optimizer step, so the run saves and exits 143 instead of dying
mid-step; a second SIGTERM, or a SIGINT after it, means "now" and ends the process at once, by the signal,
as the default action would have (a save it cut short is removed on resume).

:func:`deferred_interrupts` holds a SIGINT back over a short critical section (renaming a cache entry's staged
files into place, removing a staging folder), so that Ctrl-C never leaves half an entry visible; the
interrupt is raised, as the usual ``KeyboardInterrupt``, when the section ends.

Both only act in the main thread, the one Python delivers signals to; elsewhere they change nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class GracefulStop:
    """While inside ``with GracefulStop() as stop:``, ``stop.signal`` is the name of the first SIGTERM's signal
    (``"SIGTERM"``), or None while none came. The previous handlers are restored on exit."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if _in_main_thread():
            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._first)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _first(self, number: int, frame: FrameType | None) -> None:
        self.signal = signal.Signals(number).name
        signal.signal(signal.SIGTERM, _die)
        self._previous.setdefault(signal.SIGINT, signal.signal(signal.SIGINT, _die))


def _die(number: int, frame: FrameType | None) -> None:
    """The signal's default action, now: the process ends by it (exit status 128 + its number in a shell)."""
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Run the block to its end despite Ctrl-C; a SIGINT that came meanwhile raises KeyboardInterrupt after it."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):  # Python's default handler raises KeyboardInterrupt
        previous(signal.SIGINT, None)
