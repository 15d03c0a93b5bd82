"""The thermal governor: from sensor readings and step times, whether training goes on, pauses or stops.

`sensor.detect(backend)` picks what reads the heat: macOS `NSProcessInfo.thermalState` with the thermal pressure
level (heavy pressure counts as serious), NVIDIA through NVML, Linux `/sys/class/thermal` zones, or nothing
(unknown). Counters can read "nominal" while a Mac's GPU down-clocks, so the `Governor` also compares each log
window's step time with a warm baseline and treats a sustained slowdown like the "serious" state. Its decisions
are a pure function of readings, step times and an injected clock. The training loop calls, once per log window:

    reader = sensor.detect(backend)
    governor = Governor(params.thermal.policy, params.thermal.max_pause_s, watch_speed=backend != "cpu")
    ...
    action = governor.observe(reader.read(), seconds_per_step)  # step time without checkpoint saving
    if action is not Action.CONTINUE:
        <save a checkpoint>
        if action is Action.PAUSE:
            action = governor.wait_until_cool(reader.read, time.sleep)
        if action is Action.STOP:
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

import enum
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from yem.errors import TrainingStopped
from yem.hardware.thermal.reading import Reading, ThermalState

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
