"""Check the hardware and the inputs before anything heavy runs, and write down what was decided.

Two kinds of facts come out. Stable ones (backend, dtype, chip, memory budget, library versions, the image list
with content hashes, the captions) go into tracked files: downstream stages depend on them and rerun only when they
change. Volatile readings (free memory, swap, time) go to a log no stage depends on.

The memory budget is stable on purpose: it comes from totals (RAM, Metal's working set, the card), never from free
memory, and is rounded down to 0.5 GiB. It belongs with the stable facts because `train.batch_size: auto` plans
against it, so a different budget can mean a different batch and a different LoRA; training reads it from
build/preflight.json rather than measuring it again.
"""

import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from yem import data, device, memory
from yem.errors import DataError
from yem.params import DataParams, DeviceParams


@dataclass(frozen=True, slots=True)
class Preflight:
    hardware: dict  # -> build/preflight.json: backend, dtype, chip, memory budget, versions
    images: dict  # -> build/images.json: id -> path, sha256 (latents depend on this)
    captions: dict  # -> build/captions.json: id -> caption or null (encode depends on this)
    notes: list[str]  # skipped files, empty captions: shown to the user
    log: dict  # -> logs/preflight.json: volatile readings


def run_preflight(device_settings: DeviceParams, data_settings: DataParams, root: Path) -> Preflight:
    """Probe the device, choose the precision, and survey the image folders (paths relative to `root`)."""
    hardware, readings = probe_hardware(device_settings)
    samples, notes = survey(data_settings, root)
    images = {s.id: {"path": _portable(s.path, root), "sha256": data.file_sha256(s.path)} for s in samples}
    log = {**readings, "platform": platform.platform(), "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes}
    return Preflight(hardware=hardware, images={"samples": images}, captions=caption_manifest(samples, root),
                     notes=notes, log=log)


def probe_hardware(params: DeviceParams) -> tuple[dict, dict]:
    """Choose backend and precision and work out the memory budget. Returns the stable facts
    (-> build/preflight.json) and this moment's readings (-> logs/preflight.json)."""
    backend = device.pick_backend(params.backend)
    with device.cpu_fallbacks() as fell_back:  # the precision probe's ops: the first that MPS lacks shows up
        dtype = device.pick_dtype(backend, params.mixed_precision)
    readings = memory.read(backend)
    budget = memory.budget(readings, params.memory_limit_gib)
    stable = {"backend": backend, "dtype": dtype, "chip": device.device_name(backend),
              "memory_budget_gib": memory.stable_gib(budget.bytes), "torch": metadata.version("torch"),
              "diffusers": metadata.version("diffusers")}
    return stable, hardware_log(readings, budget, fell_back)


def hardware_log(readings: memory.Readings, budget: memory.Budget, fallbacks: list[str]) -> dict:
    """The volatile half: what memory looks like right now, and which ops fell back to the CPU."""
    def in_gib(nbytes: int | None) -> float | None:
        return None if nbytes is None else round(nbytes / memory.GIB, 3)

    return {"memory_total_gib": in_gib(readings.total_ram),
            "memory_available_gib": in_gib(readings.available_ram), "swap_used_gib": in_gib(readings.swap_used),
            "device_memory_gib": in_gib(readings.device_total), "memory_pressure_level": readings.pressure_level,
            "memory_budget_exact_gib": in_gib(budget.bytes), "memory_budget_why": budget.why,
            "cpu_fallback_ops": fallbacks}


def survey(settings: DataParams, root: Path) -> tuple[list[data.Sample], list[str]]:
    """Find every image (instance and prior) and decode each once, so broken files are rejected before any model
    loads; every unusable file is reported at once, one line each."""
    found = data.discover(_resolve(root, settings.instance_dir), "instance", "data.instance_dir")
    samples, notes = list(found.samples), list(found.notes)
    if settings.prior_dir is not None:
        prior = data.discover(_resolve(root, settings.prior_dir), "prior", "data.prior_dir")
        samples += prior.samples
        notes += prior.notes
    problems = []
    for sample in samples:
        try:
            image = data.open_image(sample.path, settings.resolution)
            note = data.check_size(image, settings.resolution, settings.small_images, sample.path)
        except DataError as e:
            problems.append(str(e))
            continue
        notes += [note] if note else []
    if problems:
        raise data.several(problems)
    return samples, notes


def caption_manifest(samples: list[data.Sample], root: Path) -> dict:
    """-> build/captions.json: the text per sample id, and the file each caption came from (encode names it)."""
    return {"captions": {s.id: s.caption for s in samples},
            "files": {s.id: _portable(s.caption_file, root) for s in samples if s.caption_file is not None}}


def _resolve(root: Path, path: str) -> Path:
    """A params path: relative to the folder of params.yaml, absolute, or starting with ~."""
    return (root / Path(path).expanduser()).resolve()


def _portable(path: Path, root: Path) -> str:
    """Paths inside the project are stored relative to it, so the manifest is the same on every clone."""
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path.resolve())
