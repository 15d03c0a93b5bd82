"""Which operators MPS ran on the CPU instead of its GPU (slow, and a sign that a kernel is missing).

With PYTORCH_ENABLE_MPS_FALLBACK=1 (yem.hardware.environment) torch runs an op that MPS lacks on the CPU and warns
once per process.
"""

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

_FALLBACK_WARNING = re.compile(r"The operator '([^']+)' is not currently supported on the MPS backend and will "
                               r"fall back to run on the CPU")


@contextmanager
def cpu_fallbacks() -> Iterator[list[str]]:
    """Collect the operators MPS ran on the CPU ('aten::…'), from torch's "will fall back to run on the CPU"
    warning, into the yielded list; other warnings pass through. torch warns once per process (TORCH_WARN_ONCE),
    so wrap the whole stage, from before the first MPS op, to see it."""
    found: list[str] = []
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=_FALLBACK_WARNING.pattern, category=UserWarning)

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            match = _FALLBACK_WARNING.search(str(message))
            if match is None:
                shown(message, category, filename, lineno, file, line)
            elif match.group(1) not in found:
                found.append(match.group(1))

        warnings.showwarning = show
        yield found
