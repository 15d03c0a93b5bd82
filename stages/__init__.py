"""The DVC stages of yem: one click command each, run as `python -m stages.<name>` (see dvc.yaml).

Importing this package configures the torch environment first: some variables are read only when torch is
imported (PYTORCH_ENABLE_MPS_FALLBACK), and every stage module is imported after this one.
"""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click

from yem.errors import StopRequested, YemError
from yem.hardware.environment import configure_environment

configure_environment()

PathOption = click.Path(path_type=Path)
# The options every stage that reads params.yaml or runs torch shares; the paths come from dvc.yaml's commands.
params_option = click.option("--params", "params_path", type=PathOption, default="params.yaml", show_default=True)
hardware_option = click.option("--hardware", type=PathOption, required=True, help="the hardware record (preflight)")
log_option = click.option("--log", type=PathOption, required=True,
                          help="what ran on the CPU in place of MPS (JSON); volatile, no stage depends on it")


@contextmanager
def reported() -> Iterator[None]:
    """A YemError becomes one line on stderr and exit status 1; anything else keeps its traceback (a bug).
    A stop on request (a signal) is one line too, saying how to resume, and exit status 130."""
    try:
        yield
    except StopRequested as e:
        _stopped(str(e))
    except KeyboardInterrupt:  # Ctrl-C where the stage has no stop handling of its own, or a second Ctrl-C
        _stopped(_interrupted())
    except YemError as e:
        raise click.ClickException(str(e)) from None


def _interrupted() -> str:
    stage = os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem  # dvc names the stage it runs
    return (f"{stage}: interrupted. Run the same command again to continue: finished stages and saved checkpoints "
            f"are kept.")


def _stopped(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(StopRequested.EXIT_STATUS)


def _one_line_for_yem_errors(kind, error, traceback) -> None:
    """The same for a YemError raised outside `reported()` (writing an output after it, say): Python exits 1;
    and for Ctrl-C while the stage starts (importing torch, say)."""
    if isinstance(error, YemError):
        click.echo(f"Error: {error}", err=True)
    elif isinstance(error, KeyboardInterrupt):
        click.echo(_interrupted(), err=True)
    else:
        sys.__excepthook__(kind, error, traceback)


sys.excepthook = _one_line_for_yem_errors


def show_notes(notes: list[str]) -> None:
    """Warnings that do not stop the stage (skipped files, upscaled images, truncated captions), one line each."""
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    sys.stderr.flush()
