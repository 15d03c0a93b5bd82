"""`dvc repro` as part of yem: one program to stop, one line per outcome.

`yem train` runs this module (`python -m yem.pipeline.repro`) through `group.run_as_one`. It calls dvc's Python API
in-process with the terminal untouched, so stages keep their live progress bars, and decides what to say by the type
of what went wrong, not by its text:

- a stage that fails has printed its own one-line error: dvc's echo of it ("ERROR: failed to reproduce …") is left
  out, and so is dvc's chatter (lock files, `git add dvc.lock`, `dvc push`); "Running stage" lines stay;
- dvc's own errors (a busy lock, a broken dvc.yaml, a missing dependency) and warnings print in dvc's words;
- a stage stopped on request has said how to resume (exit status StopRequested.EXIT_STATUS); a stop while dvc
  itself works (hashing, writing dvc.lock) says nothing here: `yem train` names the signal it got.
"""

import logging
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from yem.errors import StopRequested
from yem.pipeline.group import run_as_one

DONE, FAILED, INTERRUPTED = 0, 1, 2  # this module's exit statuses, besides StopRequested.EXIT_STATUS
# dvc's INFO lines worth keeping: which stage runs, or comes from the run-cache.
SHOWN = {"Running stage '%s':", "Stage '%s' is cached - skipping run, checking out outputs"}


@dataclass(frozen=True)
class Outcome:
    status: int  # what `yem train` exits with: 0 done, 1 failed, 128 + N stopped by signal N (130, 143, 129)
    said: bool  # whether a stage or dvc has already printed the line that explains it
    signal: str | None = None  # the stop signal `yem train` received ("SIGTERM"), or None


def run(project: Path, env: dict[str, str]) -> Outcome:
    """Reproduce the pipeline in `project`; return once every process it started has ended."""
    finished = run_as_one([sys.executable, "-m", __name__], cwd=project, env=env)
    stage_said_stop = finished.returncode in (StopRequested.EXIT_STATUS, -signal.SIGINT)
    if finished.stopped_by is not None:
        return Outcome(128 + finished.stopped_by, stage_said_stop, signal.Signals(finished.stopped_by).name)
    if stage_said_stop or finished.returncode == INTERRUPTED:  # the stage was sent SIGINT by someone else
        return Outcome(StopRequested.EXIT_STATUS, stage_said_stop, "SIGINT")
    return Outcome(DONE if finished.returncode == DONE else FAILED, True)


def main() -> int:
    """Reproduce the pipeline in the current folder (the child `run` starts)."""
    from dvc.exceptions import ReproductionError
    from dvc.repo import Repo

    interrupted = []

    def on_sigint(signum, frame):  # Python's own behaviour, remembered: dvc may turn the KeyboardInterrupt into
        interrupted.append(signum)  # another error while it unwinds its locks
        raise KeyboardInterrupt

    # Even when yem was started with SIGINT ignored (`yem train &` in a script), the stop it forwards must work:
    # this group has a session of its own, so no terminal's Ctrl-C reaches it, only yem's. Handled, not ignored,
    # SIGINT is back to its default in every stage dvc starts (dvc ignores it itself while a stage runs).
    signal.signal(signal.SIGINT, on_sigint)
    _quiet_dvc()
    try:
        with Repo() as repo:
            repo.reproduce()
    except KeyboardInterrupt:  # while dvc itself worked: it has released its locks
        return INTERRUPTED
    except ReproductionError as error:
        status = _stage_status(error)
        stopped = status in (StopRequested.EXIT_STATUS, -signal.SIGINT)  # the stage said how to resume
        if status is None or (status < 0 and not stopped):  # dvc's own failure, or the stage was killed
            logging.getLogger("dvc").exception("")  # its one line, as `dvc repro` prints it
        return StopRequested.EXIT_STATUS if stopped else FAILED
    except Exception:  # noqa: BLE001 - not a dvc repository, an invalid dvc.yaml, a busy lock…: dvc says which
        if interrupted:  # e.g. "Unlock called on an unlocked lock" when the interrupt hit dvc's lock handling
            return INTERRUPTED
        logging.getLogger("dvc").exception("")
        return FAILED
    return DONE


def _quiet_dvc() -> None:
    """Keep dvc's warnings and errors and the SHOWN lines; drop the rest of its INFO output."""
    def shown(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.msg in SHOWN

    for name in ("dvc", "dvc_objects", "dvc_data"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(shown)


def _stage_status(error: BaseException) -> int | None:
    """The exit status of the stage behind a ReproductionError, or None when dvc itself failed."""
    from dvc.stage.exceptions import StageCmdFailedError

    cause = error.__cause__
    if not isinstance(cause, StageCmdFailedError):
        return None
    found = re.search(r"exited with (-?\d+)$", str(cause))  # StageCmdFailedError keeps the status in its text only
    return int(found.group(1)) if found else FAILED


if __name__ == "__main__":
    sys.exit(main())
