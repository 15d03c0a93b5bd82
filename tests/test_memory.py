"""Memory decisions from replayed readings of real machines, the reading code against fake torch/psutil modules,
the MPS out-of-memory text from torch's sources, and the CPU peak measured for real."""

import os
import sys
from collections import namedtuple
from types import SimpleNamespace

import pytest

from yem.hardware import environment, memory, out_of_memory, peaks
from yem.hardware.budget import MPS_SHARE, OS_RESERVE_MIN, apply_budget, memory_budget, stable_gib
from yem.hardware.memory import GIB, MIB, Readings

# Replayed machines. A 16 GB Mac's MPS out-of-memory messages say "max allowed: 18.13 GB" = 1.7 × the working set,
# i.e. 10.67 GiB = 2/3 of 16 GiB. An M2 Max with 64 GiB: recommendedMaxWorkingSetSize = 55,662.79 MB (llama.cpp's
# log; 51.84 GiB, and 1.7 × that is the "max allowed: 88.13 GiB" seen on 64 GB Macs). A 48 GB M5 Pro:
# recommended_max_memory() = 37.44 GiB (notes/apple.md §2).
MAC_16 = Readings("mps", total_ram=16 * GIB, available_ram=int(5.2 * GIB), swap_used=int(1.3 * GIB),
                  device_total=int(18.13 * GIB / 1.7), pressure_level=1)
MAC_64 = Readings("mps", total_ram=64 * GIB, available_ram=40 * GIB, swap_used=0, device_total=55_662_790_000,
                  pressure_level=1)
M5_PRO_48 = Readings("mps", total_ram=48 * GIB, available_ram=20 * GIB, swap_used=0, device_total=int(37.44 * GIB))
H100 = Readings("cuda", total_ram=128 * GIB, available_ram=120 * GIB, swap_used=0, device_total=int(79.1 * GIB))
LINUX_BOX = Readings("cpu", total_ram=int(23.5 * GIB), available_ram=23 * GIB, swap_used=0, device_total=None)

# Real messages: torch < 2.4 printed binary sizes as "GB" (a 16 GB Mac, from an SDXL load), later ones as "GiB"; the
# text comes from aten/src/ATen/mps/MPSAllocator.mm (TORCH_CHECK, so Python sees a RuntimeError).
MPS_OOM_16GB = ("MPS backend out of memory (MPS allocated: 15.14 GB, other allocations: 2.00 GB, max allowed: "
                "18.13 GB). Tried to allocate 1024.00 MB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to "
                "disable upper limit for memory allocations (may cause system failure).")
MPS_OOM_GIB = ("MPS backend out of memory (MPS allocated: 19.13 GiB, other allocations: 6.17 GiB, max allowed: "
               "36.27 GiB). Tried to allocate 12.06 GiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to "
               "disable upper limit for memory allocations (may cause system failure).")
MPS_OOM_UNLIMITED = ("MPS backend out of memory (MPS allocated: 30.01 GiB, other allocations: 384.00 KiB). Tried to "
                     "allocate 6.00 KiB on shared pool.")


@pytest.mark.parametrize("mac", [MAC_16, M5_PRO_48, MAC_64], ids=["16GB", "48GB-M5-Pro", "64GB"])
def test_mps_budget_stays_inside_the_working_set_where_torch_default_would_swap(mac):
    budget = memory_budget(mac)
    assert mac.device_total / 2 < budget.bytes < mac.device_total < mac.total_ram
    assert "working set" in budget.why
    torch_default_limit = 1.7 * mac.device_total
    if mac.total_ram <= 48 * GIB:  # the reason yem sets its own limit: torch's default lets the job swap
        assert torch_default_limit > mac.total_ram


def test_a_bigger_mac_gets_a_bigger_budget_and_16gb_leaves_macos_room():
    small, large = memory_budget(MAC_16), memory_budget(MAC_64)
    assert small.bytes < memory_budget(M5_PRO_48).bytes < large.bytes
    assert MAC_16.total_ram - small.bytes > 5 * GIB  # macOS, the desktop and the training process's own RAM


def test_cuda_budget_leaves_room_for_the_context_and_cpu_keeps_some_ram_for_the_os():
    assert 0.8 * H100.device_total < memory_budget(H100).bytes < H100.device_total
    cpu = memory_budget(LINUX_BOX)
    assert OS_RESERVE_MIN <= LINUX_BOX.total_ram - cpu.bytes < LINUX_BOX.total_ram / 2
    tiny_ram = Readings("cpu", total_ram=4 * GIB, available_ram=GIB, swap_used=0, device_total=None)
    assert memory_budget(tiny_ram).bytes == 4 * GIB - OS_RESERVE_MIN


def test_memory_limit_caps_the_budget_but_never_raises_it():
    capped = memory_budget(MAC_64, limit_gib=8)
    assert capped.bytes == 8 * GIB and "device.memory_limit_gib" in capped.why
    assert memory_budget(MAC_16, limit_gib=100) == memory_budget(MAC_16)


def test_without_the_working_set_api_the_budget_assumes_the_smallest_share_seen():
    old_torch = Readings("mps", total_ram=16 * GIB, available_ram=GIB, swap_used=0, device_total=None)
    assert memory_budget(old_torch).bytes == pytest.approx(memory_budget(MAC_16).bytes, rel=0.01)
    assert "torch < 2.5" in memory_budget(old_torch).why


def test_stable_budget_is_rounded_down_and_does_not_jitter():
    assert stable_gib(int(9.61 * GIB)) == 9.5
    assert stable_gib(int(9.61 * GIB)) == stable_gib(int(9.99 * GIB))
    assert stable_gib(int(9.4 * GIB)) < 9.4


class FakeMps:
    def __init__(self, recommended: int | None):
        if recommended is not None:  # torch < 2.5 has no recommended_max_memory
            self.recommended_max_memory = lambda: recommended
        self.fractions: list[float] = []

    def set_per_process_memory_fraction(self, fraction):
        assert isinstance(fraction, float) and 0 <= fraction <= 2  # what torch.mps checks
        self.fractions.append(fraction)


class FakeCuda:
    def __init__(self, total: int):
        self.total, self.fractions = total, []

    def current_device(self):
        return 0

    def get_device_properties(self, index):
        return SimpleNamespace(total_memory=self.total)

    def set_per_process_memory_fraction(self, fraction, device=None):
        assert isinstance(fraction, float) and 0 <= fraction <= 1
        self.fractions.append(fraction)


def fake_torch(recommended: int | None = None, cuda_total: int = 0):
    return SimpleNamespace(mps=FakeMps(recommended), cuda=FakeCuda(cuda_total))


VirtualMemory = namedtuple("VirtualMemory", "total available")
Swap = namedtuple("Swap", "used")


def fake_psutil(total: int, available: int, swap: int):
    return SimpleNamespace(virtual_memory=lambda: VirtualMemory(total, available), swap_memory=lambda: Swap(swap))


def test_reading_a_16gb_mac_through_the_torch_and_psutil_apis():
    source = memory.SystemMemory(torch_module=fake_torch(MAC_16.device_total), psutil_module=fake_psutil(
        MAC_16.total_ram, MAC_16.available_ram, MAC_16.swap_used), platform="linux", cgroup_files=())
    readings = memory.read("mps", source)
    assert (readings.total_ram, readings.device_total, readings.swap_used) == (16 * GIB, MAC_16.device_total,
                                                                               MAC_16.swap_used)
    old = memory.SystemMemory(torch_module=fake_torch(None), psutil_module=fake_psutil(16 * GIB, GIB, 0),
                              platform="linux", cgroup_files=())
    assert memory.read("mps", old).device_total is None


def test_reading_cuda_and_a_container_limit(tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text(str(8 * GIB))
    unlimited = tmp_path / "v2.max"
    unlimited.write_text("max\n")
    source = memory.SystemMemory(torch_module=fake_torch(cuda_total=H100.device_total),
                                 psutil_module=fake_psutil(128 * GIB, 100 * GIB, 0), platform="linux",
                                 cgroup_files=(limit, unlimited, tmp_path / "absent"))
    readings = memory.read("cuda", source)
    assert readings.device_total == H100.device_total
    assert readings.total_ram == readings.available_ram == 8 * GIB  # the container's limit, not the host's RAM


def test_apply_budget_caps_mps_at_the_budget_unless_the_user_set_the_hard_limit():
    torch = fake_torch(MAC_16.device_total)
    budget = memory_budget(MAC_16)
    yem_env = environment.mps_watermarks({})[0]
    note = apply_budget(budget, MAC_16, env=yem_env, torch_module=torch)
    (fraction,) = torch.mps.fractions
    assert abs(fraction * MAC_16.device_total - budget.bytes) < MIB  # torch's limit = fraction × working set
    assert fraction * MAC_16.device_total < MAC_16.total_ram and "capped" in note
    mine = fake_torch(MAC_16.device_total)
    note = apply_budget(budget, MAC_16, env={environment.MPS_HIGH_WATERMARK: "0.0"}, torch_module=mine)
    assert mine.mps.fractions == [] and "environment" in note


def test_apply_budget_on_cuda_and_cpu():
    torch = fake_torch(cuda_total=H100.device_total)
    apply_budget(memory_budget(H100), H100, env={}, torch_module=torch)
    assert torch.cuda.fractions and torch.cuda.fractions[0] * H100.device_total == pytest.approx(
        memory_budget(H100).bytes, rel=1e-6)
    cpu = fake_torch()
    assert "swap" in apply_budget(memory_budget(LINUX_BOX), LINUX_BOX, env={}, torch_module=cpu)
    assert cpu.cuda.fractions == [] and cpu.mps.fractions == []


@pytest.mark.parametrize("message", [MPS_OOM_16GB, MPS_OOM_GIB, MPS_OOM_UNLIMITED])
def test_mps_out_of_memory_is_recognised(message):
    assert out_of_memory.is_out_of_memory(RuntimeError(message))


def test_other_out_of_memory_errors_and_things_that_are_not():
    import torch

    assert out_of_memory.is_out_of_memory(MemoryError())
    assert out_of_memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    try:
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: the CPU allocator's own error, for real
    except RuntimeError as real:
        assert out_of_memory.is_out_of_memory(real)
    assert not out_of_memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not out_of_memory.is_out_of_memory(ValueError(MPS_OOM_16GB))  # only torch's RuntimeError carries it


def test_the_mps_message_gives_back_the_limit_it_hit():
    found = out_of_memory.parse_mps_oom(MPS_OOM_16GB)
    assert found.pool == "private" and found.requested == 1024 * MIB
    assert found.allocated + found.other + found.requested > found.max_allowed  # why it failed
    # 1.7 × the 16 GB Mac's working set (torch's default high watermark) is the "max allowed" it printed
    assert found.max_allowed == pytest.approx(1.7 * MAC_16.device_total, rel=0.001)
    assert out_of_memory.parse_mps_oom(MPS_OOM_GIB).requested == pytest.approx(12.06 * GIB, rel=1e-3)
    unlimited = out_of_memory.parse_mps_oom(MPS_OOM_UNLIMITED)
    assert unlimited.max_allowed is None and unlimited.pool == "shared" and unlimited.other == 384 * 1024
    assert out_of_memory.parse_mps_oom("CUDA out of memory") is None


@pytest.mark.parametrize("history, pressured", [
    ([1.20, 1.20, 1.45, 1.80, 2.30], True),  # the training's working set being paged out
    ([1.20, 2.00, 2.00, 2.00], False),  # one jump, then flat: macOS moved idle apps away
    ([1.20, 1.30, 1.40, 1.50], False),  # slow growth under the threshold
    ([2.30], False),
    ([0.0, 0.3, 0.6, 0.4, 0.5, 0.7], False),  # rising again, but not by 512 MiB in the window
])
def test_swap_growth_counts_as_pressure_only_when_large_and_sustained(history, pressured):
    assert (out_of_memory.memory_pressure([int(gb * GIB) for gb in history]) is not None) == pressured


def test_critical_macos_pressure_is_pressure_whatever_the_swap():
    assert "critical" in out_of_memory.memory_pressure([0, 0], pressure_level=out_of_memory.MACOS_CRITICAL_PRESSURE)
    assert out_of_memory.memory_pressure([0, 0], pressure_level=2) is None


def test_cpu_peak_is_real_and_resets():
    import torch

    peaks.reset_peak("cpu")
    before = peaks.peak_bytes("cpu")
    block = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    block.add_(1)
    grown = peaks.peak_bytes("cpu")
    del block
    assert grown - before >= 48 * MIB
    if sys.platform.startswith("linux") and os.access("/proc/self/clear_refs", os.W_OK):
        from yem.hardware.device import empty_cache

        empty_cache("cpu")  # hand the freed block back, then the reset lowers the peak
        peaks.reset_peak("cpu")
        assert peaks.peak_bytes("cpu") < grown - 32 * MIB


def test_a_sampled_peak_sees_a_value_that_came_and_went():
    values = iter([10, 10, 500, 10] + [10] * 10_000)
    state = {"value": 10}

    def reading():
        state["value"] = next(values, 10)
        return state["value"]

    sampler = peaks._PeakSampler(reading, interval_s=0.0005)
    import time

    deadline = time.monotonic() + 5
    while sampler.peak < 500 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sampler.peak == 500
    sampler.reset()
    assert sampler.peak == 10


def test_preflight_records_only_stable_memory_facts():
    from yem.hardware.probe import probe_hardware
    from yem.params import DeviceParams

    stable, volatile = probe_hardware(DeviceParams(backend="cpu", mixed_precision="auto", memory_limit_gib=None))
    again, _ = probe_hardware(DeviceParams(backend="cpu", mixed_precision="auto", memory_limit_gib=None))
    assert stable == again  # nothing that moves between runs: free memory and swap stay in the log
    assert stable.memory_budget_gib > 0 and stable.chip
    assert {"memory_available_gib", "swap_used_gib"} <= set(volatile) and not hasattr(stable, "memory_available_gib")
    capped, _ = probe_hardware(DeviceParams(backend="cpu", mixed_precision="auto", memory_limit_gib=1.2))
    assert capped.memory_budget_gib == 1.0


def torch_accepts(env: dict[str, str]) -> bool:
    """MPSAllocator.mm's checks at start-up: 0 <= high <= 2, then 0 <= low <= (high, or 2 when high is 0)."""
    high = strtod(env.get(environment.MPS_HIGH_WATERMARK, "1.7"))
    low = strtod(env.get(environment.MPS_LOW_WATERMARK, "1.4"))  # the unified-memory default
    return 0 <= high <= 2 and 0 <= low <= (high or 2.0)


def strtod(text: str) -> float:
    """How torch reads the variables: C's strtod, which gives 0 for text that is not a number."""
    try:
        return float(text)
    except ValueError:
        return 0.0


@pytest.mark.parametrize("given", [
    {},
    {environment.MPS_HIGH_WATERMARK: "0.7"},  # kohya-ss/sd-scripts#603: "invalid low watermark ratio 1.4"
    {environment.MPS_HIGH_WATERMARK: "0.0"},  # unlimited, as torch's own OOM message suggests
    {environment.MPS_HIGH_WATERMARK: "1.8"},
    {environment.MPS_LOW_WATERMARK: "0.5"},
    {environment.MPS_LOW_WATERMARK: "1.2"},
    {environment.MPS_HIGH_WATERMARK: "0.6", environment.MPS_LOW_WATERMARK: "0.8"},
    {environment.MPS_HIGH_WATERMARK: "lots"},
    {environment.MPS_LOW_WATERMARK: "3"},
])
def test_the_watermark_pair_always_starts_torch(given):
    updates, note = environment.mps_watermarks(given)
    assert torch_accepts({**given, **updates})
    if torch_accepts(given) and all(_is_ratio(value) for value in given.values()):
        assert note is None  # a note only when something of yours had to change
    if environment.MPS_HIGH_WATERMARK in given and _is_ratio(given[environment.MPS_HIGH_WATERMARK]):
        assert environment.MPS_HIGH_WATERMARK not in updates  # your hard limit stays


def _is_ratio(text: str) -> bool:
    try:
        return 0 <= float(text) <= 2
    except ValueError:
        return False


def test_yem_sets_both_watermarks_and_its_hard_limit_is_the_budget():
    updates, note = environment.mps_watermarks({})
    assert note is None and set(updates) == {environment.MPS_HIGH_WATERMARK, environment.MPS_LOW_WATERMARK}
    assert float(updates[environment.MPS_LOW_WATERMARK]) < float(updates[environment.MPS_HIGH_WATERMARK]) == MPS_SHARE
    assert not environment.user_high_watermark(updates)
    assert environment.user_high_watermark({environment.MPS_HIGH_WATERMARK: "0"})


def test_configure_environment_sets_the_pair_only_on_macos(monkeypatch):
    for name in (environment.MPS_HIGH_WATERMARK, environment.MPS_LOW_WATERMARK):
        monkeypatch.delenv(name, raising=False)
    environment.configure_environment(platform="linux")
    assert environment.MPS_HIGH_WATERMARK not in os.environ
    environment.configure_environment(platform="darwin")
    assert torch_accepts(dict(os.environ)) and os.environ[environment.MPS_HIGH_WATERMARK] == "0.9"
