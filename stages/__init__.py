"""The DVC stages of yem: one click command each, run as `python -m stages.<name>` (see dvc.yaml).

Importing this package configures the torch environment first: some variables are read only when torch is
imported (PYTORCH_ENABLE_MPS_FALLBACK), and every stage module is imported after this one.
"""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from yem.device import configure_environment
from yem.errors import YemError

configure_environment()


@contextmanager
def reported() -> Iterator[None]:
    """A YemError becomes one line on stderr and exit status 1; anything else keeps its traceback (a bug)."""
    try:
        yield
    except YemError as e:
        raise click.ClickException(str(e)) from None


def show_notes(notes: list[str]) -> None:
    for note in notes:
        click.echo(f"note: {note}", err=True)
    sys.stderr.flush()
