"""Safe shutdown on any exit: SIGTERM is made to unwind like Ctrl-C, so ``finally`` runs.

A robot process stopped by ``kill``, systemd or a container runtime gets SIGTERM, whose default
action ends Python at once: no ``finally``, no ``close``, so no stop, no park and no release of
the arm. Inside :func:`sigterm_as_interrupt` a SIGTERM raises :class:`Terminated` (a
``KeyboardInterrupt``) in the main thread instead, so the code that handles Ctrl-C handles it the
same way. Further SIGTERMs are ignored while the cleanup runs (SIGKILL still ends the process).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (raised where the main thread was, like Ctrl-C)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` once; the previous handler is restored
    on exit. Outside the main thread (where signals cannot be handled) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the cleanup this starts must not be cut short
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
