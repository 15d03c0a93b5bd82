"""Thermal sensors and the governor, on fakes that replay real readings (H100 NVML values, macOS state sequences,
sysfs trees). No test sleeps: the governor's clock and sleep are a fake that only advances a number."""

import ctypes
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from yem.errors import TrainingStopped
from yem.hardware.thermal import macos
from yem.hardware.thermal.governor import COOLDOWN_S, POLL_S, Action, Governor, Totals, decide
from yem.hardware.thermal.macos import FOUNDATION, LIBOBJC, MacSensor, mac_state, objc_thermal_state
from yem.hardware.thermal.nvml import GpuHeat, NvmlSensor, gpu_state
from yem.hardware.thermal.reading import NoSensor, Reading, ThermalState
from yem.hardware.thermal.sensor import detect
from yem.hardware.thermal.sysfs import SysfsSensor

S = ThermalState
# nvmlDeviceGetTemperatureThreshold on an H100 (notes) and an H200 (driver 580.159.04): the same values
H100 = {"shutdown": 95.0, "slowdown": 89.0, "max_operating": 87.0}
IDLE, SW_POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL = 0x1, 0x4, 0x8, 0x20, 0x40


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def reading(state: ThermalState, detail: str = "") -> Reading:
    return Reading(state, "fake", detail or f"fake {state.label}")


def replay(states: list[ThermalState]):
    """A sensor read() that returns these states in turn, then repeats the last."""
    queue = list(states)
    return lambda: reading(queue.pop(0) if len(queue) > 1 else queue[0])


def run_windows(governor: Governor, clock: FakeClock, windows: list[tuple[ThermalState, float]],
                window_s: float = 60.0) -> list[Action]:
    """Each window lasts window_s of fake time, then the loop observes (state, seconds per step)."""
    actions = []
    for state, seconds in windows:
        clock.now += window_s
        actions.append(governor.observe(reading(state), seconds))
    return actions


# ---- macOS ----------------------------------------------------------------------------------------------------

def test_mac_state_maps_the_nsprocessinfo_enum():
    assert [mac_state(v) for v in (0, 1, 2, 3)] == [S.NOMINAL, S.FAIR, S.SERIOUS, S.CRITICAL]
    assert mac_state(7) is S.UNKNOWN and mac_state(-1) is S.UNKNOWN


def test_mac_sensor_replays_a_warming_and_cooling_sequence():
    values = iter([0, 1, 2, 1, 0])
    sensor = MacSensor(query=lambda: next(values), pressure=lambda: 0)
    states = [sensor.read().state for _ in range(5)]
    assert states == [S.NOMINAL, S.FAIR, S.SERIOUS, S.FAIR, S.NOMINAL]


def test_heavy_pressure_under_a_fair_thermal_state_counts_as_serious():
    """thermalState reads fair through both moderate and heavy pressure (MacThrottle's observation, notes/apple.md
    §4): the pressure level tells them apart, and heavy is where the governor must pause."""
    thermal, pressure = iter([0, 1, 1, 1, 2, 0]), iter([0, 1, 2, 1, 3, 0])
    sensor = MacSensor(query=lambda: next(thermal), pressure=lambda: next(pressure))
    got = [sensor.read() for _ in range(6)]
    assert [r.state for r in got] == [S.NOMINAL, S.FAIR, S.SERIOUS, S.FAIR, S.CRITICAL, S.NOMINAL]
    assert got[2].detail == "macOS thermal state fair (1), pressure heavy (2)"
    governor = Governor("pause", max_pause_s=600, clock=FakeClock(), watch_speed=False)
    assert governor.observe(got[1], None) is Action.CONTINUE and governor.observe(got[2], None) is Action.PAUSE


def test_mac_sensor_goes_on_with_the_signal_it_can_read():
    def fails():
        raise OSError("dlopen(/usr/lib/libSystem.B.dylib, 0x0006): tried: ... (no such file)")

    only_pressure = MacSensor(query=fails, pressure=lambda: 2).read()
    assert only_pressure.state is S.SERIOUS and "unreadable" in only_pressure.detail
    assert MacSensor(query=lambda: 1, pressure=lambda: 9).read().state is S.FAIR  # an unknown level adds nothing


def test_mac_sensor_without_the_macos_libraries_reads_unknown_instead_of_raising(monkeypatch):
    def no_library(path):
        raise OSError(f"{path}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(macos.ctypes, "CDLL", no_library)  # what loading them does off macOS
    got = MacSensor().read()
    assert got.state is S.UNKNOWN and got.source == "macos" and "unreadable" in got.detail


def test_objc_calls_use_one_typed_function_per_prototype(monkeypatch):
    """The real ctypes path against a fake runtime whose objc_msgSend is a C callback: the class and selector
    lookups get bytes, processInfo's result is passed back as the receiver of thermalState."""
    classes, selectors = {b"NSProcessInfo": 0x1000}, {b"processInfo": 0x2000, b"thermalState": 0x3000}
    process_info, calls = 0x4000, []

    @ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    def msg_send(receiver, selector):
        calls.append((receiver, selector))
        if (receiver, selector) == (0x1000, 0x2000):
            return process_info
        return 2 if (receiver, selector) == (process_info, 0x3000) else 0

    class FakeObjc:
        objc_msgSend = msg_send
        objc_getClass = staticmethod(lambda name: classes[name])
        sel_registerName = staticmethod(lambda name: selectors[name])

    loaded = []
    monkeypatch.setattr(macos.ctypes, "CDLL", lambda path: loaded.append(path) or FakeObjc())
    query = objc_thermal_state()
    assert loaded == [FOUNDATION, LIBOBJC]  # Foundation first, so the class is registered
    assert query() == 2 and query() == 2
    assert calls == [(0x1000, 0x2000), (process_info, 0x3000), (process_info, 0x3000)]  # processInfo once
    assert FakeObjc.objc_getClass.restype is ctypes.c_void_p


def test_pressure_level_registers_once_and_reads_through_libsystem(monkeypatch):
    """The real ctypes path against a fake libSystem whose notify functions are C callbacks: the key goes in as
    bytes, the token comes back through the pointer and is reused for every read."""
    levels, seen = iter([0, 2]), []

    @ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int))
    def register_check(name, token):
        seen.append(name)
        token[0] = 41
        return 0

    @ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64))
    def get_state(token, state):
        seen.append(token)
        state[0] = next(levels)
        return 0

    class FakeSystem:
        notify_register_check, notify_get_state = register_check, get_state

    loaded = []
    monkeypatch.setattr(macos.ctypes, "CDLL", lambda path: loaded.append(path) or FakeSystem())
    read = macos.notify_pressure_level()
    assert (read(), read()) == (0, 2)
    assert loaded == [macos.LIBSYSTEM] and seen == [b"com.apple.system.thermalpressurelevel", 41, 41]


def test_importing_and_detecting_never_loads_libobjc_or_libsystem():
    code = ("import ctypes\n"
            "def refuse(*a, **k): raise AssertionError('a macOS library loaded at import')\n"
            "ctypes.CDLL = refuse\n"
            "from yem.hardware.thermal import macos, sensor\n"
            "assert isinstance(sensor.detect('mps', platform='darwin'), macos.MacSensor)\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)


# ---- NVIDIA ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("celsius, reasons, expected", [
    (34, IDLE, S.NOMINAL),  # what an idle H100 reported
    (70, SW_POWER_CAP | HW_SLOWDOWN, S.NOMINAL),  # power limits are not heat
    (87, 0, S.FAIR),  # the max operating temperature
    (84, SW_THERMAL, S.FAIR),
    (80, HW_THERMAL, S.SERIOUS),  # hardware thermal slowdown, whatever the temperature reads
    (89, 0, S.SERIOUS),  # the slowdown threshold
    (91, HW_THERMAL, S.SERIOUS),
    (92, HW_THERMAL, S.CRITICAL),  # 3 °C from shutdown
    (95, 0, S.CRITICAL),
])
def test_gpu_state_against_h100_thresholds(celsius, reasons, expected):
    assert gpu_state(GpuHeat(celsius, **H100, reasons=reasons)) is expected


def test_gpu_state_without_thresholds_uses_the_reason_bits():
    none = {"shutdown": None, "slowdown": None, "max_operating": None}
    assert gpu_state(GpuHeat(99, **none, reasons=0)) is S.NOMINAL
    assert gpu_state(GpuHeat(60, **none, reasons=HW_THERMAL)) is S.SERIOUS


class FakeNvml:
    """pynvml's surface as yem uses it, over per-GPU (temperature, reasons) readings."""
    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SHUTDOWN, NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 0, 1
    NVML_TEMPERATURE_THRESHOLD_GPU_MAX = 3  # 2 is MEM_MAX in nvml.h

    class NVMLError(Exception):
        pass

    def __init__(self, gpus: dict[int, tuple[float, int]], thresholds: dict[int, float] | None = None,
                 fail_init: bool = False):
        self.gpus, self.fail_init = gpus, fail_init
        # as measured on an H200: SHUTDOWN, SLOWDOWN, MEM_MAX (memory, not the GPU core), GPU_MAX
        self.thresholds = {0: 95, 1: 89, 2: 95, 3: 87} if thresholds is None else thresholds
        self.uuids = {f"GPU-{i:04x}": i for i in gpus}

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        if index not in self.gpus:
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return self.uuids[uuid]

    def nvmlDeviceGetTemperature(self, handle, sensor):
        assert sensor == self.NVML_TEMPERATURE_GPU
        if handle not in self.gpus:
            raise self.NVMLError("GPU is lost")
        return self.gpus[handle][0]

    def nvmlDeviceGetTemperatureThreshold(self, handle, which):
        if which not in self.thresholds:
            raise self.NVMLError("Not Supported")
        return self.thresholds[which]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return self.gpus[handle][1]


def test_nvml_sensor_reports_the_hottest_visible_gpu():
    nvml = FakeNvml({0: (45, IDLE), 1: (86, HW_THERMAL), 2: (88, 0)})
    got = NvmlSensor.open(nvml, visible=None).read()
    assert got.state is S.SERIOUS and got.source == "nvml" and got.celsius == 86
    assert "GPU 86 °C (slowdown at 89 °C, shutdown at 95 °C); clocks: HW thermal slowdown" == got.detail


def test_nvml_reads_the_gpu_max_threshold_not_the_memory_one():
    got = NvmlSensor.open(FakeNvml({0: (87, 0)}), visible=None).read()
    assert got.state is S.FAIR  # 87 °C is the core's max operating temperature; memory's limit is 95


@pytest.mark.parametrize("visible, expected", [("0", S.NOMINAL), ("2,0", S.SERIOUS), ("GPU-0001", S.SERIOUS),
                                               ("", S.UNKNOWN)])
def test_nvml_sensor_follows_cuda_visible_devices(visible, expected):
    nvml = FakeNvml({0: (45, IDLE), 1: (80, HW_THERMAL), 2: (90, 0)})
    assert NvmlSensor.open(nvml, visible=visible).read().state is expected


def test_nvml_uses_the_temperature_v_call_where_the_driver_has_it():
    class NewNvml(FakeNvml):
        def nvmlDeviceGetTemperatureV(self, handle, sensor):
            return 93  # the deprecated call below would say 40

    assert NvmlSensor.open(NewNvml({0: (40, 0)}), visible=None).read().state is S.CRITICAL

    class OldDriver(FakeNvml):
        def nvmlDeviceGetTemperatureV(self, handle, sensor):
            raise self.NVMLError("Function Not Found")

    assert NvmlSensor.open(OldDriver({0: (40, 0)}), visible=None).read().celsius == 40


def test_nvml_missing_thresholds_and_failures_degrade_to_unknown():
    partial = NvmlSensor.open(FakeNvml({0: (88, 0)}, thresholds={1: 89}), visible=None).read()
    assert partial.state is S.NOMINAL and partial.detail == "GPU 88 °C (slowdown at 89 °C)"
    no_driver = NvmlSensor.open(FakeNvml({0: (50, 0)}, fail_init=True), visible=None)
    assert isinstance(no_driver, NoSensor) and "Driver Not Loaded" in no_driver.read().detail
    nvml = FakeNvml({0: (50, 0)})
    sensor = NvmlSensor.open(nvml, visible=None)
    del nvml.gpus[0]  # the GPU fell off the bus
    assert sensor.read().state is S.UNKNOWN


# ---- Linux sysfs ----------------------------------------------------------------------------------------------

def make_zone(root: Path, n: int, kind: str, millideg: int, trips: list[tuple[str, int]], mode: str = "enabled"):
    zone = root / f"thermal_zone{n}"
    zone.mkdir(parents=True)
    (zone / "type").write_text(kind + "\n")
    (zone / "temp").write_text(f"{millideg}\n")
    (zone / "mode").write_text(mode + "\n")
    for i, (trip_kind, value) in enumerate(trips):
        (zone / f"trip_point_{i}_type").write_text(trip_kind + "\n")
        (zone / f"trip_point_{i}_temp").write_text(f"{value}\n")


LAPTOP_TRIPS = [("active", 60000), ("passive", 95000), ("critical", 105000)]


@pytest.mark.parametrize("millideg, expected", [
    (59000, S.NOMINAL), (75000, S.NOMINAL),  # above an active (fan) trip is still nominal
    (94999, S.NOMINAL), (95000, S.FAIR),  # at the passive trip
    (99999, S.FAIR), (100000, S.SERIOUS),  # 5 °C below critical
    (105000, S.CRITICAL),
])
def test_sysfs_zone_at_and_below_trip_points(tmp_path, millideg, expected):
    make_zone(tmp_path, 0, "x86_pkg_temp", millideg, LAPTOP_TRIPS)
    got = SysfsSensor(tmp_path).read()
    assert got.state is expected and got.celsius == millideg / 1000 and got.source == "sysfs"


def test_sysfs_hot_trip_is_serious_and_the_worst_zone_wins(tmp_path):
    make_zone(tmp_path, 0, "acpitz", 50000, [("critical", 120000)])
    make_zone(tmp_path, 1, "soc", 86000, [("passive", 80000), ("hot", 85000), ("critical", 110000)])
    make_zone(tmp_path, 2, "off", 130000, [("critical", 100000)], mode="disabled")
    make_zone(tmp_path, 3, "bogus", 70000, [("passive", 0), ("critical", -273200)])  # unused trips
    (tmp_path / "thermal_zone4").mkdir()
    (tmp_path / "thermal_zone4" / "temp").mkdir()  # a sensor that answers with an error
    got = SysfsSensor(tmp_path).read()
    assert got.state is S.SERIOUS and got.detail.startswith("soc 86 °C")


def test_sysfs_without_zones_reads_unknown(tmp_path):
    """The H100 VM has no /sys/class/thermal zones at all: that is a normal state, not an error."""
    assert SysfsSensor(tmp_path).read().state is S.UNKNOWN


def test_detect_picks_the_source_for_the_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a Mac or a Linux box without nvidia-ml-py
    assert isinstance(detect("mps", platform="darwin"), MacSensor)
    assert isinstance(detect("cpu", platform="darwin"), MacSensor)
    assert isinstance(detect("cpu", platform="linux"), SysfsSensor)
    cuda = detect("cuda", platform="linux")
    assert isinstance(cuda, NoSensor) and "nvidia-ml-py" in cuda.read().detail
    assert detect("cpu", platform="win32").read().state is S.UNKNOWN


# ---- the governor ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, state, slowed, expected", [
    ("pause", S.NOMINAL, False, Action.CONTINUE), ("pause", S.FAIR, False, Action.CONTINUE),
    ("pause", S.UNKNOWN, False, Action.CONTINUE), ("pause", S.SERIOUS, False, Action.PAUSE),
    ("pause", S.NOMINAL, True, Action.PAUSE), ("pause", S.CRITICAL, False, Action.STOP),
    ("stop", S.SERIOUS, False, Action.STOP), ("stop", S.UNKNOWN, True, Action.STOP),
    ("stop", S.FAIR, False, Action.CONTINUE), ("ignore", S.CRITICAL, True, Action.CONTINUE),
])
def test_policy_table(policy, state, slowed, expected):
    assert decide(policy, state, slowed) is expected


def test_serious_pauses_until_the_state_falls_back():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    actions = run_windows(governor, clock, [(S.NOMINAL, 1.0), (S.FAIR, 1.0), (S.SERIOUS, 1.0)])
    assert actions == [Action.CONTINUE, Action.CONTINUE, Action.PAUSE]
    assert governor.wait_until_cool(replay([S.SERIOUS, S.SERIOUS, S.FAIR]), clock.sleep) is Action.CONTINUE
    assert clock.sleeps == [POLL_S, POLL_S]
    clock.now += 60
    assert governor.observe(reading(S.FAIR), 1.0) is Action.CONTINUE
    totals = governor.metrics()
    assert totals["thermal_pauses"] == 1 and totals["thermal_paused_min"] == pytest.approx(20 / 60, abs=0.01)
    assert totals["thermal_throttled_min"] == 3.0  # the fair, serious and fair windows; not the pause
    assert totals["thermal_worst"] == "serious" and totals["thermal_source"] == "fake"


def test_a_critical_spike_stops_with_a_resume_message():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    actions = run_windows(governor, clock, [(S.NOMINAL, 1.0), (S.CRITICAL, 1.0)])
    assert actions == [Action.CONTINUE, Action.STOP]
    error = governor.stop_error(40, 120)
    assert isinstance(error, TrainingStopped)
    message = str(error)
    assert message.startswith("train: stopped for heat after step 40/120") and "fake critical" in message
    assert "rerun `dvc repro`" in message and "thermal.policy: ignore" in message


def test_turning_critical_during_a_pause_stops():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    assert run_windows(governor, clock, [(S.SERIOUS, 1.0)]) == [Action.PAUSE]
    assert governor.wait_until_cool(replay([S.SERIOUS, S.CRITICAL]), clock.sleep) is Action.STOP
    assert "critical" in str(governor.stop_error(10, 100))


def test_the_pause_ends_after_max_pause_s_even_if_still_hot():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=25, clock=clock)
    run_windows(governor, clock, [(S.SERIOUS, 1.0)])
    assert governor.wait_until_cool(replay([S.SERIOUS]), clock.sleep) is Action.CONTINUE
    assert clock.sleeps == [10, 10, 5] and governor.totals.paused_s == 25
    assert run_windows(governor, clock, [(S.SERIOUS, 1.0)]) == [Action.PAUSE]  # still hot: a duty cycle


def test_max_pause_zero_never_sleeps():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=0, clock=clock)
    run_windows(governor, clock, [(S.SERIOUS, 1.0)])
    assert governor.wait_until_cool(replay([S.SERIOUS]), clock.sleep) is Action.CONTINUE and clock.sleeps == []


def test_policy_stop_and_ignore():
    clock = FakeClock()
    assert run_windows(Governor("stop", 600, clock=clock), clock, [(S.FAIR, 1), (S.SERIOUS, 1)]) == \
        [Action.CONTINUE, Action.STOP]
    ignoring = Governor("ignore", 600, clock=clock)
    assert run_windows(ignoring, clock, [(S.SERIOUS, 1), (S.CRITICAL, 1)]) == [Action.CONTINUE] * 2
    assert ignoring.metrics()["thermal_throttled_min"] == 2.0 and ignoring.metrics()["thermal_worst"] == "critical"


def nominal(seconds: list[float]) -> list[tuple[ThermalState, float]]:
    return [(S.NOMINAL, s) for s in seconds]


WARM = [3.0, 1.0, 1.02, 0.98]  # a slow first window (kernels compile), then the warm speed


def test_a_sustained_40_percent_slowdown_while_nominal_pauses_for_a_cooldown():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    actions = run_windows(governor, clock, nominal(WARM + [1.4, 1.4, 1.4]))
    assert actions == [Action.CONTINUE] * 6 + [Action.PAUSE]
    assert governor.slowdown == pytest.approx(1.4)
    assert governor.wait_until_cool(replay([S.NOMINAL]), clock.sleep) is Action.CONTINUE
    assert sum(clock.sleeps) == COOLDOWN_S  # the sensor says nominal: wait a fixed cool-down
    assert "1.40× slower" in str(governor.stop_error(1, 2)) and "nominal" in str(governor.stop_error(1, 2))


@pytest.mark.parametrize("windows, window_s", [
    (WARM + [1.4, 1.0, 1.4, 1.0, 1.4], 60.0),  # single slow windows (a checkpoint save, another app)
    (WARM + [1.4, 1.4, 1.4, 1.4], 20.0),  # slow but only for 80 s: noise, not heat
    (WARM + [1.25] * 8, 60.0),  # 25 % slower: below the threshold
])
def test_short_or_small_slowdowns_do_not_pause(windows, window_s):
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    assert set(run_windows(governor, clock, nominal(windows), window_s)) == {Action.CONTINUE}


def test_slow_first_windows_do_not_hide_a_later_slowdown():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    actions = run_windows(governor, clock, nominal([5.0, 4.0, 1.0, 1.0, 1.0, 1.4, 1.4, 1.4]))
    assert actions == [Action.CONTINUE] * 7 + [Action.PAUSE]


def test_a_slowdown_that_survives_a_cooldown_becomes_the_new_baseline():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    assert run_windows(governor, clock, nominal(WARM + [1.4] * 3))[-1] is Action.PAUSE
    governor.wait_until_cool(replay([S.NOMINAL]), clock.sleep)
    # still slow right after cooling down: not heat (another process, a power mode); don't pause forever
    assert set(run_windows(governor, clock, nominal([1.4] * 10))) == {Action.CONTINUE}
    # the new speed is the reference now: a further 40 % slowdown is throttling again
    assert run_windows(governor, clock, nominal([1.96] * 3))[-1] is Action.PAUSE


def test_a_slowdown_that_cooling_cured_may_pause_again():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    run_windows(governor, clock, nominal(WARM + [1.4] * 3))
    governor.wait_until_cool(replay([S.NOMINAL]), clock.sleep)
    assert run_windows(governor, clock, nominal([1.0, 1.0, 1.4, 1.4, 1.4])) == [Action.CONTINUE] * 4 + [Action.PAUSE]


def test_rebase_forgets_the_old_speed():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    run_windows(governor, clock, nominal(WARM))
    governor.rebase()  # the batch was halved: each step now does half the work per micro-batch
    assert set(run_windows(governor, clock, nominal([1.5] * 8))) == {Action.CONTINUE}


def test_totals_carry_over_a_resume():
    clock = FakeClock()
    first = Governor("pause", max_pause_s=600, clock=clock)
    run_windows(first, clock, [(S.SERIOUS, 1.0)])
    first.wait_until_cool(replay([S.SERIOUS, S.NOMINAL]), clock.sleep)
    saved = dataclasses.asdict(first.totals)  # what a checkpoint stores
    second = Governor("pause", max_pause_s=600, clock=clock, totals=Totals(**saved))
    run_windows(second, clock, [(S.FAIR, 1.0)])
    assert second.metrics()["thermal_pauses"] == 1 and second.metrics()["thermal_throttled_min"] == 2.0
    assert second.metrics()["thermal_worst"] == "serious"


def test_unknown_readings_leave_only_the_step_time_watch():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    windows = [(S.UNKNOWN, s) for s in WARM + [1.5, 1.5, 1.5]]
    assert run_windows(governor, clock, windows)[-1] is Action.PAUSE
    assert governor.metrics()["thermal_worst"] == "unknown"


def test_an_untimed_window_neither_counts_as_slow_nor_breaks_a_slow_run():
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock)
    actions = run_windows(governor, clock, nominal(WARM + [1.4, None, 1.4, 1.4]))  # None: a checkpoint window
    assert actions == [Action.CONTINUE] * 7 + [Action.PAUSE]
    assert governor.totals.throttled_s == 3 * 60  # the three slow windows only


def test_without_the_speed_watch_only_the_sensor_decides():
    """CPU training on a shared machine: step times from the pipeline log swing 10× with other processes."""
    clock = FakeClock()
    governor = Governor("pause", max_pause_s=600, clock=clock, watch_speed=False)
    noisy = nominal([0.577, 0.705, 1.760, 0.167, 0.549, 0.446, 0.287, 0.198] + [1.7] * 10)
    assert set(run_windows(governor, clock, noisy)) == {Action.CONTINUE}
    assert governor.slowdown is None and governor.totals.throttled_s == 0
    assert run_windows(governor, clock, [(S.SERIOUS, 1.0)]) == [Action.PAUSE]
