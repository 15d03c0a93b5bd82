"""Aspect-ratio buckets: phone photos train at their own shape. The bucket list, the choice and the crop; a mixed
folder (portraits, landscapes, a square, a panorama) cached at its buckets' sizes, trained (it learns), killed and
resumed bit for bit."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, interrupt_after_step
from tests.images import toy_subject
from yem.data import buckets, images
from yem.data.buckets import Bucket
from yem.errors import DataError, TrainingStopped

# name -> (width, height) as people take them
PHOTOS = {"portrait_3x4": (192, 256), "portrait_9x16": (180, 320), "landscape_4x3": (320, 240),
          "landscape_16x9": (384, 216), "square": (260, 260), "panorama_4x1": (640, 160)}


def test_buckets_at_1024_are_the_familiar_ones_about_a_megapixel_each():
    found = buckets.buckets_for(1024, "auto", max_side=3072)
    assert found[0] == Bucket(1024, 1024)  # squarest first
    for width, height in [(896, 1152), (832, 1216), (768, 1344), (640, 1600)]:
        assert Bucket(width, height) in found and Bucket(height, width) in found
    for bucket in found[1:]:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0, bucket
        assert 0.85 <= bucket.width * bucket.height / 1024**2 <= 1, bucket
        assert max(bucket.aspect, 1 / bucket.aspect) <= buckets.MAX_ASPECT, bucket
    assert buckets.buckets_for(1024, "off") == [Bucket(1024, 1024)]


def test_each_photo_goes_to_the_bucket_nearest_its_shape_and_only_a_panorama_is_clamped():
    shapes = buckets.buckets_for(1024, "auto", max_side=3072)
    assert buckets.nearest(768, 1024, shapes) == Bucket(896, 1152)  # 3:4
    assert buckets.nearest(1080, 1920, shapes) == Bucket(768, 1344)  # 9:16
    assert buckets.nearest(1920, 1080, shapes) == Bucket(1344, 768)  # 16:9
    assert buckets.nearest(1000, 1000, shapes) == Bucket(1024, 1024)
    assert buckets.nearest(4000, 1000, shapes) == Bucket(1600, 640)  # 4:1: the widest there is
    assert buckets.clamped(4000, 1000, shapes) and not buckets.clamped(1920, 1080, shapes)
    assert buckets.crop_share(768, 1024, Bucket(896, 1152)) < 0.04  # a square crop would lose 25 %


def test_the_position_embedding_bounds_the_buckets():
    tiny = buckets.buckets_for(768, "auto", max_side=1024)  # the tiny SD3: 64 patches × 2 × 8 px
    assert max(max(b.width, b.height) for b in tiny) <= 1024
    assert len(tiny) < len(buckets.buckets_for(768, "auto"))  # 512×1152 is beyond it
    with pytest.raises(DataError, match=r"data.resolution: larger than .* \(got 2048 > 1024 px\). Lower"):
        buckets.buckets_for(2048, "auto", max_side=1024)


def test_the_crop_keeps_what_a_square_crop_would_cut_from_a_portrait():
    portrait = Image.new("RGB", (300, 400), "white")
    portrait.paste((255, 0, 0), (0, 0, 300, 30))  # a red band at the top, a blue one at the bottom
    portrait.paste((0, 0, 255), (0, 370, 300, 400))
    bucket = Bucket(192, 256)
    cropped = images.bucket_crop(portrait, bucket, center=True, rng=np.random.default_rng(0))
    assert cropped.size == (192, 256)
    top, bottom = cropped.getpixel((96, 5)), cropped.getpixel((96, 250))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    square = images.bucket_crop(portrait, Bucket(256, 256), center=True, rng=np.random.default_rng(0))
    assert square.getpixel((128, 5)) == (255, 255, 255)  # the square crop lost the band


# --- a mixed folder, end to end on the tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def mixed_project(tmp_path_factory, tiny_model_dir):
    """(root, params, hardware, notes): caches of six phone-shaped photos at 256 px (the tiny model's buckets
    there: 256², 192×320, 320×192)."""
    from yem.data.latents import write_latents
    from yem.data.preflight import run_preflight
    from yem.data.text import write_embeddings
    from yem.params import load_params

    root = tmp_path_factory.mktemp("mixed")
    (root / "photos").mkdir()
    for seed, (name, size) in enumerate(PHOTOS.items()):
        toy_subject(seed, size).save(root / "photos" / f"{name}.png")
    params = load_params(REPO / "params.yaml")
    data = dataclasses.replace(params.data, instance_dir="photos", resolution=256)
    checked = run_preflight(params.device, data, root)
    write_embeddings(params.model, params.prompts, params.encode, checked.hardware, checked.captions["captions"],
                     root / "embeds")
    notes = write_latents(params.model, data, checked.hardware, checked.images["samples"], root, root / "latents")
    return root, dataclasses.replace(params, data=data), checked.hardware, notes


def test_latents_are_cached_at_each_photos_bucket_and_the_panorama_is_named(mixed_project):
    from yem.data import cache

    root, _, _, notes = mixed_project
    index = cache.read_index(root / "latents")
    assert index["buckets"] == {"instance/portrait_3x4": "192×320", "instance/portrait_9x16": "192×320",
                                "instance/landscape_4x3": "320×192", "instance/landscape_16x9": "320×192",
                                "instance/square": "256×256", "instance/panorama_4x1": "320×192"}
    for sample_id, label in index["buckets"].items():
        mean = cache.read_tensors(root / "latents" / index["samples"][sample_id])["mean"]
        width, height = Bucket.parse(label).width, Bucket.parse(label).height
        assert tuple(mean.shape) == (16, height // 8, width // 8), sample_id
    clamp = [n for n in notes if n.startswith("data.buckets:")]
    assert len(clamp) == 1 and "panorama_4x1.png 640×160 -> 320×192 loses 58%" in clamp[0]


def train(project, out: str, **changes):
    from yem.training.loop import run_training

    root, params, hardware, _ = project
    settings = dataclasses.replace(params.train, **{"steps": 12, "checkpoint_every": 4, "effective_batch_size": 2,
                                                     **changes})
    return run_training(params.model, settings, hardware, root / "latents", root / "embeds", root / out, root)


def test_training_on_mixed_buckets_learns_and_batches_never_mix_them(mixed_project, monkeypatch):
    from yem.data import trainset

    shapes = []
    original = trainset.micro_batch

    def recording(*args, **kwargs):
        parts = original(*args, **kwargs)
        shapes.append([tuple(p.x0.shape[2:]) for p in parts])
        return parts

    monkeypatch.setattr(trainset, "micro_batch", recording)
    result = train(mixed_project, "learn", steps=40, learning_rate=2e-3)
    assert result.heldout_after < 0.9 * result.heldout_before, (result.heldout_before, result.heldout_after)
    assert all(len(parts) == 1 for parts in shapes)  # one bucket per micro-batch: one forward pass
    assert {s[0] for s in shapes} == {(24, 40), (40, 24), (32, 32)}  # every bucket trained
    assert result.metrics()["buckets"] == {"256×256": 1, "192×320": 2, "320×192": 3}


def test_a_killed_mixed_bucket_run_resumes_bit_for_bit(mixed_project, monkeypatch):
    from safetensors.torch import load_file

    import yem.training.loop
    from yem.model import lora_file

    reference = train(mixed_project, "reference")
    original = interrupt_after_step(monkeypatch, 5)
    with pytest.raises(TrainingStopped):
        train(mixed_project, "resumed")
    monkeypatch.setattr(yem.training.loop, "update", original)
    resumed = train(mixed_project, "resumed")
    assert resumed.resumed_from == 6
    root = mixed_project[0]
    a, b = (load_file(root / name / lora_file.WEIGHT_NAME) for name in ("reference", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed.rows] == [r["loss"] for r in reference.rows]


def test_auto_batch_plans_for_the_largest_bucket(mixed_project):
    from yem.data import trainset

    root, params, _, _ = mixed_project
    data = trainset.load_training_set(root / "latents", root / "embeds", torch.device("cpu"))
    (batch,) = trainset.largest_batch(data, 3, params.train, lambda g: torch.rand(1, generator=g), torch.Generator())
    assert batch.x0.shape == (3, 16, 32, 32)  # 256² has the most pixels (65536 > 192 × 320 = 61440)
    assert math.prod(batch.x0.shape[2:]) == max(math.prod(s.mean.shape[2:]) for s in data.stacks)
