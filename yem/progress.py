"""Progress bars for long work: one look for every phase (encode, latents, train, render)."""

import sys

from tqdm.auto import tqdm


def bar(total: int, desc: str, unit: str = "it") -> tqdm:
    # dynamic_ncols: survive terminal resizes; mininterval: cheap on a slow CI log
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, file=sys.stderr,
                smoothing=0.1)


def note(message: str, prefix: str = "warning") -> None:
    """A line for the user that does not break an active progress bar."""
    tqdm.write(f"{prefix}: {message}", file=sys.stderr)
