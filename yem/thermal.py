"""Heat: how hot the training device runs, and whether training should go on, pause or stop.

A sensor is anything with `read() -> Reading`; `detect(backend)` picks the one for the training device:
macOS `NSProcessInfo.thermalState` (ctypes on libobjc: no sudo, no pyobjc), NVIDIA through NVML, Linux
`/sys/class/thermal` zones, and a sensor that always reads "unknown" where none exists (a cloud GPU VM). A
sensor never raises: a failed read is an "unknown" reading with the reason in its detail.

Counters can read "nominal" while a Mac's GPU down-clocks, so the `Governor` also compares each log window's
step time with a warm baseline and treats a sustained slowdown like the "serious" state. Its decisions are a
pure function of readings, step times and an injected clock. The training loop calls, once per log window:

    sensor = thermal.detect(backend)
    governor = thermal.Governor(params.thermal.policy, params.thermal.max_pause_s, watch_speed=backend != "cpu")
    ...
    action = governor.observe(sensor.read(), seconds_per_step)  # step time without checkpoint saving
    if action is not thermal.Action.CONTINUE:
        <save a checkpoint>
        if action is thermal.Action.PAUSE:
            action = governor.wait_until_cool(sensor.read, time.sleep)
        if action is thermal.Action.STOP:
            raise governor.stop_error(step, total_steps)
        <restart the window clock: the pause is not step time>
    ...
    metrics.update(governor.metrics())  # throttled minutes, pauses, worst state

`governor.totals` (a dataclass of plain numbers) can ride in the checkpoint and be passed back as
`Governor(..., totals=Totals(**saved))` so a resumed run reports the whole run. Call `governor.rebase()` when the
work per step changes (an out-of-memory back-off halving the batch), so the old speed is no longer the reference.
Policy `ignore` still measures everything but always continues. Leave the step-time watch off on the CPU, where
other processes swing the step time far more than heat does (10× between windows on a busy 2-core machine). In
multi-process training every rank must act on the same decision (e.g. rank 0's, broadcast), or the others wait in
the next all-reduce.
"""

import ctypes
import enum
import os
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from yem.errors import TrainingStopped


class ThermalState(enum.IntEnum):
    """Ordered like macOS's NSProcessInfoThermalState (nominal 0 … critical 3); unknown sorts below all."""
    UNKNOWN = -1
    NOMINAL = 0
    FAIR = 1  # warm; clocks may be trimmed (NVML software slowdown, Linux passive trip)
    SERIOUS = 2  # performance is being cut to shed heat: pause
    CRITICAL = 3  # close to emergency shutdown: stop

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Reading:
    state: ThermalState
    source: str  # "macos", "nvml", "sysfs" or "none"
    detail: str  # for people: "GPU 84 °C (slowdown at 89 °C)"
    celsius: float | None = None  # the hottest temperature seen, where the source gives one


class Sensor(Protocol):
    def read(self) -> Reading: ...


class NoSensor:
    """Where nothing reports heat: always unknown, so only the step-time watch applies."""

    def __init__(self, why: str = "no thermal sensor on this machine"):
        self.why = why

    def read(self) -> Reading:
        return Reading(ThermalState.UNKNOWN, "none", self.why)


def detect(backend: str, platform: str = sys.platform) -> Sensor:
    """The sensor for the training device `backend` (cuda, mps or cpu) on this machine."""
    if platform == "darwin":
        return MacSensor()  # system-wide: covers the GPU (mps) and the CPU alike
    if backend == "cuda":
        return NvmlSensor.open()
    if platform.startswith("linux"):
        return SysfsSensor()
    return NoSensor(f"no thermal sensor known for {platform}")


# ---- macOS: NSProcessInfo.thermalState -------------------------------------------------------------------------

FOUNDATION = "/System/Library/Frameworks/Foundation.framework/Foundation"
LIBOBJC = "/usr/lib/libobjc.A.dylib"


def mac_state(value: int) -> ThermalState:
    """NSProcessInfoThermalState 0-3 (nominal, fair, serious, critical) to a ThermalState."""
    return ThermalState(value) if 0 <= value <= 3 else ThermalState.UNKNOWN


def objc_thermal_state() -> Callable[[], int]:
    """A function returning `[[NSProcessInfo processInfo] thermalState]`; loads libobjc only when called."""
    ctypes.CDLL(FOUNDATION)  # registers the NSProcessInfo class with the runtime
    objc = ctypes.CDLL(LIBOBJC)
    objc.objc_getClass.argtypes = objc.sel_registerName.argtypes = [ctypes.c_char_p]
    objc.objc_getClass.restype = objc.sel_registerName.restype = ctypes.c_void_p
    address = ctypes.cast(objc.objc_msgSend, ctypes.c_void_p).value
    # arm64 objc_msgSend must be called through the method's exact prototype (it is not variadic there), so
    # each return type gets its own function object rather than mutating the shared objc_msgSend.restype.
    send_id = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(address)
    send_long = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)(address)  # NSInteger
    process_info = send_id(objc.objc_getClass(b"NSProcessInfo"), objc.sel_registerName(b"processInfo"))
    if not process_info:
        raise OSError("NSProcessInfo is not available")
    selector = objc.sel_registerName(b"thermalState")
    return lambda: send_long(process_info, selector)


class MacSensor:
    """macOS's thermal state, as apps see it. `query` returns the raw enum value (injected by tests)."""

    def __init__(self, query: Callable[[], int] | None = None):
        self._query = query

    def read(self) -> Reading:
        try:
            if self._query is None:
                self._query = objc_thermal_state()
            value = int(self._query())
        except (OSError, AttributeError, ValueError) as e:
            return Reading(ThermalState.UNKNOWN, "macos", f"thermalState unreadable ({e})")
        state = mac_state(value)
        return Reading(state, "macos", f"macOS thermal state {state.label} ({value})")


# ---- NVIDIA: NVML ----------------------------------------------------------------------------------------------

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


# ---- Linux: /sys/class/thermal ---------------------------------------------------------------------------------

SYSFS_THERMAL = Path("/sys/class/thermal")
TRIP_STATES = {"passive": ThermalState.FAIR, "hot": ThermalState.SERIOUS, "critical": ThermalState.CRITICAL}
NEAR_CRITICAL_C = 5.0  # the kernel powers off at the critical trip: this close is already serious


def zone_state(celsius: float, trips: list[tuple[str, float]]) -> ThermalState:
    """One zone against its trip points (type, °C): passive → fair, hot → serious, critical → critical.
    Active trips only start fans, so they are ignored."""
    state = ThermalState.NOMINAL
    for kind, limit in trips:
        if kind in TRIP_STATES and celsius >= limit:
            state = max(state, TRIP_STATES[kind])
        if kind == "critical" and celsius >= limit - NEAR_CRITICAL_C:
            state = max(state, ThermalState.SERIOUS)
    return state


class SysfsSensor:
    """The hottest enabled thermal zone relative to its trip points; unknown when there are none."""

    def __init__(self, root: Path = SYSFS_THERMAL):
        self.root = root

    def read(self) -> Reading:
        zones = [zone for zone in map(_read_zone, sorted(self.root.glob("thermal_zone*"))) if zone is not None]
        if not zones:
            return Reading(ThermalState.UNKNOWN, "sysfs", f"no readable thermal zone in {self.root}")
        name, celsius, trips = max(zones, key=lambda z: (zone_state(z[1], z[2]), z[1]))
        state = zone_state(celsius, trips)
        limits = ", ".join(f"{kind} {limit:.0f} °C" for kind, limit in trips if kind in TRIP_STATES)
        return Reading(state, "sysfs", f"{name} {celsius:.0f} °C" + (f" (trips: {limits})" if limits else ""),
                       celsius)


def _read_zone(zone: Path) -> tuple[str, float, list[tuple[str, float]]] | None:
    """(type, °C, [(trip type, °C)]) of a zone, or None when disabled or unreadable (values are in m°C)."""
    try:
        if (zone / "mode").exists() and (zone / "mode").read_text().strip() == "disabled":
            return None
        celsius = int((zone / "temp").read_text()) / 1000
        name = (zone / "type").read_text().strip() if (zone / "type").exists() else zone.name
        trips = []
        for trip in sorted(zone.glob("trip_point_*_temp")):
            limit = int(trip.read_text()) / 1000
            kind = trip.with_name(trip.name.replace("_temp", "_type")).read_text().strip()
            if limit > 0:  # firmware reports 0 or negative values for unused trips
                trips.append((kind, limit))
    except (OSError, ValueError):  # sensors that are off answer EIO/ENODATA
        return None
    return name, celsius, trips


# ---- the governor ----------------------------------------------------------------------------------------------

# The warm baseline is the lowest median of BASELINE_WINDOWS consecutive windows: one odd window never sets it,
# and slow first windows (kernels compiling, caches filling) are replaced as soon as faster ones follow.
BASELINE_WINDOWS = 3
SLOWDOWN = 1.3  # a window this many times slower than the baseline is slow
SUSTAINED_WINDOWS = 3  # slow windows in a row, lasting at least SUSTAINED_S, count as throttling
SUSTAINED_S = 120.0  # thermal time constants are minutes; noise on a busy machine lasts seconds
COOLDOWN_S = 120.0  # a pause caused by slowdown alone (the sensor says nothing) lasts this long
POLL_S = 10.0  # seconds between sensor reads while paused


class Action(enum.Enum):
    CONTINUE = "continue"
    PAUSE = "pause"  # save a checkpoint, then wait_until_cool
    STOP = "stop"  # save a checkpoint, then raise stop_error


def decide(policy: str, state: ThermalState, slowed: bool) -> Action:
    """The policy table: critical stops, serious (or a sustained slowdown) pauses or stops, ignore continues."""
    if policy == "ignore":
        return Action.CONTINUE
    if state is ThermalState.CRITICAL:
        return Action.STOP
    if state is ThermalState.SERIOUS or slowed:
        return Action.PAUSE if policy == "pause" else Action.STOP
    return Action.CONTINUE


@dataclass
class Totals:
    """What the governor has accounted so far; plain numbers, so a checkpoint can carry them over a resume."""
    throttled_s: float = 0.0  # time in windows that ended at fair or worse, or ran slow
    paused_s: float = 0.0
    pauses: int = 0
    worst: str = ThermalState.UNKNOWN.label


class Governor:
    """Turns readings and step times into actions under `thermal.policy`; time comes from `clock`."""

    def __init__(self, policy: str, max_pause_s: float, clock: Callable[[], float] = time.monotonic,
                 totals: Totals | None = None, watch_speed: bool = True):
        self.policy, self.max_pause_s, self._clock, self.watch_speed = policy, max_pause_s, clock, watch_speed
        self.totals = totals or Totals()
        self.source = "none"
        self._last = clock()
        self._reason = ""
        self._slow_cause = False  # the pending action comes from the step-time watch, not the sensor
        self._slow_pauses = 0  # slowdown pauses since the last fast window
        self.rebase()

    def rebase(self) -> None:
        """Forget the speed reference: the work per step changed (batch size) or training starts afresh."""
        self.slowdown: float | None = None  # the last window's step time / the warm baseline
        self._recent: deque[float] = deque(maxlen=BASELINE_WINDOWS)
        self._baseline: float | None = None
        self._slow_since: float | None = None
        self._slow_windows = 0

    def observe(self, reading: Reading, step_seconds: float | None) -> Action:
        """Account the window that just ended and decide what the loop does next."""
        now = self._clock()
        window_start, self._last = self._last, now
        sustained = self._track_speed(step_seconds, window_start, now) if self.watch_speed else False
        self._note(reading)
        if reading.state >= ThermalState.FAIR or (self.slowdown or 0) >= SLOWDOWN:
            self.totals.throttled_s += now - window_start
        if sustained and self._slow_pauses and self.policy == "pause":
            self.rebase()  # a cool-down did not bring the speed back: not heat, so accept the new speed
            sustained = False
        action = decide(self.policy, reading.state, sustained)
        self._slow_cause = action is not Action.CONTINUE and reading.state < ThermalState.SERIOUS
        if action is not Action.CONTINUE:
            self._reason = self._explain(reading)
        return action

    def wait_until_cool(self, read: Callable[[], Reading], sleep: Callable[[float], None]) -> Action:
        """Pause until the state falls back below serious (after a slowdown alone: COOLDOWN_S) or max_pause_s
        passes: CONTINUE. STOP if the device turns critical meanwhile."""
        start, action = self._clock(), Action.CONTINUE
        least = min(COOLDOWN_S, self.max_pause_s) if self._slow_cause else 0.0
        self.totals.pauses += 1
        self._slow_pauses += self._slow_cause
        while (waited := self._clock() - start) < self.max_pause_s:
            reading = read()
            self._note(reading)
            if reading.state is ThermalState.CRITICAL:
                self._reason, action = self._explain(reading), Action.STOP
                break
            if reading.state < ThermalState.SERIOUS and waited >= least:
                break
            sleep(min(POLL_S, self.max_pause_s - waited))
        self._last = self._clock()  # paused time is neither step time nor throttled time
        self.totals.paused_s += self._last - start
        self._slow_since, self._slow_windows = None, 0
        return action

    def stop_error(self, step: int, total: int) -> TrainingStopped:
        return TrainingStopped(
            f"train: stopped for heat after step {step}/{total}, a checkpoint was saved (got {self._reason}). "
            f"Let the machine cool down, then rerun `dvc repro` (or the same command) to resume; "
            f"thermal.policy: ignore trains through the heat.")

    def metrics(self) -> dict:
        return {"thermal_policy": self.policy, "thermal_source": self.source, "thermal_worst": self.totals.worst,
                "thermal_throttled_min": round(self.totals.throttled_s / 60, 2),
                "thermal_pauses": self.totals.pauses, "thermal_paused_min": round(self.totals.paused_s / 60, 2)}

    def _track_speed(self, step_seconds: float | None, window_start: float, now: float) -> bool:
        """Update the warm baseline with this window; True when steps have been slow long enough."""
        if step_seconds is None or step_seconds <= 0:  # a window the loop could not time
            self.slowdown = None
            return False
        self._recent.append(step_seconds)
        if len(self._recent) == BASELINE_WINDOWS:
            typical = statistics.median(self._recent)
            self._baseline = typical if self._baseline is None else min(self._baseline, typical)
        self.slowdown = step_seconds / self._baseline if self._baseline else None
        if self.slowdown is None or self.slowdown < SLOWDOWN:
            self._slow_since, self._slow_windows, self._slow_pauses = None, 0, 0
            return False
        self._slow_since = window_start if self._slow_since is None else self._slow_since
        self._slow_windows += 1
        return self._slow_windows >= SUSTAINED_WINDOWS and now - self._slow_since >= SUSTAINED_S

    def _note(self, reading: Reading) -> None:
        self.source = reading.source
        if reading.state > ThermalState[self.totals.worst.upper()]:
            self.totals.worst = reading.state.label

    def _explain(self, reading: Reading) -> str:
        if reading.state >= ThermalState.SERIOUS or self.slowdown is None:
            return f"thermal state {reading.state.label}: {reading.detail}"
        return (f"steps {self.slowdown:.2f}× slower than the warm baseline of {self._baseline:.3g} s for "
                f"{self._slow_windows} log windows while the sensor reads {reading.state.label}, a sign of throttling")
