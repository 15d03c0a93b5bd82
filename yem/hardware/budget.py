"""The memory budget: what the training device may use without swapping, and holding the process to it.

- `budget`: MPS: 90 % of Metal's recommended working set (`torch.mps.recommended_max_memory()`: 2/3 of RAM on a
  16 GB Mac, about 3/4 from 36 GB up); CUDA: 90 % of the card (the CUDA context and fragmentation live outside
  the allocator's count); CPU: RAM minus what the OS needs. `device.memory_limit_gib` caps it.
- `apply_budget`: make overcommit raise instead of swap (`set_per_process_memory_fraction` on MPS and CUDA). MPS's
  default hard limit is 1.7 × the working set, more than the RAM of most Macs: without this a job that outgrows
  memory slides into swap and never reaches an error (see environment.mps_watermarks for the environment half).
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from yem.hardware import environment
from yem.hardware.memory import GIB, Readings, gib, import_torch

MPS_SHARE = environment.YEM_HIGH_WATERMARK  # of the recommended working set: the budget is also the hard limit
CUDA_SHARE = 0.9  # of the card: ~0.5 GB CUDA context plus allocator fragmentation stay outside max_memory_allocated
# CPU: the OS, the desktop and the page cache keep at least this much (a browser alone takes 1-3 GB).
OS_RESERVE_SHARE, OS_RESERVE_MIN = 0.2, 2 * GIB
# torch < 2.5 cannot read the working set; 2/3 of RAM is the smallest share seen (16 GB Macs: 10.67 of 16 GiB).
FALLBACK_WORKING_SET_SHARE = 2 / 3
STABLE_STEP_GIB = 0.5  # build/preflight.json keeps the budget rounded down to this, so it never jitters


@dataclass(frozen=True, slots=True)
class Budget:
    bytes: int
    why: str  # for people: "90% of the 10.7 GiB Metal working set"


def memory_budget(readings: Readings, limit_gib: float | None = None) -> Budget:
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
    torch = torch_module or import_torch()
    if readings.backend == "mps":
        if readings.device_total is None:
            return "MPS: working set unknown (torch < 2.5): torch's default hard limit stays"
        if environment.user_high_watermark(env):
            high = environment.MPS_HIGH_WATERMARK
            return f"MPS: {high}={env[high]} is set in the environment; yem leaves that hard limit as it is"
        fraction = limit.bytes / readings.device_total
        torch.mps.set_per_process_memory_fraction(float(fraction))
        return f"MPS allocations capped at {gib(limit.bytes)} ({fraction:.2f} × the working set)"
    if readings.backend == "cuda" and readings.device_total:
        fraction = limit.bytes / readings.device_total
        torch.cuda.set_per_process_memory_fraction(float(fraction))
        return f"CUDA allocations capped at {gib(limit.bytes)} ({fraction:.2f} of the card)"
    return "CPU: no allocator limit; swap growth is watched instead"

