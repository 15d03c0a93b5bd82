"""Memory readings: what the machine has (RAM, swap, the device's memory) and what this process uses.

The only module that asks torch.cuda / torch.mps / psutil / sysctl about memory. Readings come through one small
interface (`MemorySource`), so every decision made from them (yem.hardware.budget, out_of_memory) is a pure function
of `Readings` that tests replay from real machines (a 16 GB and a 64 GB Mac, a 48 GB M5 Pro).
"""

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psutil

GIB = 1024**3
MIB = 1024**2


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
        torch = self._torch or import_torch()
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


def gib(nbytes: float) -> str:
    """A size for people: GiB from 1 GiB up, MiB below (a tiny model's stages are megabytes)."""
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def used_bytes(backend: str) -> int:
    """Memory this process holds on its device now (CPU: resident set size)."""
    if backend == "cuda":
        return import_torch().cuda.memory_allocated()
    if backend == "mps":
        return import_torch().mps.driver_allocated_memory()  # includes the allocator cache and MPSGraph internals
    return psutil.Process().memory_info().rss


def _cgroup_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (cgroup v2) means no limit


def import_torch():
    import torch

    return torch

