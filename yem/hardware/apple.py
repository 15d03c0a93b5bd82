"""Apple Silicon facts for machines yem is not running on: the GPU memory macOS grants, and each chip's GPU rate.

`yem doctor --memory 16` answers for a Mac it cannot read (yem.training.macs); on a real Mac the readings come
from yem.hardware.memory instead. Every figure below is a published one, with its source.
"""

from dataclasses import dataclass

from yem.hardware.memory import GIB, Readings

# Metal's recommended working set (what MPS may use; yem's budget is 90 % of it) as a share of RAM. Observed:
# 16 GB Macs "max allowed: 18.13 GB" at the 1.7 × default watermark → 10.67 GiB = 2/3 (ComfyUI#7171,
# AudioLDM2#20); a 36 GB M3 Pro "max allowed: 45.90 GiB" → 27.0 GiB = 3/4 (ACE-Step-1.5#282); a 48 GB M5 Pro
# recommended_max_memory() = 37.44 GiB, 0.78 (dev.to/nefayran). notes/apple.md §2-3.
SMALL_MAC_SHARE, LARGE_MAC_SHARE, LARGE_MAC_GB = 2 / 3, 3 / 4, 36


def mac_readings(ram_gb: int) -> Readings:
    """What yem.hardware.memory would read on an idle Mac with `ram_gb` GB of unified memory."""
    ram = ram_gb * GIB
    share = LARGE_MAC_SHARE if ram_gb >= LARGE_MAC_GB else SMALL_MAC_SHARE
    return Readings(backend="mps", total_ram=ram, available_ram=ram, swap_used=0, device_total=int(ram * share))


@dataclass(frozen=True, slots=True)
class Chip:
    name: str
    gpu_cores: int  # the largest GPU of the chip
    clock_ghz: float

    @property
    def fp16_tflops(self) -> float:
        """Peak fp16 (= fp32 on Apple GPUs: "F16 is neither faster nor slower than F32", philipturner/metal-
        benchmarks) FMA rate: 128 ALUs per core, 2 FLOPs per FMA."""
        return self.gpu_cores * 128 * 2 * self.clock_ghz / 1000


# Top GPU configuration of each chip. Clocks and rates: Apple's own figures where it published them (M1 2.6,
# M1 Pro 5.2, M1 Max 10.4 TFLOPS: apple.com/newsroom 2020-11-10 and 2021-10-18; M2 3.6 TFLOPS: 2022-06-06), the
# hmc-tech.com GPU database for the rest (cores × 128 × 2 × clock, FP16 = FP32: M2 Pro 16-core 5.73 and M2 Max
# 38-core 13.6 TFLOPS at 1398 MHz; M3 9-core 3.22, M3 Pro 18-core 6.44, M3 Max 40-core 14.32 TFLOPS at 1398 MHz;
# M4 10-core 3.76 and M4 Pro 20-core 7.53 TFLOPS at 1470 MHz; M4 Max 32-core 13.74 TFLOPS at 1678 MHz).
CHIPS = (
    Chip("M1", 8, 1.278), Chip("M1 Pro", 16, 1.278), Chip("M1 Max", 32, 1.278),
    Chip("M2", 10, 1.398), Chip("M2 Pro", 19, 1.398), Chip("M2 Max", 38, 1.398),
    Chip("M3", 10, 1.398), Chip("M3 Pro", 18, 1.398), Chip("M3 Max", 40, 1.398),
    Chip("M4", 10, 1.470), Chip("M4 Pro", 20, 1.470), Chip("M4 Max", 40, 1.678),
)
# The share of that peak a whole training step reaches on MPS: an assumption (no SD3 step has been measured on a
# Mac yet; an H100 ran yem's eager step at 14 % of its matmul rate, bound by kernel launches that a Mac's slower
# GPU hides better). The Apple workflow writes the runner's measured s/step beside this estimate.
ASSUMED_STEP_EFFICIENCY = 0.35


def chip(name: str) -> Chip | None:
    """The chip whose name ends a brand string ("Apple M2 Pro" → M2 Pro), if yem knows it."""
    known = sorted(CHIPS, key=lambda c: -len(c.name))
    return next((c for c in known if name.strip().endswith(c.name)), None)
