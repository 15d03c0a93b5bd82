"""The precision is a function of the machine's facts and the probe's verdicts, never of a timing taken this run:
two preflights on the same Mac write the same build/preflight.json however fast its matmuls happen to run."""

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from yem.errors import HardwareError
from yem.hardware import precision
from yem.hardware.memory import GIB, Readings
from yem.hardware.precision import Machine, choose, recorded_speedup

M1_SONOMA = Machine(backend="mps", chip="Apple M1", system="macOS 14.5", torch="2.13.0")
M1_OLD_TORCH = Machine(backend="mps", chip="Apple M1", system="macOS 14.5", torch="2.7.1")
H100 = Machine(backend="cuda", chip="NVIDIA H100 80GB HBM3", system="Linux-6.8", torch="2.13.0+cu130")
CPU = Machine(backend="cpu", chip="AMD EPYC", system="Linux-6.8", torch="2.13.0+cpu")
MAC_16 = Readings("mps", total_ram=16 * GIB, available_ram=int(5.2 * GIB), swap_used=0,
                  device_total=int(18.13 * GIB / 1.7), pressure_level=1)


def passing(*names: str):
    return lambda name: name in names


def never_timed() -> float:
    raise AssertionError("no speed comparison is needed for this choice")


@pytest.mark.parametrize("machine, verdicts, speedup, expected", [
    (CPU, ("bfloat16", "float16"), never_timed, "float32"),  # emulated half precision: slower, saves nothing
    (H100, ("bfloat16", "float16"), never_timed, "bfloat16"),
    (H100, ("float16",), never_timed, "float16"),  # a GPU without bf16 (V100, T4)
    (H100, (), never_timed, "float32"),
    (M1_SONOMA, ("bfloat16", "float16"), lambda: 2.4, "float16"),  # bf16 emulated: fp16 2.4x faster
    (M1_SONOMA, ("bfloat16", "float16"), lambda: 1.1, "bfloat16"),  # native bf16 (M3 and later)
    (M1_SONOMA, ("float16",), never_timed, "float16"),  # macOS 13: no bf16 on MPS
    (M1_OLD_TORCH, ("bfloat16", "float16"), never_timed, "bfloat16"),  # no GradScaler on MPS before torch 2.8
    (M1_OLD_TORCH, ("float16",), never_timed, "float32"),
])
def test_auto_is_a_function_of_the_facts_and_the_probe(machine, verdicts, speedup, expected):
    assert choose(machine, "auto", passing(*verdicts), speedup) == expected


def test_a_requested_precision_is_probed_and_refused_with_a_reason():
    assert choose(M1_SONOMA, "fp16", passing("float16"), never_timed) == "float16"
    assert choose(CPU, "no", passing(), never_timed) == "float32"
    with pytest.raises(HardwareError, match=r"^device\.mixed_precision: bfloat16 gives wrong or non-finite"):
        choose(M1_SONOMA, "bf16", passing("float16"), never_timed)
    with pytest.raises(HardwareError) as refused:
        choose(M1_OLD_TORCH, "fp16", passing("float16"), never_timed)
    assert str(refused.value) == ("device.mixed_precision: fp16 on mps needs loss scaling, which needs torch >= 2.8 "
                                  "(got 2.7.1). Upgrade torch, or set device.mixed_precision: auto.")


@pytest.mark.parametrize("version, wanted, expected", [("2.8.0", (2, 8), True), ("2.7.1", (2, 8), False),
                                                       ("2.13.0+cpu", (2, 8), True), ("3.0.0a0", (2, 8), True),
                                                       ("2.10.0.dev20261101", (2, 8), True)])
def test_torch_versions_compare_as_numbers(version, wanted, expected):
    assert precision.torch_at_least(version, wanted) is expected


def test_the_speed_comparison_is_measured_once_per_machine(tmp_path):
    measured = []

    def measure(value: float):
        return lambda: measured.append(value) or value

    assert recorded_speedup(M1_SONOMA, measure(2.4), tmp_path) == 2.4
    assert recorded_speedup(M1_SONOMA, measure(1.0), tmp_path) == 2.4  # read back, not measured again
    assert recorded_speedup(M1_OLD_TORCH, measure(1.2), tmp_path) == 1.2  # another torch: another key
    assert measured == [2.4, 1.2]
    (saved,) = (tmp_path / precision.SPEED_CACHE).glob(f"{M1_SONOMA.key()}.json")
    assert json.loads(saved.read_text())["chip"] == "Apple M1"
    saved.write_text("{not json")
    assert recorded_speedup(M1_SONOMA, measure(1.9), tmp_path) == 1.9  # a damaged record is measured again


def fake_mac(monkeypatch, seconds: dict[str, float]) -> None:
    """This machine as an M1 Mac whose matmuls take `seconds` per dtype and whose probe passes both halves."""
    from yem.hardware import device, probe

    monkeypatch.setattr(device, "pick_backend", lambda requested: "mps")
    monkeypatch.setattr(device, "_apple_chip", lambda: "Apple M1")
    monkeypatch.setattr(device, "os_name", lambda: "macOS 14.5")
    monkeypatch.setattr(precision, "probe_dtype", lambda backend, name: True)
    monkeypatch.setattr(precision, "_matmul_seconds", lambda backend, name: seconds[name])
    monkeypatch.setattr(probe.memory, "read", lambda backend: MAC_16)


def preflight_json(folder: Path) -> bytes:
    from yem.data.preflight import run_preflight
    from yem.params import load_params

    params = load_params(REPO / "params.yaml")
    result = run_preflight(params.device, params.data, REPO)
    result.hardware.save(folder / "preflight.json")
    return (folder / "preflight.json").read_bytes()


def test_two_preflights_with_different_timings_write_the_same_record(monkeypatch, tmp_path):
    monkeypatch.setenv("YEM_HOME", str(tmp_path / "home"))
    fake_mac(monkeypatch, {"bfloat16": 0.30, "float16": 0.10})  # the first preflight: fp16 3x faster
    (tmp_path / "a").mkdir()
    first = preflight_json(tmp_path / "a")
    assert json.loads(first)["dtype"] == "float16" and json.loads(first)["backend"] == "mps"
    fake_mac(monkeypatch, {"bfloat16": 0.10, "float16": 0.10})  # a warm machine, a noisy timer: no difference
    (tmp_path / "b").mkdir()
    assert preflight_json(tmp_path / "b") == first
    # the planted defect the record guards against: measured afresh, the second timing would choose bf16
    monkeypatch.setenv("YEM_HOME", str(tmp_path / "elsewhere"))
    (tmp_path / "c").mkdir()
    assert json.loads(preflight_json(tmp_path / "c"))["dtype"] == "bfloat16"
