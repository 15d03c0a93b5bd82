"""Captions stay paired with their own latents under any shuffle (the diffusers #14430 bug), and the data
order is an exact function of (seed, position)."""

import torch

from yem.data import cache
from yem.data.trainset import load_training_set, make_batch, positions


def write_caches(root, count: int):
    """Sample i: latents filled with i; its caption's embedding filled with 1000 + i (keys in another order)."""
    latents, embeds = root / "latents", root / "embeds"
    ids = [f"instance/img{i:02d}" for i in range(count)]
    keys = {sample_id: f"{(7 * i + 3) % 97:016x}" for i, sample_id in enumerate(ids)}  # unrelated to i's order
    for i, sample_id in enumerate(ids):
        cache.write_tensors(latents / f"{sample_id}.safetensors",
                            {"mean": torch.full((16, 2, 2), float(i)), "std": torch.zeros(16, 2, 2),
                             "flip_mean": torch.full((16, 2, 2), float(-i)), "flip_std": torch.zeros(16, 2, 2)})
        cache.write_tensors(embeds / f"{keys[sample_id]}.safetensors",
                            {"prompt_embeds": torch.full((5, 8), 1000.0 + i),
                             "pooled_prompt_embeds": torch.full((4,), 2000.0 + i)})
    cache.write_index(latents, {"samples": {s: f"{s}.safetensors" for s in reversed(ids)}, "resolution": 16,
                                "flip": True})
    cache.write_index(embeds, {"samples": keys, "texts": {}, "validation": [], "negative": ""})
    return latents, embeds


def test_every_batch_pairs_latents_with_their_own_caption(tmp_path):
    data = load_training_set(*write_caches(tmp_path, 7), torch.device("cpu"))
    population = data.select(prior=False)
    generator = torch.Generator().manual_seed(0)
    for seed in range(5):
        for step in range(12):
            index, flip = positions(population, seed, repeats=2, start=step * 3, count=3)
            seeds = list(range(step * 3, step * 3 + 3))
            batch = make_batch(data, index, flip, seeds, 1.0, lambda g: torch.rand(1, generator=g), generator)
            image_number = batch.x0.flatten(1)[:, 0].abs()  # flipped copies hold -i
            assert torch.equal(image_number + 1000, batch.joint[:, 0, 0])
            assert torch.equal(image_number + 2000, batch.pooled[:, 0])
            assert torch.equal(batch.x0.flatten(1)[:, 0] < 0, flip & (index != 0))


def test_each_epoch_shows_every_image_repeats_times_in_a_seeded_order():
    population = torch.arange(5)
    first, _ = positions(population, seed=3, repeats=2, start=0, count=10)
    second, _ = positions(population, seed=3, repeats=2, start=10, count=10)
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(list(range(5)) * 2)
    assert not torch.equal(first, second)  # reshuffled each epoch
    again, _ = positions(population, seed=3, repeats=2, start=4, count=9)  # any window, same stream
    assert torch.equal(again, torch.cat([first, second])[4:13])


def test_a_sample_draws_the_same_noise_in_any_batch_split(tmp_path):
    """Batch 4 in one micro-batch, 2 × 2, or split over 2 processes: each sample gets identical randomness."""
    from yem.data.trainset import micro_batch

    data = load_training_set(*write_caches(tmp_path, 5), torch.device("cpu"))
    draw_u = lambda g: torch.rand(1, generator=g)  # noqa: E731
    generator = torch.Generator()
    whole = micro_batch(data, 3, 0, 1, 4, seed=7, repeats=1, prior_weight=1.0, draw_u=draw_u, generator=generator)
    halves = [micro_batch(data, 6 + i, 0, 1, 2, 7, 1, 1.0, draw_u, generator) for i in range(2)]
    ranks = [micro_batch(data, 3, r, 2, 2, 7, 1, 1.0, draw_u, generator) for r in range(2)]
    for split in (halves, ranks):
        assert torch.equal(whole.x0, torch.cat([b.x0 for b in split]))
        assert torch.equal(whole.noise, torch.cat([b.noise for b in split]))
        assert torch.equal(whole.u, torch.cat([b.u for b in split]))
