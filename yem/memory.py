"""Memory: what the device may use (the budget), what the process uses (readings, peaks), and running out.

The only module that asks torch.cuda / torch.mps / psutil / sysctl about memory. Readings come through one small
interface (`MemorySource`), so every decision below is a pure function of `Readings` that tests replay from real
machines (a 16 GB and a 64 GB Mac, a 48 GB M5 Pro):

- `budget`: what the device may use without swapping. MPS: 90 % of Metal's recommended working set
  (`torch.mps.recommended_max_memory()`: 2/3 of RAM on a 16 GB Mac, about 3/4 from 36 GB up); CUDA: 90 % of the
  card (the CUDA context and fragmentation live outside the allocator's count); CPU: RAM minus what the OS needs.
  `device.memory_limit_gib` caps it.
- `apply_budget`: make overcommit raise instead of swap (`set_per_process_memory_fraction` on MPS and CUDA). MPS's
  default hard limit is 1.7 × the working set, more than the RAM of most Macs: without this a job that outgrows
  memory slides into swap and never reaches an error (see device.mps_watermarks for the environment half).
- `is_out_of_memory`: CUDA's OutOfMemoryError, the MPS allocator's "MPS backend out of memory" RuntimeError (which
  accelerate's batch-size finder does not recognise), the CPU allocator's RuntimeError and Python's MemoryError.
- `memory_pressure`: swap that keeps growing during training, or macOS's critical pressure level; the training
  loop treats it like an out-of-memory error (back off the batch, see yem.batching).
- peaks: CUDA has an allocator peak counter; the CPU peak is `ru_maxrss`, reset on Linux through
  /proc/self/clear_refs; torch.mps has no peak counter, so the MPS peak is driver-allocated memory sampled by a
  background thread every few milliseconds.
"""

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

from yem import device

GIB = 1024**3
MIB = 1024**2

MPS_SHARE = device.YEM_HIGH_WATERMARK  # of the recommended working set: the budget is also the hard limit
CUDA_SHARE = 0.9  # of the card: ~0.5 GB CUDA context plus allocator fragmentation stay outside max_memory_allocated
# CPU: the OS, the desktop and the page cache keep at least this much (a browser alone takes 1-3 GB).
OS_RESERVE_SHARE, OS_RESERVE_MIN = 0.2, 2 * GIB
# torch < 2.5 cannot read the working set; 2/3 of RAM is the smallest share seen (16 GB Macs: 10.67 of 16 GiB).
FALLBACK_WORKING_SET_SHARE = 2 / 3
STABLE_STEP_GIB = 0.5  # build/preflight.json keeps the budget rounded down to this, so it never jitters

SWAP_GROWTH = 512 * MIB  # swap grown this much across the window, and still growing: the working set is paged out
SWAP_WINDOW = 4  # readings (one per log window of the training loop)
MACOS_CRITICAL_PRESSURE = 4  # kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical

SAMPLE_INTERVAL_S = 0.005  # MPS peak sampling period: a Metal property read, microseconds each

MPS_OOM = "MPS backend out of memory"
CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
CUDA_OOM = "CUDA out of memory"


@dataclass(frozen=True, slots=True)
class Readings:
    """Memory facts at one moment, in bytes."""
    backend: str
    total_ram: int  # physical (unified, on a Mac) memory; a container's limit where lower
    available_ram: int  # what the OS could hand out now without swapping
    swap_used: int
    device_total: int | None  # CUDA: the card; MPS: Metal's recommended working set (torch >= 2.5); CPU: None
    pressure_level: int | None = None  # macOS only: 1 normal, 2 warn, 4 critical


class MemorySource(Protocol):
    """Where readings come from; tests pass fakes that replay real machines."""

    def ram(self) -> tuple[int, int]: ...  # (total, available)

    def swap_used(self) -> int: ...

    def device_memory(self, backend: str) -> int | None: ...

    def pressure_level(self) -> int | None: ...


class SystemMemory:
    """The real machine: psutil, torch's device APIs, cgroup limits on Linux, sysctl on macOS."""

    def __init__(self, torch_module: Any = None, psutil_module: Any = psutil, platform: str = sys.platform,
                 cgroup_files: Sequence[Path] = (Path("/sys/fs/cgroup/memory.max"),
                                                 Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))):
        self._torch, self._psutil, self._platform = torch_module, psutil_module, platform
        self._cgroup_files = cgroup_files

    def ram(self) -> tuple[int, int]:
        vm = self._psutil.virtual_memory()
        limit = min([vm.total, *filter(None, map(_cgroup_limit, self._cgroup_files))])
        return limit, min(vm.available, limit)

    def swap_used(self) -> int:
        return self._psutil.swap_memory().used

    def device_memory(self, backend: str) -> int | None:
        torch = self._torch or _import_torch()
        if backend == "cuda":
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if backend == "mps":
            recommended = getattr(torch.mps, "recommended_max_memory", None)  # added in torch 2.5
            return recommended() if recommended else None
        return None

    def pressure_level(self) -> int | None:
        if self._platform != "darwin":
            return None
        try:
            out = subprocess.run(["sysctl", "-n", "kern.memorystatus_vm_pressure_level"], capture_output=True,
                                 text=True, timeout=5)
            return int(out.stdout.strip())
        except (OSError, ValueError, subprocess.TimeoutExpired):
            return None


def read(backend: str, source: MemorySource | None = None) -> Readings:
    source = source or SystemMemory()
    total, available = source.ram()
    return Readings(backend=backend, total_ram=total, available_ram=available, swap_used=source.swap_used(),
                    device_total=source.device_memory(backend), pressure_level=source.pressure_level())


def total_bytes(backend: str) -> int:
    """The device's memory: the card's on CUDA; RAM on the CPU and on Apple Silicon (unified memory)."""
    readings = read(backend)
    return readings.device_total if backend == "cuda" and readings.device_total else readings.total_ram


@dataclass(frozen=True, slots=True)
class Budget:
    bytes: int
    why: str  # for people: "90% of the 10.7 GiB Metal working set"


def budget(readings: Readings, limit_gib: float | None = None) -> Budget:
    """What the training device may use without swapping (device.memory_limit_gib caps it)."""
    if readings.backend == "mps":
        working_set, source = readings.device_total, "Metal working set"
        if working_set is None:
            working_set, source = int(readings.total_ram * FALLBACK_WORKING_SET_SHARE), "2/3 of RAM (torch < 2.5)"
        automatic = Budget(int(working_set * MPS_SHARE), f"{MPS_SHARE:.0%} of the {gib(working_set)} {source}")
    elif readings.backend == "cuda":
        card = readings.device_total or 0
        automatic = Budget(int(card * CUDA_SHARE), f"{CUDA_SHARE:.0%} of the {gib(card)} card")
    else:
        reserve = max(OS_RESERVE_MIN, int(readings.total_ram * OS_RESERVE_SHARE))
        automatic = Budget(readings.total_ram - reserve,
                           f"{gib(readings.total_ram)} RAM less {gib(reserve)} for the OS")
    if limit_gib is not None and limit_gib * GIB < automatic.bytes:
        return Budget(int(limit_gib * GIB), f"device.memory_limit_gib (automatic: {gib(automatic.bytes)}, "
                                            f"{automatic.why})")
    return automatic


def stable_gib(nbytes: int) -> float:
    """The budget as build/preflight.json keeps it: rounded down to 0.5 GiB, identical on every run."""
    return STABLE_STEP_GIB * int(nbytes / GIB / STABLE_STEP_GIB)


def apply_budget(limit: Budget, readings: Readings, env: Mapping[str, str] = os.environ,
                 torch_module: Any = None) -> str:
    """Cap this process's device allocations at the budget, so overcommit raises (and the batch backs off)
    instead of swapping. Call before the first large allocation. Returns what was done, for the log."""
    torch = torch_module or _import_torch()
    if readings.backend == "mps":
        if readings.device_total is None:
            return "MPS: working set unknown (torch < 2.5): torch's default hard limit stays"
        if device.user_high_watermark(env):
            return (f"MPS: {device.MPS_HIGH_WATERMARK}={env[device.MPS_HIGH_WATERMARK]} is set in the environment; "
                    f"yem leaves that hard limit as it is")
        fraction = limit.bytes / readings.device_total
        torch.mps.set_per_process_memory_fraction(float(fraction))
        return f"MPS allocations capped at {gib(limit.bytes)} ({fraction:.2f} × the working set)"
    if readings.backend == "cuda" and readings.device_total:
        fraction = limit.bytes / readings.device_total
        torch.cuda.set_per_process_memory_fraction(float(fraction))
        return f"CUDA allocations capped at {gib(limit.bytes)} ({fraction:.2f} of the card)"
    return "CPU: no allocator limit; swap growth is watched instead"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` means the device ran out of memory (then a smaller batch may fit)."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    cuda_oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if cuda_oom is not None and isinstance(error, cuda_oom):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in (MPS_OOM, CPU_OOM, CUDA_OOM))


@dataclass(frozen=True, slots=True)
class MpsOutOfMemory:
    """The numbers in MPSAllocator.mm's message (bytes); max_allowed is None when the high watermark is off."""
    allocated: int
    other: int  # 0 where the message leaves it out
    max_allowed: int | None
    requested: int
    pool: str  # "private" or "shared"


_SIZE = r"([\d.]+ (?:bytes|[KMG]i?B))"
_MPS_OOM_PATTERN = re.compile(MPS_OOM + r" \(MPS allocated: " + _SIZE + r"(?:, other allocations: " + _SIZE
                              + r")?(?:, max allowed: " + _SIZE + r")?\)\.\s*Tried to allocate " + _SIZE
                              + r" on (private|shared) pool")


def parse_mps_oom(message: str) -> MpsOutOfMemory | None:
    """Read torch's MPS out-of-memory message. Sizes are binary whether printed as GB (torch < 2.4) or GiB."""
    found = _MPS_OOM_PATTERN.search(message)
    if not found:
        return None
    allocated, other, allowed, requested, pool = found.groups()
    return MpsOutOfMemory(allocated=_size(allocated), other=_size(other) if other else 0,
                          max_allowed=_size(allowed) if allowed else None, requested=_size(requested), pool=pool)


def _size(text: str) -> int:
    number, unit = text.split()
    scale = {"bytes": 1, "K": 1024, "M": MIB, "G": GIB}[unit if unit == "bytes" else unit[0]]
    return int(float(number) * scale)


def memory_pressure(swap_history: Sequence[int], pressure_level: int | None = None) -> str | None:
    """Why the machine is short of memory now, or None. `swap_history`: swap used, oldest first, one reading
    per log window. Swap that jumps once and stays flat (the OS moving idle apps out of the way) is fine; swap
    that grew by SWAP_GROWTH across the window and rose in each of the last two readings is the training's own
    working set being paged out."""
    if pressure_level is not None and pressure_level >= MACOS_CRITICAL_PRESSURE:
        return "macOS reports critical memory pressure"
    recent = list(swap_history[-SWAP_WINDOW:])
    if len(recent) >= 3 and recent[-1] > recent[-2] > recent[-3] and recent[-1] - min(recent) >= SWAP_GROWTH:
        return f"swap grew by {gib(recent[-1] - min(recent))} over the last {len(recent)} readings and still grows"
    return None


def gib(nbytes: float) -> str:
    """A size for people: GiB from 1 GiB up, MiB below (a tiny model's stages are megabytes)."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


# ---- what this process uses --------------------------------------------------------------------------------------

def used_bytes(backend: str) -> int:
    """Memory this process holds on its device now (CPU: resident set size)."""
    if backend == "cuda":
        return _import_torch().cuda.memory_allocated()
    if backend == "mps":
        return _import_torch().mps.driver_allocated_memory()  # includes the allocator cache and MPSGraph internals
    return psutil.Process().memory_info().rss


def peak_bytes(backend: str) -> int:
    """Peak device memory since the last `reset_peak` (CPU: peak RSS; MPS: sampled driver-allocated memory)."""
    if backend == "cuda":
        return _import_torch().cuda.max_memory_allocated()
    sampler = _samplers.get(backend)
    if sampler is not None:
        return max(sampler.peak, used_bytes(backend))
    if backend == "cpu":
        return _max_rss()
    return used_bytes(backend)


def reset_peak(backend: str) -> None:
    if backend == "cuda":
        _import_torch().cuda.reset_peak_memory_stats()
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


def _cgroup_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2) means no limit


def _import_torch():
    import torch

    return torch

