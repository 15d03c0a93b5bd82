"""Sleep guard and battery detection, on recorded `pmset -g batt` outputs and fake processes."""

import os
import subprocess
from types import SimpleNamespace

import pytest

from yem.hardware import power

# `pmset -g batt` as printed by macOS (tab before the percentage; the id varies per machine)
CHARGING = ("Now drawing from 'AC Power'\n -InternalBattery-0 (id=22806627)\t83%; charging; 1:00 remaining "
            "present: true\n")
DISCHARGING = ("Now drawing from 'Battery Power'\n -InternalBattery-0 (id=22806627)\t78%; discharging; 5:05 remaining "
               "present: true\n")
NO_ESTIMATE = ("Now drawing from 'Battery Power'\n -InternalBattery-0 (id=4653155)\t100%; discharging; (no estimate) "
               "present: true\n")
NOT_CHARGING = ("Now drawing from 'AC Power'\n -InternalBattery-0 (id=4653155)\t80%; AC attached; not charging "
                "present: true\n")
LOW = "Now drawing from 'Battery Power'\n -InternalBattery-0 (id=1)\t9%; discharging\n"
DESKTOP = "Now drawing from 'AC Power'\n"  # a Mac mini or Studio: no battery line
UPS = "Now drawing from 'UPS Power'\n"


@pytest.mark.parametrize("text, expected", [
    (CHARGING, (False, 83)), (DISCHARGING, (True, 78)), (NO_ESTIMATE, (True, 100)), (NOT_CHARGING, (False, 80)),
    (LOW, (True, 9)), (DESKTOP, (False, None)), (UPS, (True, None)), ("", (None, None)),
    ("Now drawing from 'Solar Power'\n", (None, None)),  # a source yem does not know: don't guess
])
def test_pmset_batt_parsing(text, expected):
    assert power.parse_pmset_batt(text) == expected


def test_on_battery_on_macos_reads_pmset():
    assert power.on_battery("darwin", pmset=lambda: DISCHARGING) is True
    assert power.on_battery("darwin", pmset=lambda: CHARGING) is False
    assert power.on_battery("darwin", pmset=lambda: None) is None  # pmset missing or failed


def battery(percent: float, plugged: bool | None):
    return lambda: SimpleNamespace(percent=percent, secsleft=3600, power_plugged=plugged)


def test_on_battery_elsewhere_reads_psutil():
    assert power.on_battery("linux", battery=battery(55.4, False)) is True
    assert power.on_battery("linux", battery=battery(100, True)) is False
    assert power.on_battery("linux", battery=battery(100, None)) is None  # psutil could not tell
    assert power.on_battery("linux", battery=lambda: None) is None  # no battery: a server or a VM


def test_battery_warning_names_the_charge_only_when_draining():
    warning = power.battery_warning("darwin", pmset=lambda: LOW)
    assert warning.startswith("power: running on battery (9% left).") and "plug in" in warning
    linux = power.battery_warning("linux", battery=battery(55.4, False))
    assert linux.startswith("power: running on battery (55% left)")
    assert power.battery_warning("darwin", pmset=lambda: UPS).startswith("power: running on battery. ")
    for source in (CHARGING, DESKTOP, ""):
        assert power.battery_warning("darwin", pmset=lambda text=source: text) is None
    assert power.battery_warning("linux", battery=lambda: None) is None


def test_this_machine_answers_without_raising():
    assert power.on_battery() in (True, False, None)


class FakeProcess:
    def __init__(self, argv, hangs=False, **kwargs):
        self.argv, self.kwargs, self.hangs, self.calls = argv, kwargs, hangs, []

    def terminate(self):
        self.calls.append("terminate")

    def wait(self, timeout=None):
        self.calls.append("wait")
        if self.hangs and "kill" not in self.calls:
            raise subprocess.TimeoutExpired("caffeinate", timeout)
        return 0

    def kill(self):
        self.calls.append("kill")


def test_keep_awake_on_macos_holds_caffeinate_for_this_pid_and_ends_it():
    spawned = []
    with power.keep_awake("darwin", spawn=lambda argv, **kw: spawned.append(FakeProcess(argv, **kw)) or spawned[-1]) \
            as held:
        assert held is True
        assert spawned[0].argv == ["caffeinate", "-i", "-w", str(os.getpid())]
        assert spawned[0].calls == []  # held for the whole block
    assert spawned[0].calls == ["terminate", "wait"]


def test_keep_awake_ends_caffeinate_when_training_raises_and_kills_a_stuck_one():
    process = FakeProcess(["caffeinate"], hangs=True)
    with pytest.raises(KeyboardInterrupt):
        with power.keep_awake("darwin", spawn=lambda argv, **kw: process):
            raise KeyboardInterrupt
    assert process.calls == ["terminate", "wait", "kill", "wait"]


def test_keep_awake_elsewhere_spawns_nothing():
    def refuse(*args, **kwargs):
        raise AssertionError("spawned a process off macOS")

    with power.keep_awake("linux", spawn=refuse) as held:
        assert held is False


def test_keep_awake_without_caffeinate_still_trains():
    def no_caffeinate(argv, **kwargs):  # what Popen does when the program is not there
        raise FileNotFoundError(2, "No such file or directory", argv[0])

    with power.keep_awake("darwin", spawn=no_caffeinate) as held:
        assert held is False


def test_keep_awake_really_ends_the_helper_process():
    started = []

    def spawn(argv, **kwargs):  # `sleep` stands in for caffeinate, which does not exist here
        started.append(subprocess.Popen(["sleep", "30"], **kwargs))
        return started[0]

    with power.keep_awake("darwin", spawn=spawn):
        assert started[0].poll() is None
    assert started[0].poll() is not None
