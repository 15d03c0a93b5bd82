"""What a thermal sensor reports: a state ordered like macOS's, with where it came from and a line for people.

A sensor is anything with `read() -> Reading`, and never raises: a failed read is an "unknown" reading with the
reason in its detail. `NoSensor` always reads unknown, for machines where nothing reports heat (a cloud GPU VM).
"""

import enum
from dataclasses import dataclass
from typing import Protocol


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
