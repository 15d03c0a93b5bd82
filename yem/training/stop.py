"""Stopping cleanly on request: SIGINT (Ctrl-C), SIGTERM (kill, an IDE's stop button, a process manager) or SIGHUP
(the terminal closed) finish the current step, then the caller saves a checkpoint.

A second Ctrl-C interrupts at once (KeyboardInterrupt) for someone who really means it; the newest complete
checkpoint is still there to resume from. A signal ignored when the stage started (`nohup`, `cmd &` in a script)
stays ignored, as for any program.
"""

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@dataclass
class StopRequest:
    """Set by a signal handler; the loop checks it after each step (several processes at the window's end)."""
    signal: str | None = None  # the name of the first signal received ("SIGINT"), or None

    def __bool__(self) -> bool:
        return self.signal is not None


@contextmanager
def stop_requests() -> Iterator[StopRequest]:
    """A stop signal sets the request the loop checks after each step (a second SIGINT interrupts at once)."""
    request = StopRequest()

    def handler(signum, frame):
        if request and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.signal = request.signal or signal.Signals(signum).name

    watched = [s for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]
    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
