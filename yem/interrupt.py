"""Stopping cleanly on request: SIGINT (Ctrl-C) or SIGTERM finish the current step, then the caller saves.

A second Ctrl-C interrupts at once (KeyboardInterrupt) for someone who really means it; the newest complete
checkpoint is still there to resume from.
"""

import signal
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stop_requests() -> Iterator[list[str]]:
    """SIGINT/SIGTERM set a flag the loop checks after each step (a second SIGINT interrupts at once)."""
    requested: list[str] = []

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
