"""Which thermal sensor watches the training device on this machine."""

import sys

from yem.hardware.thermal.macos import MacSensor
from yem.hardware.thermal.nvml import NvmlSensor
from yem.hardware.thermal.reading import NoSensor, Sensor
from yem.hardware.thermal.sysfs import SysfsSensor


def detect(backend: str, platform: str = sys.platform) -> Sensor:
    """The sensor for the training device `backend` (cuda, mps or cpu) on this machine."""
    if platform == "darwin":
        return MacSensor()  # system-wide: covers the GPU (mps) and the CPU alike
    if backend == "cuda":
        return NvmlSensor.open()
    if platform.startswith("linux"):
        return SysfsSensor()
    return NoSensor(f"no thermal sensor known for {platform}")
