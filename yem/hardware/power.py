"""Power: keep a Mac awake while it trains, and tell when the machine runs on battery.

An idle Mac sleeps after a few minutes even with the GPU busy, and a run that sleeps mid-step can fail (one
kohya_ss user's out-of-memory error at step 25 came as the Mac went to sleep). `keep_awake()` holds off idle
sleep with `caffeinate -i -w <pid>`: the assertion ends when the block exits, and because caffeinate also
watches our pid, it ends even if this process is killed. Closing a laptop's lid still sleeps it; nothing here
needs sudo. Elsewhere both functions are harmless: no-op and None.
"""

import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

PMSET_TIMEOUT_S = 5
CAFFEINATE_EXIT_S = 5
# `pmset -g batt` first line: "Now drawing from 'AC Power'" | 'Battery Power' | 'UPS Power' (a desktop on a UPS)
SOURCE = re.compile(r"Now drawing from '([^']+)'")
DRAWING = {"AC Power": False, "Battery Power": True, "UPS Power": True}
PERCENT = re.compile(r"\t(\d{1,3})%;")


@contextmanager
def keep_awake(platform: str = sys.platform, spawn: Callable[..., Any] = subprocess.Popen) -> Iterator[bool]:
    """While the block runs on macOS, hold off idle sleep; yields whether an assertion is held."""
    process = None
    if platform == "darwin":
        try:
            process = spawn(["caffeinate", "-i", "-w", str(os.getpid())], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:  # caffeinate missing (a stripped-down system): train anyway
            process = None
    try:
        yield process is not None
    finally:
        if process is not None:
            _end(process)


def _end(process: Any) -> None:
    process.terminate()
    try:
        process.wait(timeout=CAFFEINATE_EXIT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def on_battery(platform: str = sys.platform, pmset: Callable[[], str | None] | None = None,
               battery: Callable[[], Any] | None = None) -> bool | None:
    """True on battery, False on mains power, None when the machine cannot tell (a desktop, a VM)."""
    return power_source(platform, pmset, battery)[0]


def battery_warning(platform: str = sys.platform, pmset: Callable[[], str | None] | None = None,
                    battery: Callable[[], Any] | None = None) -> str | None:
    """A line for the user when the machine trains on battery; None otherwise."""
    draining, percent = power_source(platform, pmset, battery)
    if not draining:
        return None
    charge = f" ({percent}% left)" if percent is not None else ""
    return (f"power: running on battery{charge}. Training drains it fast and the OS may slow the GPU to save "
            f"power; plug in the charger for a long run.")


def power_source(platform: str = sys.platform, pmset: Callable[[], str | None] | None = None,
                 battery: Callable[[], Any] | None = None) -> tuple[bool | None, int | None]:
    """(on battery, charge %): from `pmset -g batt` on macOS (it also names a UPS feeding a desktop Mac, which
    psutil does not see), from psutil elsewhere. `pmset` and `battery` replace the real readers in tests."""
    if platform == "darwin":
        return parse_pmset_batt((pmset or _pmset_batt)() or "")
    reading = (battery or _psutil_battery)()
    if reading is None:
        return None, None
    draining = None if reading.power_plugged is None else not reading.power_plugged
    return draining, round(reading.percent)


def parse_pmset_batt(text: str) -> tuple[bool | None, int | None]:
    """(on battery, charge %) from `pmset -g batt`; None where the output does not say."""
    source = SOURCE.search(text)
    percent = PERCENT.search(text)
    return DRAWING.get(source.group(1)) if source else None, int(percent.group(1)) if percent else None


def _pmset_batt() -> str | None:
    try:
        done = subprocess.run(["pmset", "-g", "batt"], capture_output=True, text=True, timeout=PMSET_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _psutil_battery() -> Any:
    """psutil's battery reading (percent, power_plugged) or None: no battery, or a platform without support."""
    sensors_battery = getattr(psutil, "sensors_battery", None)
    try:
        return sensors_battery() if sensors_battery else None
    except (OSError, RuntimeError, NotImplementedError):
        return None
