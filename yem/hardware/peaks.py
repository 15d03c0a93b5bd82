"""Peak memory of this process on its device since a reset: what a training step or a stage really took.

CUDA has an allocator peak counter; the CPU peak is `ru_maxrss`, reset on Linux through /proc/self/clear_refs;
torch.mps has no peak counter, so the MPS peak is driver-allocated memory sampled by a background thread every few
milliseconds.
"""

import sys
import threading
import time
from pathlib import Path

from yem.hardware.memory import import_torch, used_bytes

SAMPLE_INTERVAL_S = 0.005  # MPS peak sampling period: a Metal property read, microseconds each


def peak_bytes(backend: str) -> int:
    """Peak device memory since the last `reset_peak` (CPU: peak RSS; MPS: sampled driver-allocated memory)."""
    if backend == "cuda":
        return import_torch().cuda.max_memory_allocated()
    sampler = _samplers.get(backend)
    if sampler is not None:
        return max(sampler.peak, used_bytes(backend))
    if backend == "cpu":
        return _max_rss()
    return used_bytes(backend)


def reset_peak(backend: str) -> None:
    if backend == "cuda":
        import_torch().cuda.reset_peak_memory_stats()
    elif backend == "cpu" and backend not in _samplers and _reset_linux_peak_rss():
        return
    elif backend in _samplers:
        _samplers[backend].reset()
    else:
        _samplers[backend] = _PeakSampler(lambda: used_bytes(backend))


class _PeakSampler:
    """Polls a reading on a daemon thread and keeps the highest value since the last reset."""

    def __init__(self, reading, interval_s: float = SAMPLE_INTERVAL_S):
        self._reading, self._interval_s, self._lock = reading, interval_s, threading.Lock()
        self.peak = reading()
        threading.Thread(target=self._run, name="yem-memory-peak", daemon=True).start()

    def _run(self) -> None:
        while True:
            value = self._reading()
            with self._lock:
                self.peak = max(self.peak, value)
            time.sleep(self._interval_s)

    def reset(self) -> None:
        with self._lock:
            self.peak = self._reading()


_samplers: dict[str, _PeakSampler] = {}


def _max_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _reset_linux_peak_rss() -> bool:
    """Linux resets the peak RSS (VmHWM, and ru_maxrss with it) when "5" is written to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

