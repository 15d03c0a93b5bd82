"""HEIC photos (what an iPhone takes) are read through pillow-heif, rotated upright like a JPEG with EXIF rotation,
and become the same training latents as their JPEG twin."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, cpu_hardware
from tests.images import toy_subject
from yem.data import images, samples

pytest.importorskip("pillow_heif")  # the test extra installs it; yem reads HEIC only with it
ROTATED = 6  # EXIF orientation "rotate 90° clockwise to view": how a phone held upright stores a portrait


def twins(folder):
    """The same landscape-stored sensor image as a JPEG and a HEIC, both tagged to be shown as a portrait."""
    folder.mkdir(parents=True, exist_ok=True)
    sensor = toy_subject(3, (320, 240))
    exif = Image.Exif()
    exif[0x0112] = ROTATED
    sensor.save(folder / "cat_jpeg.jpg", quality=95, exif=exif.tobytes())
    sensor.save(folder / "cat_heic.heic", quality=95, exif=exif.tobytes())
    return folder / "cat_jpeg.jpg", folder / "cat_heic.heic"


def test_a_heic_photo_is_read_upright_like_its_jpeg_twin(tmp_path):
    jpeg, heic = twins(tmp_path / "photos")
    assert Image.open(heic).format == "HEIF"  # a real HEIC file, written by libheif's encoder
    a, b = images.open_image(jpeg), images.open_image(heic)
    assert a.size == b.size == (240, 320)  # upright portrait, turned once (not twice, not never)
    assert images.upright_size(heic) == images.upright_size(jpeg) == (240, 320)
    difference = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()
    assert difference < 4, difference  # two lossy codecs at quality 95: a few levels apart
    found = samples.discover(tmp_path / "photos", "instance", "data.instance_dir")
    assert [s.id for s in found.samples] == ["instance/cat_heic", "instance/cat_jpeg"] and not found.notes


def test_a_heic_photo_trains_like_its_jpeg_twin(tmp_path, tiny_model_dir):
    """Same bucket, same orientation, latents within the two codecs' difference of each other."""
    from yem.data import cache
    from yem.data.latents import write_latents
    from yem.data.preflight import run_preflight
    from yem.params import load_params

    twins(tmp_path / "photos")
    other = toy_subject(4, (240, 320))  # another photo of the subject, for scale
    other.save(tmp_path / "photos" / "other.jpg", quality=95)
    params = load_params(REPO / "params.yaml")
    data = dataclasses.replace(params.data, instance_dir="photos", resolution=256)
    checked = run_preflight(params.device, data, tmp_path)
    write_latents(params.model, data, cpu_hardware(), checked.images["samples"], tmp_path, tmp_path / "latents")
    index = cache.read_index(tmp_path / "latents")
    assert index["buckets"] == {"instance/cat_heic": "192×320", "instance/cat_jpeg": "192×320",
                                "instance/other": "192×320"}  # portraits
    heic, jpeg, other = (cache.read_tensors(tmp_path / "latents" / index["samples"][f"instance/{k}"])["mean"]
                         for k in ("cat_heic", "cat_jpeg", "other"))
    twin, unrelated = (heic - jpeg).abs().mean().item(), (other - jpeg).abs().mean().item()
    assert twin < 0.25 * unrelated, (twin, unrelated)


def test_without_pillow_heif_a_heic_file_is_skipped_with_how_to_read_it(tmp_path, monkeypatch):
    monkeypatch.setattr(samples, "IMAGE_SUFFIXES", samples.IMAGE_SUFFIXES - samples.HEIF_SUFFIXES)
    _, heic = twins(tmp_path / "photos")
    found = samples.discover(tmp_path / "photos", "instance", "data.instance_dir")
    assert found.notes == [f"{heic}: skipped, HEIC/HEIF needs pillow-heif (pip install 'yem[heic]'; on a Mac it "
                           f"comes with yem). Install it, or export it as JPEG."]
