"""Probe this machine: choose the backend and the precision, and work out the memory budget.

The record it returns is stable (yem.hardware.record): the budget comes from totals (RAM, Metal's working set, the
card), never from free memory, and is rounded down to 0.5 GiB. It belongs with the stable facts because
`train.batch_size: auto` plans against it, so a different budget can mean a different batch and a different LoRA.
What memory looks like at this moment goes into a separate log that no stage depends on.
"""

from importlib import metadata

from yem.hardware import budget, device, fallbacks, memory, precision
from yem.hardware.record import Hardware
from yem.params import DeviceParams


def probe_hardware(params: DeviceParams) -> tuple[Hardware, dict]:
    """The stable record (-> build/preflight.json) and this moment's readings (-> logs/preflight.json)."""
    backend = device.pick_backend(params.backend)
    with fallbacks.cpu_fallbacks() as fell_back:  # the precision probe's ops: the first that MPS lacks shows up
        dtype = precision.pick_dtype(backend, params.mixed_precision)
    readings = memory.read(backend)
    limit = budget.memory_budget(readings, params.memory_limit_gib)
    record = Hardware(backend=backend, dtype=dtype, chip=device.device_name(backend),
                      memory_budget_gib=budget.stable_gib(limit.bytes), torch=metadata.version("torch"),
                      diffusers=metadata.version("diffusers"))
    return record, hardware_log(readings, limit, fell_back)


def hardware_log(readings: memory.Readings, limit: budget.Budget, fallbacks_seen: list[str]) -> dict:
    """The volatile half: what memory looks like right now, and which ops fell back to the CPU."""
    def in_gib(nbytes: int | None) -> float | None:
        return None if nbytes is None else round(nbytes / memory.GIB, 3)

    return {"memory_total_gib": in_gib(readings.total_ram),
            "memory_available_gib": in_gib(readings.available_ram), "swap_used_gib": in_gib(readings.swap_used),
            "device_memory_gib": in_gib(readings.device_total), "memory_pressure_level": readings.pressure_level,
            "memory_budget_exact_gib": in_gib(limit.bytes), "memory_budget_why": limit.why,
            "cpu_fallback_ops": fallbacks_seen}
