"""NVIDIA GPUs: temperatures, their thresholds and clock-event reasons through NVML (nvidia-ml-py)."""

import os
from dataclasses import dataclass
from typing import Any

from yem.hardware.thermal.reading import NoSensor, Reading, Sensor, ThermalState

SW_THERMAL_SLOWDOWN = 0x20  # nvmlClocksEventReasonSwThermalSlowdown: the driver trims clocks for heat
HW_THERMAL_SLOWDOWN = 0x40  # nvmlClocksEventReasonHwThermalSlowdown: hardware cut clocks (×0.5 or more)
CRITICAL_MARGIN_C = 3.0  # this close to the shutdown threshold is critical (H100: 92 of 95 °C)


@dataclass(frozen=True)
class GpuHeat:
    """One GPU's NVML readings; thresholds are None where the board does not report them."""
    celsius: float
    shutdown: float | None  # NVML_TEMPERATURE_THRESHOLD_SHUTDOWN (H100: 95)
    slowdown: float | None  # NVML_TEMPERATURE_THRESHOLD_SLOWDOWN (H100: 89)
    max_operating: float | None  # NVML_TEMPERATURE_THRESHOLD_GPU_MAX (H100: 87)
    reasons: int  # clock-event reason bits


def gpu_state(heat: GpuHeat) -> ThermalState:
    """Critical near shutdown; serious at the slowdown threshold or hardware thermal slowdown; fair at the max
    operating temperature or software thermal slowdown. Power caps and idle clocks are not heat."""
    def reached(threshold: float | None, margin: float = 0.0) -> bool:
        return threshold is not None and heat.celsius >= threshold - margin

    if reached(heat.shutdown, CRITICAL_MARGIN_C):
        return ThermalState.CRITICAL
    if heat.reasons & HW_THERMAL_SLOWDOWN or reached(heat.slowdown):
        return ThermalState.SERIOUS
    if heat.reasons & SW_THERMAL_SLOWDOWN or reached(heat.max_operating):
        return ThermalState.FAIR
    return ThermalState.NOMINAL


def describe_gpu(heat: GpuHeat) -> str:
    limits = [f"{name} at {value:.0f} °C" for name, value in (("slowdown", heat.slowdown),
                                                              ("shutdown", heat.shutdown)) if value is not None]
    causes = [name for bit, name in ((HW_THERMAL_SLOWDOWN, "HW thermal slowdown"),
                                     (SW_THERMAL_SLOWDOWN, "SW thermal slowdown")) if heat.reasons & bit]
    text = f"GPU {heat.celsius:.0f} °C" + (f" ({', '.join(limits)})" if limits else "")
    return text + (f"; clocks: {', '.join(causes)}" if causes else "")


class NvmlSensor:
    """The hottest of the GPUs this process may use. `nvml` is the pynvml module (a fake in tests)."""

    def __init__(self, nvml: Any, handles: list):
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls, nvml: Any = None, visible: str | None = None) -> "Sensor":
        """Initialise NVML for the GPUs in CUDA_VISIBLE_DEVICES (all when unset); NoSensor when NVML is absent."""
        if nvml is None:
            try:
                import pynvml as nvml  # nvidia-ml-py, a Linux-only dependency
            except ImportError:
                return NoSensor("nvidia-ml-py is not installed: no GPU temperature")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
        try:
            nvml.nvmlInit()
            return cls(nvml, _visible_handles(nvml, visible))
        except nvml.NVMLError as e:  # driver missing or mismatched, no permission, unknown UUID
            return NoSensor(f"NVML unavailable ({e})")

    def read(self) -> Reading:
        try:
            heats = [self._heat(handle) for handle in self.handles]
        except self.nvml.NVMLError as e:  # GPU lost, driver reloaded
            return Reading(ThermalState.UNKNOWN, "nvml", f"NVML read failed ({e})")
        if not heats:
            return Reading(ThermalState.UNKNOWN, "nvml", "no GPU visible to NVML")
        hottest = max(heats, key=lambda h: (gpu_state(h), h.celsius))
        return Reading(gpu_state(hottest), "nvml", describe_gpu(hottest), hottest.celsius)

    def _heat(self, handle: Any) -> GpuHeat:
        nvml = self.nvml
        return GpuHeat(celsius=float(_call(nvml, ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"),
                                           handle, nvml.NVML_TEMPERATURE_GPU)),
                       shutdown=self._threshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
                       slowdown=self._threshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
                       max_operating=self._threshold(handle, nvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX),
                       reasons=int(_call(nvml, ("nvmlDeviceGetCurrentClocksEventReasons",
                                                "nvmlDeviceGetCurrentClocksThrottleReasons"), handle)))

    def _threshold(self, handle: Any, which: int) -> float | None:
        try:
            return float(self.nvml.nvmlDeviceGetTemperatureThreshold(handle, which))
        except self.nvml.NVMLError:  # NotSupported on some boards
            return None


def _call(nvml: Any, names: tuple[str, ...], *args: Any) -> Any:
    """The first of `names` that this pynvml and driver offer (the newer NVML names replace deprecated ones)."""
    for name in names[:-1]:
        function = getattr(nvml, name, None)
        if function is not None:
            try:
                return function(*args)
            except nvml.NVMLError:  # FunctionNotFound on older drivers
                pass
    return getattr(nvml, names[-1])(*args)


def _visible_handles(nvml: Any, visible: str | None) -> list:
    """NVML handles for CUDA_VISIBLE_DEVICES entries (indices or GPU-… UUIDs); every GPU if unset or unparsed.

    Indices assume NVML's PCI order matches CUDA's; reading several GPUs and keeping the hottest makes a
    mismatch harmless on a homogeneous server."""
    entries = [e.strip() for e in (visible or "").split(",") if e.strip()]
    if visible is not None and not entries:
        return []  # CUDA_VISIBLE_DEVICES="" hides every GPU
    if entries and all(e.isdigit() or e.startswith("GPU-") for e in entries):
        return [nvml.nvmlDeviceGetHandleByIndex(int(e)) if e.isdigit() else nvml.nvmlDeviceGetHandleByUUID(e)
                for e in entries]
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
