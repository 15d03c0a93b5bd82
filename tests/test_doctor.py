"""`yem doctor`: the report for replayed machines, the command for real on this one, and the CPU-fallback
collector fed torch's own warning text."""

import dataclasses
import warnings
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tests.test_memory import LINUX_BOX, MAC_16, MAC_64
from yem import doctor
from yem.cli import main
from yem.hardware import apple, environment, fallbacks, memory
from yem.hardware.budget import memory_budget
from yem.model import architecture, footprint
from yem.params import set_values

SD3_MEDIUM = architecture.KNOWN_MODELS["stabilityai/stable-diffusion-3-medium-diffusers"]
MAC_WATERMARKS = environment.mps_watermarks({})[0]
# MPSFallback.mm's text as Python shows it (one op per process: TORCH_WARN_ONCE).
FALLBACK = ("The operator 'aten::_linalg_solve_ex.result' is not currently supported on the MPS backend and will "
            "fall back to run on the CPU. This may have performance implications. (Triggered internally at "
            "/Users/runner/work/pytorch/pytorch/pytorch/aten/src/ATen/mps/MPSFallback.mm:13.)")


def mac_report(readings: memory.Readings, fallbacks: tuple[str, ...] = ()) -> doctor.Report:
    """What `gather` would find on a Mac running SD3-medium at 1024 px with auto batch and checkpointing."""
    budget = memory_budget(readings)
    work = footprint.Workload(backend="mps", dtype_bytes=2, resolution=1024, render_resolution=1024, batch_size=1,
                             checkpointing=False, rank=4, targets=4, use_t5=True, t5_tokens=77, attention="chunked",
                             render_attention="chunked")
    auto = SimpleNamespace(batch_size="auto", gradient_checkpointing="auto", attention="auto")
    work, note = doctor.resolve_auto(SD3_MEDIUM, work, budget.bytes, auto)
    label = doctor.machine_label(readings)
    return doctor.Report(
        backend="mps", requested="auto", chip="Apple M2", system="macOS 14.5 (arm64), Python 3.11.9",
        libraries="torch 2.6.0, diffusers 0.42.1, peft 0.21.2",
        precision=doctor.Precision(bf16=True, fp16=True, choice="float16", fallbacks=fallbacks),
        readings=readings, budget=budget, watermarks=MAC_WATERMARKS, thermal="nominal (macOS thermal state)",
        workload="SD3-medium at 1024 px, float16, batch auto",
        stages=tuple(doctor.verdicts(SD3_MEDIUM, work, budget.bytes, label)), train_note=note, problem=None)


def test_16gb_mac_report_explains_the_budget_and_what_to_change():
    text = doctor.format_report(mac_report(MAC_16, fallbacks=("aten::_linalg_solve_ex.result",)))
    assert "16.0 GiB total" in text and "working set" in text and "10.7 GiB" in text
    assert f"{memory.gib(memory_budget(MAC_16).bytes)}: 90% of the 10.7 GiB Metal working set" in text
    assert "bf16 pass, fp16 pass -> float16" in text and "aten::_linalg_solve_ex.result" in text
    assert "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.9" in text and "pressure     normal" in text
    assert "gradient checkpointing on" in text and "chunked attention" in text  # auto decided them, as training will
    assert "int8 base    on MPS an int8 base runs as plain MPS matmuls" in text
    stages = {line.split()[0]: line for line in text.splitlines()[text.splitlines().index(
        "Stages (SD3-medium at 1024 px, float16, batch auto)") + 1:][:4]}
    assert set(stages) == {"encode", "latents", "train", "render"}
    assert " tight " in stages["encode"] or " over " in stages["encode"]
    assert "  - 16 GB Mac: set encode.use_t5: false" in text


def test_64gb_mac_report_has_no_advice():
    text = doctor.format_report(mac_report(MAC_64))
    assert "Advice" not in text and text.count(" fits ") == 4
    assert "64 GB Mac" == doctor.machine_label(MAC_64)


def test_machine_labels():
    assert doctor.machine_label(MAC_16) == "16 GB Mac"
    assert doctor.machine_label(LINUX_BOX) == "24 GB CPU machine"
    cuda = dataclasses.replace(LINUX_BOX, backend="cuda", device_total=80 * memory.GIB)
    assert doctor.machine_label(cuda) == "80 GB CUDA card"


def test_doctor_runs_for_real_on_this_machine(tiny_model_dir):
    from yem.hardware import device, precision

    backend = device.pick_backend("auto")  # what yem chooses here: cpu on CI, mps on a Mac, cuda on a GPU
    result = CliRunner().invoke(main, ["doctor", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert f"backend      {backend}" in result.output and "budget" in result.output
    for stage in ("encode", "latents", "train", "render"):
        assert any(line.split()[:1] == [stage] and " fits " in line for line in result.output.splitlines()), stage
    assert f"-> {precision.pick_dtype(backend, 'auto')}" in result.output
    assert ("the CPU trains in fp32" in result.output) == (backend == "cpu")


def test_doctor_without_params_reports_the_hardware(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "not estimated: no params.yaml" in result.output and "budget" in result.output


def test_doctor_says_what_to_change_when_the_limit_is_small(tmp_path, tiny_model_dir):
    import shutil

    from tests.conftest import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_values(tmp_path / "params.yaml", {"device.memory_limit_gib": 0.005, "data.resolution": 1024})
    result = CliRunner().invoke(main, ["doctor", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "device.memory_limit_gib" in result.output and " over " in result.output
    assert "Advice" in result.output and "set data.resolution: 512" in result.output


def test_cpu_fallbacks_are_collected_once_and_other_warnings_still_show():
    shown = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
        with fallbacks.cpu_fallbacks() as fell_back:
            for _ in range(3):
                warnings.warn(FALLBACK, UserWarning, stacklevel=1)
            warnings.warn("The operator 'aten::col2im' is not currently supported on the MPS backend and will fall "
                          "back to run on the CPU. This may have performance implications.", UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert fell_back == ["aten::_linalg_solve_ex.result", "aten::col2im"]
    assert shown == ["something else"]


def test_the_thermal_line_reads_the_training_devices_sensor(monkeypatch):
    state = SimpleNamespace(label="serious")
    monkeypatch.setattr(doctor.sensor, "detect", lambda backend: SimpleNamespace(
        read=lambda: SimpleNamespace(state=state, detail=f"{backend}: GPU 91 °C")))
    assert doctor._thermal("cuda") == "serious (cuda: GPU 91 °C)"


def mac_rows(*sizes: str) -> tuple[dict[tuple[str, str], list[str]], str]:
    """`yem doctor --memory ...`'s first table: (model, px) -> one cell per memory size."""
    from tests.conftest import REPO

    args = ["doctor", "--params", str(REPO / "params.yaml")] + [a for gb in sizes for a in ("--memory", gb)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    first = result.output.split("\n\n")[1]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in first.splitlines()[2:]]
    return {(row[0], row[1]): row[2:] for row in cells}, result.output


def test_the_mac_table_says_a_16gb_mac_trains_sd3_medium_at_1024px():
    rows, text = mac_rows("16")
    assert rows["SD3-medium", "1024"] == ["fits · ckpt"]  # chunked attention and auto checkpointing: no changes
    assert rows["SD3.5-large", "1024"][0].startswith("no (")  # its 15 GiB of weights alone pass a 9.6 GiB budget
    minutes = next(line for line in text.splitlines() if line.startswith("| SD3-medium | 1024 | yes |"))
    values = [float(v) for v in minutes.strip("|").split("|")[3:]]
    assert len(values) == len(apple.CHIPS) and all(v > 0 for v in values)
    assert "estimate" in text and "quanto_py::qbytes_mm" in text


def test_the_mac_table_across_sizes_names_what_an_8gb_mac_must_change():
    rows, _ = mac_rows("8", "16", "36")
    # an 8 GB Mac: int8 base and no T5, and checkpointing (an int8 base keeps its Linears' inputs: 4.6 GiB without)
    assert rows["SD3-medium", "512"] == ["int8 base + no T5 · ckpt", "fits", "fits"]
    assert rows["SD3.5-large", "1024"][:2] == ["no (train, render)"] * 2 and rows["SD3.5-large", "1024"][2] != "no"


def test_chip_rates_are_the_published_ones_and_brand_strings_name_them():
    published = {"M1": 2.6, "M1 Pro": 5.2, "M1 Max": 10.4, "M2": 3.6, "M2 Max": 13.6, "M3 Max": 14.32,
                 "M4 Pro": 7.53}  # apple.com newsroom (M1 family, M2); hmc-tech.com (the others)
    for name, tflops in published.items():
        assert apple.chip(f"Apple {name}").fp16_tflops == pytest.approx(tflops, rel=0.01), name
    assert apple.chip("Apple M2 Pro").name == "M2 Pro" and apple.chip("Intel Xeon") is None


def test_the_readme_carries_the_table_yem_doctor_produces():
    from tests.conftest import REPO

    _, text = mac_rows(*(str(gb) for gb in (8, 16, 24, 36, 48, 64, 128)))
    tables = text.split("\n\n", 1)[1].rsplit("\n\nint8 base", 1)[0]
    assert tables.strip() in (REPO / "README.md").read_text(), "README: paste `yem doctor --memory 8 ... 128`'s tables"
def test_doctor_lists_the_buckets_the_photos_train_in(tmp_path, tiny_model_dir):
    """Phone-shaped photos at 256 px on the tiny model: doctor names each bucket with its count (from the headers,
    EXIF rotation included) and the photos cropped hard to the widest (or tallest) bucket."""
    import shutil

    from PIL import Image

    from tests.conftest import REPO
    from tests.images import toy_subject

    (tmp_path / "photos").mkdir()
    for name, size in {"a": (192, 256), "b": (180, 320), "c": (320, 240), "pano": (640, 160)}.items():
        toy_subject(0, size).save(tmp_path / "photos" / f"{name}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown as a portrait
    toy_subject(1, (320, 240)).save(tmp_path / "photos" / "turned.jpg", exif=exif.tobytes())
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    set_values(tmp_path / "params.yaml", {"data.instance_dir": "photos", "data.resolution": 256})
    result = CliRunner().invoke(main, ["doctor", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    # at 256 px the tallest bucket is 3:5, so the 9:16 photo (b) is cropped to it too
    assert ("  buckets      192×320: 3, 320×192: 2; cropped hard to the widest bucket: b.png, pano.png"
            in result.output.splitlines())
