"""Captions stay paired with their own latents under any shuffle (the diffusers #14430 bug); the data order is an
exact function of (seed, step); a step draws from one aspect-ratio bucket; caption dropout is a seeded coin."""

import dataclasses

import pytest
import torch

from tests.conftest import REPO
from yem.data import cache
from yem.data.trainset import load_training_set, make_batch, micro_batch, positions, sample_seed
from yem.params import load_params

SHAPES = [(2, 2), (2, 3), (3, 2)]  # latent (h, w) of three buckets: square, landscape, portrait
EMPTY = f"{999:016x}"


def write_caches(root, count: int, shapes=((2, 2),)):
    """Sample i: latents filled with i (its bucket's shape: shapes[i % len]); its caption's embedding filled with
    1000 + i (keys in another order); the empty prompt's with -1."""
    latents, embeds = root / "latents", root / "embeds"
    ids = [f"instance/img{i:02d}" for i in range(count)]
    keys = {sample_id: f"{(7 * i + 3) % 97:016x}" for i, sample_id in enumerate(ids)}  # unrelated to i's order
    for i, sample_id in enumerate(ids):
        shape = (16, *shapes[i % len(shapes)])
        cache.write_tensors(latents / f"{sample_id}.safetensors",
                            {"mean": torch.full(shape, float(i)), "std": torch.zeros(shape),
                             "flip_mean": torch.full(shape, float(-i)), "flip_std": torch.zeros(shape)})
        cache.write_tensors(embeds / f"{keys[sample_id]}.safetensors",
                            {"prompt_embeds": torch.full((5, 8), 1000.0 + i),
                             "pooled_prompt_embeds": torch.full((4,), 2000.0 + i)})
    cache.write_tensors(embeds / f"{EMPTY}.safetensors",
                        {"prompt_embeds": torch.full((5, 8), -1.0), "pooled_prompt_embeds": torch.full((4,), -1.0)})
    cache.write_index(latents, {"samples": {s: f"{s}.safetensors" for s in reversed(ids)}, "resolution": 16,
                                "flip": True})
    cache.write_index(embeds, {"samples": keys, "texts": {}, "validation": [], "negative": "", "empty": EMPTY})
    return latents, embeds


def train_settings(**changes):
    return dataclasses.replace(load_params(REPO / "params.yaml").train, **changes)


def draw_u(generator):
    return torch.rand(1, generator=generator)


def step_batches(data, settings, steps: int, effective: int):
    generator = torch.Generator()
    return [micro_batch(data, step, 0, effective, effective, settings, draw_u, generator) for step in range(steps)]


def test_every_batch_pairs_latents_with_their_own_caption(tmp_path):
    data = load_training_set(*write_caches(tmp_path, 7, SHAPES), torch.device("cpu"))
    for seed in range(5):
        for (batch,) in step_batches(data, train_settings(seed=seed, repeats=2), 12, 3):
            image_number = batch.x0.flatten(1)[:, 0]  # flipped copies hold -i
            assert torch.equal(image_number.abs() + 1000, batch.joint[:, 0, 0])
            assert torch.equal(image_number.abs() + 2000, batch.pooled[:, 0])


def test_each_epoch_shows_every_image_repeats_times_in_a_seeded_order():
    population = torch.arange(5)
    first, _ = positions(population, seed=3, repeats=2, start=0, count=10)
    second, _ = positions(population, seed=3, repeats=2, start=10, count=10)
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(list(range(5)) * 2)
    assert not torch.equal(first, second)  # reshuffled each epoch
    again, _ = positions(population, seed=3, repeats=2, start=4, count=9)  # any window, same stream
    assert torch.equal(again, torch.cat([first, second])[4:13])


def test_a_step_draws_from_one_bucket_and_every_image_comes_round(tmp_path):
    """Nine images in three buckets, effective batch 2: each step is of one shape; over the schedule every image is
    seen about equally often, and the buckets take turns in a seeded order, not one after the other."""
    data = load_training_set(*write_caches(tmp_path, 9, SHAPES), torch.device("cpu"))
    assert data.sizes() == {"16×16": 3, "24×16": 3, "16×24": 3}
    seen, shapes = [], []
    for (batch,) in step_batches(data, train_settings(seed=4), 36, 2):  # 4 schedule epochs of 3 × 3 steps
        assert batch.x0.shape[0] == 2 and len(batch.x0) == len(batch.joint)
        seen += batch.x0.flatten(1)[:, 0].abs().int().tolist()
        shapes.append(tuple(batch.x0.shape[2:]))
    counts = [seen.count(i) for i in range(9)]
    assert min(counts) >= 7 and max(counts) <= 9, counts  # 72 draws over 9 images, each bucket padded per epoch
    assert shapes[:9] != sorted(shapes[:9]), "buckets should be interleaved"


def test_a_sample_draws_the_same_noise_in_any_batch_split(tmp_path):
    """Batch 4 in one micro-batch, 2 × 2, or split over 2 processes: each sample gets identical randomness."""
    data = load_training_set(*write_caches(tmp_path, 8, SHAPES[:2]), torch.device("cpu"))
    settings, generator = train_settings(seed=7), torch.Generator()
    for step in range(4):
        (whole,) = micro_batch(data, step, 0, 4, 4, settings, draw_u, generator)
        halves = [micro_batch(data, step, start, 2, 4, settings, draw_u, generator)[0] for start in (0, 2)]
        for name in ("x0", "noise", "u", "joint"):
            assert torch.equal(getattr(whole, name), torch.cat([getattr(b, name) for b in halves])), name


def test_with_one_bucket_the_stream_is_the_one_before_buckets(tmp_path):
    """One bucket and no caption dropout: step s takes entries [s·E, (s + 1)·E) of the plain stream of seeded
    permutations, with the per-position seeds, exactly as training did before buckets existed."""
    data = load_training_set(*write_caches(tmp_path, 5), torch.device("cpu"))
    settings = train_settings(seed=3, repeats=2)
    population, generator = data.select(prior=False), torch.Generator()
    for step in range(7):
        (batch,) = micro_batch(data, step, 1, 2, 3, settings, draw_u, generator)
        index, flip = positions(population, settings.seed, settings.repeats, step * 3 + 1, 2)
        seeds = [sample_seed(settings.seed, 0, p) for p in range(step * 3 + 1, step * 3 + 3)]
        before = make_batch(data, index, flip, seeds, 1.0, draw_u, generator)
        for field in dataclasses.fields(before):
            assert torch.equal(getattr(batch, field.name), getattr(before, field.name)), (step, field.name)


def test_caption_dropout_trains_some_samples_on_the_empty_prompt_as_a_function_of_the_step(tmp_path):
    data = load_training_set(*write_caches(tmp_path, 6, SHAPES), torch.device("cpu"))
    dropped = step_batches(data, train_settings(seed=1, caption_dropout=0.5), 40, 2)
    kept = step_batches(data, train_settings(seed=1), 40, 2)
    empty = [bool(v == -1) for (b,) in dropped for v in b.joint[:, 0, 0]]
    assert 0.3 < sum(empty) / len(empty) < 0.7  # both kinds of sample, about half each
    for (d,), (k,) in zip(dropped, kept):  # the same images, noise and timesteps: only the prompt changes
        assert torch.equal(d.x0, k.x0) and torch.equal(d.noise, k.noise) and torch.equal(d.u, k.u)
        keep = d.joint[:, 0, 0] != -1
        assert torch.equal(d.joint[keep], k.joint[keep]) and torch.equal(d.pooled[keep], k.pooled[keep])
        assert (d.pooled[~keep] == -1).all()
    again = step_batches(data, train_settings(seed=1, caption_dropout=0.5), 40, 2)
    assert all(torch.equal(a.joint, d.joint) for (a,), (d,) in zip(again, dropped))  # a function of (seed, step)


def test_caption_dropout_needs_the_empty_prompt_in_the_cache(tmp_path):
    from yem.errors import CacheError

    latents, embeds = write_caches(tmp_path, 3)
    index = cache.read_index(embeds)
    del index["empty"]  # a cache written before encode kept the empty prompt
    cache.write_index(embeds, index)
    data = load_training_set(latents, embeds, torch.device("cpu"))
    with pytest.raises(CacheError, match="train.caption_dropout: .*dvc repro -f encode"):
        step_batches(data, train_settings(caption_dropout=0.1), 1, 1)
