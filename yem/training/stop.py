"""Stopping cleanly on request: SIGINT (Ctrl-C) or SIGTERM finish the current step, then the caller saves.

A second Ctrl-C interrupts at once (KeyboardInterrupt) for someone who really means it; the newest complete
checkpoint is still there to resume from.
"""

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class StopRequest:
    """Set by a signal handler; the loop checks it after each step (several processes at the window's end)."""
    signal: str | None = None  # the name of the first signal received ("SIGINT"), or None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM set the request the loop checks after each step (a second SIGINT interrupts at once)."""
    request = StopRequest()

    def handler(signum, frame):
        if request and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = request.signal or signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
