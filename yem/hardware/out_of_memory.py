"""Running out of memory: recognising the error on every backend, reading MPS's message, and swap pressure.

- `is_out_of_memory`: CUDA's OutOfMemoryError, the MPS allocator's "MPS backend out of memory" RuntimeError (which
  accelerate's batch-size finder does not recognise), the CPU allocator's RuntimeError and Python's MemoryError.
- `memory_pressure`: swap that keeps growing during training, or macOS's critical pressure level; the training
  loop treats it like an out-of-memory error (back off the batch, see yem.training.batching).
"""

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from yem.hardware.memory import GIB, MIB, gib

SWAP_GROWTH = 512 * MIB  # swap grown this much across the window, and still growing: the working set is paged out
SWAP_WINDOW = 4  # readings (one per log window of the training loop)
MACOS_CRITICAL_PRESSURE = 4  # kern.memorystatus_vm_pressure_level: 1 normal, 2 warn, 4 critical

MPS_OOM = "MPS backend out of memory"
CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
CUDA_OOM = "CUDA out of memory"


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

