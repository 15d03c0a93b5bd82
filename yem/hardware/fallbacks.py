"""Which operators MPS ran on the CPU instead of its GPU (slow, and a sign that a kernel is missing), and what
they cost.

With PYTORCH_ENABLE_MPS_FALLBACK=1 (yem.hardware.environment) torch runs an op that MPS lacks on the CPU: it copies
the op's inputs to the CPU (`aten::_to_cpu`), runs the CPU kernel and copies the results back. Two witnesses:

- torch's warning "The operator 'aten::…' is not currently supported on the MPS backend and will fall back to
  run on the CPU". It is a TORCH_WARN_ONCE: it names only the first such op of the whole process. So every torch
  stage listens from its start (`watching`), before its first op.
- torch's profiler, over a sampled stretch of work (`sample`): an op with `aten::_to_cpu` directly beneath it is
  a fallback (only torch's CPU fallback calls `_to_cpu`), and its total CPU time, copies included, is what it
  cost. It names every fallback op, with its time. Profiling slows the work, so it runs on MPS only and samples
  one stretch of each kind (a training window, one image, one text encoder).
"""

import re
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

_FALLBACK_WARNING = re.compile(r"The operator '([^']+)' is not currently supported on the MPS backend and will "
                               r"fall back to run on the CPU")
CPU_COPY = "aten::_to_cpu"  # what torch's CPU fallback calls first, and nothing else does
PROFILED_BACKENDS = ("mps",)  # where ops can fall back to the CPU: the only backends worth profiling


@dataclass(frozen=True)
class FallbackReport:
    """What one stage ran on the CPU in place of MPS."""
    ops: tuple[str, ...] = ()  # every op seen falling back, in the order first seen
    seconds: dict[str, float] = field(default_factory=dict)  # CPU time per op in the samples, copies included
    sampled_s: float = 0.0  # wall time of the sampled stretches of work

    @property
    def share(self) -> float | None:
        """The fallbacks' share of the sampled time (None when nothing was sampled)."""
        return sum(self.seconds.values()) / self.sampled_s if self.sampled_s else None

    def summary(self) -> str:
        """'none', or 'aten::col2im 0.12 s, aten::x (not sampled); 3.1 % of 3.9 s sampled'."""
        if not self.ops:
            return "none"
        timed = ", ".join(f"{op} {self.seconds[op]:.3g} s" if op in self.seconds else f"{op} (not sampled)"
                          for op in self.ops)
        share = self.share
        return timed + (f"; {share:.1%} of {self.sampled_s:.3g} s sampled" if share is not None else "")

    def note(self, stage: str) -> list[str]:
        """A warning line for people when anything fell back."""
        if not self.ops:
            return []
        return [f"{stage}: {len(self.ops)} op(s) ran on the CPU instead of MPS (got {self.summary()}). Upgrading "
                f"torch may add their MPS kernels; report it with `yem doctor` output if it persists."]

    def to_json(self) -> dict:
        return {"cpu_fallback_ops": list(self.ops), "cpu_fallback_seconds": self.seconds,
                "cpu_fallback_sampled_s": round(self.sampled_s, 3), "cpu_fallback_share": self.share}


class Watch:
    """Fallbacks heard from torch's warning since the watch began, and timed in sampled stretches of work."""

    def __init__(self, profile: bool):
        self.profile = profile  # sample with torch's profiler (MPS only: elsewhere nothing falls back)
        self._ops: list[str] = []
        self._seconds: dict[str, float] = {}
        self._sampled_s = 0.0
        self._kinds: set[str] = set()
        self._profiling = False  # torch's profiler does not nest

    def heard(self, op: str) -> None:
        if not any(_same_op(op, seen) for seen in self._ops):
            self._ops.append(op)

    @contextmanager
    def sample(self, kind: str) -> Iterator[None]:
        """Profile this stretch of work, if profiling and no stretch of this `kind` was profiled yet."""
        if not self.profile or kind in self._kinds or self._profiling:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        self._kinds.add(kind)
        self._profiling, start = True, time.perf_counter()
        try:
            with profile(activities=[ProfilerActivity.CPU]) as profiler:
                yield
        finally:
            self._profiling = False
        self._sampled_s += time.perf_counter() - start
        for op, seconds in fallback_seconds(profiler.events()).items():
            self.heard(op)
            name = next(seen for seen in self._ops if _same_op(op, seen))
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def report(self) -> FallbackReport:
        return FallbackReport(tuple(self._ops), {k: round(v, 4) for k, v in self._seconds.items()}, self._sampled_s)


def fallback_seconds(events) -> dict[str, float]:
    """CPU seconds per fallback op among profiler events: the ops that call `aten::_to_cpu` directly."""
    parents = {id(e.cpu_parent): e.cpu_parent for e in events if e.name == CPU_COPY and e.cpu_parent is not None}
    found: dict[str, float] = {}
    for event in parents.values():
        found[event.name] = found.get(event.name, 0.0) + event.cpu_time_total / 1e6  # µs
    return found


def _same_op(a: str, b: str) -> bool:
    """The warning names an overload ('aten::foo.out'), the profiler the op ('aten::foo')."""
    return a.split(".")[0] == b.split(".")[0]


_active: Watch | None = None


@contextmanager
def watching(backend: str) -> Iterator[Watch]:
    """Listen for fallbacks from here on, profiling samples on MPS. Inside a watch already running (a stage's,
    around the yem function it calls), that one goes on and is yielded."""
    global _active
    if _active is not None:
        yield _active
        return
    _active = Watch(profile=backend in PROFILED_BACKENDS)
    try:
        with listening(_active.heard):
            yield _active
    finally:
        _active = None


def sample(kind: str) -> AbstractContextManager:
    """Profile this stretch of work for the running watch (see Watch.sample); nothing without one."""
    return _active.sample(kind) if _active is not None else nullcontext()


@contextmanager
def listening(heard: Callable[[str], None]) -> Iterator[None]:
    """Pass the op each "will fall back to run on the CPU" warning names to `heard`, and keep it off the screen;
    other warnings pass through."""
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.filterwarnings("always", message=_FALLBACK_WARNING.pattern, category=UserWarning)

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            match = _FALLBACK_WARNING.search(str(message))
            if match is None:
                shown(message, category, filename, lineno, file, line)
            else:
                heard(match.group(1))

        warnings.showwarning = show
        yield


@contextmanager
def cpu_fallbacks() -> Iterator[list[str]]:
    """The ops named by fallback warnings inside the block, each once, into the yielded list."""
    found: list[str] = []
    with listening(lambda op: found.append(op) if op not in found else None):
        yield found
