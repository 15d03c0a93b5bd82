"""A child process and everything it starts, run and stopped as one program with us.

The child gets a session (and process group) of its own, so a Ctrl-C typed in the terminal, a `kill` of our pid, an
IDE's stop button or a closed terminal all reach us alone; we pass the request on to the whole group as SIGINT and
wait until every process of it has gone. SIGINT, not the signal itself: dvc ignores SIGINT while a stage runs and
waits for it, and the stage saves a checkpoint on SIGINT, where a forwarded SIGTERM or SIGHUP would kill dvc at once
and leave the stage running on its own (or kill it before it saves).
"""

import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass

# SIGHUP does not exist on Windows, where process groups do not either: this module is for macOS and Linux.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
LINGER_S = 60.0  # how long processes of the group may outlive the child (a stage still saving) before SIGKILL


@dataclass(frozen=True)
class Finished:
    returncode: int  # the child's exit status (negative: killed by that signal)
    stopped_by: int | None  # the first stop signal we received while it ran, or None


def run_as_one(argv: list[str], **popen_kwargs) -> Finished:
    """Run `argv` in a session of its own; pass our first stop signal, and any later SIGINT (a second Ctrl-C means
    "now"), to its whole group as SIGINT; return once no process of the group is left."""
    received: list[int] = []
    child: subprocess.Popen | None = None

    def on_signal(signum, frame) -> None:
        received.append(signum)
        if child is not None and (len(received) == 1 or signum == signal.SIGINT):
            _interrupt(child.pid)

    # A signal ignored when we started (nohup, `cmd &` in a script) stays ignored, here and in the children.
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    try:
        child = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **popen_kwargs)
        if received:  # a signal came while the child was being started
            _interrupt(child.pid)
        returncode = child.wait()  # PEP 475: the wait resumes after each handler, so we outlive the child
        _wait_for_group(child.pid)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return Finished(returncode, received[0] if received else None)


def _interrupt(group: int) -> None:
    _signal_group(group, signal.SIGINT)  # the child leads its group: pgid == pid


def _signal_group(group: int, signum: int) -> None:
    try:
        os.killpg(group, signum)
    except ProcessLookupError:  # the group has gone already
        pass


def _wait_for_group(group: int) -> None:
    """Wait until no process of `group` is left (a shell's child may outlive the shell); kill stragglers."""
    deadline = time.monotonic() + LINGER_S
    while alive(group):
        if time.monotonic() > deadline:
            _signal_group(group, signal.SIGKILL)
            deadline = math.inf  # SIGKILL cannot be refused: wait for it to land
        time.sleep(0.05)


def alive(group: int) -> bool:
    """Whether any process of process group `group` is left."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member runs as another user: it exists
        return True
    return True
