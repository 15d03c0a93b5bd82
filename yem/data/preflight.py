"""Check the hardware and the inputs before anything heavy runs, and write down what was decided.

Two kinds of facts come out. Stable ones (the hardware record: backend, dtype, chip, memory budget, library
versions; the image list with content hashes; the captions) go into tracked files: downstream stages depend on
them and rerun only when they change. Volatile readings (free memory, swap, time) go to a log no stage depends on.
"""

import platform
import time
from dataclasses import dataclass
from pathlib import Path

from yem.data import buckets, images
from yem.data.hashing import file_sha256
from yem.data.samples import Sample, discover, several
from yem.errors import DataError
from yem.hardware.probe import probe_hardware
from yem.hardware.record import Hardware
from yem.params import DataParams, DeviceParams


@dataclass(frozen=True, slots=True)
class Preflight:
    hardware: Hardware  # -> build/preflight.json
    images: dict  # -> build/images.json: id -> path, sha256 (latents depend on this)
    captions: dict  # -> build/captions.json: id -> caption or null (encode depends on this)
    notes: list[str]  # skipped files, empty captions: shown to the user
    log: dict  # -> logs/preflight.json: volatile readings


def run_preflight(device_settings: DeviceParams, data_settings: DataParams, root: Path) -> Preflight:
    """Probe the device, choose the precision, and survey the image folders (paths relative to `root`)."""
    hardware, readings = probe_hardware(device_settings)
    samples, notes = survey(data_settings, root)
    manifest = {s.id: {"path": _portable(s.path, root), "sha256": file_sha256(s.path)} for s in samples}
    log = {**readings, "platform": platform.platform(), "python": platform.python_version(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "notes": notes}
    return Preflight(hardware=hardware, images={"samples": manifest}, captions=caption_manifest(samples, root),
                     notes=notes, log=log)


def survey(settings: DataParams, root: Path) -> tuple[list[Sample], list[str]]:
    """Find every image (instance and prior) and decode each once, so broken files are rejected before any model
    loads; every unusable file is reported at once, one line each."""
    found = discover(_resolve(root, settings.instance_dir), "instance", "data.instance_dir")
    samples, notes = list(found.samples), list(found.notes)
    if settings.prior_dir is not None:
        prior = discover(_resolve(root, settings.prior_dir), "prior", "data.prior_dir")
        samples += prior.samples
        notes += prior.notes
    problems = []
    shapes = buckets.buckets_for(settings.resolution, settings.buckets)  # the model's limit is checked by latents
    for sample in samples:
        try:
            image = images.open_image(sample.path, settings.resolution)
            bucket = buckets.nearest(image.width, image.height, shapes)
            note = images.check_size(image, bucket, settings.small_images, sample.path)
        except DataError as e:
            problems.append(str(e))
            continue
        notes += [note] if note else []
    if problems:
        raise several(problems)
    return samples, notes


def bucket_survey(settings: DataParams, root: Path, max_side: int | None) -> tuple[dict[str, int], list[str]]:
    """The aspect-ratio buckets the instance images will train in (label -> count) and the names of those cropped
    hard to fit the widest bucket, from the image headers alone (for `yem doctor`, before anything is decoded)."""
    shapes = buckets.buckets_for(settings.resolution, settings.buckets, max_side)
    found = discover(_resolve(root, settings.instance_dir), "instance", "data.instance_dir").samples
    sizes = {sample.path.name: images.upright_size(sample.path) for sample in found}
    chosen = [buckets.nearest(width, height, shapes) for width, height in sizes.values()]
    return buckets.counts(chosen), [name for name, (w, h) in sizes.items() if buckets.clamped(w, h, shapes)]


def caption_manifest(samples: list[Sample], root: Path) -> dict:
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
