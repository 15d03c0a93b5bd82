"""The training set on the device, and the order it is seen in: an exact function of (seed, position).

Latents and prompt embeddings are joined on sample id, never on position, so a shuffle can never pair a caption
with another image's latents (diffusers #14430). The stream of samples is a concatenation of seeded per-epoch
permutations; micro-batch n of process r out of W takes entries [(n·W + r)·B, (n·W + r + 1)·B) of it, so any
step can be reproduced on its own, which is what makes resuming exact.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from yem.data import cache
from yem.errors import CacheError


@dataclass
class TrainingSet:
    """Every cached tensor the loop needs, resident on the training device. N samples, E distinct prompts."""
    ids: list[str]
    mean: torch.Tensor  # (N, 16, h, w) posterior mean, scaled
    std: torch.Tensor  # (N, 16, h, w)
    flip_mean: torch.Tensor | None  # mirrored images, when data.random_flip
    flip_std: torch.Tensor | None
    prompt: torch.Tensor  # (N,) long: each sample's row in joint / pooled
    joint: torch.Tensor  # (E, 77 + T, D)
    pooled: torch.Tensor  # (E, P)
    prior: torch.Tensor  # (N,) bool, on the CPU: prior-preservation (class) image

    def select(self, prior: bool) -> torch.Tensor:
        """(n,) indices of the instance (or class) samples, on the CPU: picking a batch never waits for the device."""
        return torch.nonzero(self.prior == prior).flatten()


def load_training_set(latents_dir: Path, embeds_dir: Path, device: torch.device) -> TrainingSet:
    """Join the latent and embedding caches on sample id (never on position)."""
    latent_files = cache.read_index(latents_dir)["samples"]
    embeds = cache.read_index(embeds_dir)
    if set(latent_files) != set(embeds["samples"]):
        raise CacheError(f"{latents_dir} and {embeds_dir} list different images. Rerun: dvc repro.")
    ids = sorted(latent_files)
    keys = sorted(set(embeds["samples"].values()))
    tensors = [cache.read_tensors(latents_dir / latent_files[i]) for i in ids]
    prompts = [cache.read_tensors(embeds_dir / f"{k}.safetensors") for k in keys]

    def stack(name: str) -> torch.Tensor | None:
        return torch.stack([t[name] for t in tensors]).to(device) if name in tensors[0] else None

    return TrainingSet(
        ids=ids, mean=stack("mean"), std=stack("std"), flip_mean=stack("flip_mean"), flip_std=stack("flip_std"),
        prompt=torch.tensor([keys.index(embeds["samples"][i]) for i in ids], device=device),
        joint=torch.stack([p["prompt_embeds"] for p in prompts]).to(device),
        pooled=torch.stack([p["pooled_prompt_embeds"] for p in prompts]).to(device),
        prior=torch.tensor([i.startswith("prior/") for i in ids]))


def epoch_order(population: torch.Tensor, seed: int, epoch: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A permutation of the samples (each `repeats` times) and a flip coin per entry, fixed by (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    entries = population.repeat(repeats)
    order = entries[torch.randperm(len(entries), generator=generator)]
    return order, torch.rand(len(entries), generator=generator) < 0.5


def positions(population: torch.Tensor, seed: int, repeats: int, start: int, count: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries [start, start + count) of the endless stream of epochs: (sample indices, flips)."""
    size = len(population) * repeats
    epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    picked, flips = [], []
    for position in range(start, start + count):
        epoch, offset = divmod(position, size)
        if epoch not in epochs:
            epochs[epoch] = epoch_order(population, seed, epoch, repeats)
        picked.append(epochs[epoch][0][offset])
        flips.append(epochs[epoch][1][offset])
    return torch.stack(picked), torch.stack(flips)


@dataclass
class Batch:
    x0: torch.Tensor  # (B, 16, h, w) a fresh draw from each image's VAE posterior
    noise: torch.Tensor  # (B, 16, h, w) the flow's noise endpoint
    u: torch.Tensor  # (B,) where each sample's sigma is read from the schedule, in [0, 1)
    joint: torch.Tensor  # (B, 77 + T, D)
    pooled: torch.Tensor  # (B, P)
    weight: torch.Tensor  # (B,) 1 for instance images, train.prior_loss_weight for class images


def make_batch(data: TrainingSet, index: torch.Tensor, flip: torch.Tensor, seeds: list[int], weight: float,
               draw_u, generator: torch.Generator) -> Batch:
    """Gather samples `index` and draw their randomness: each from its own seed, so a sample gets the same noise
    whichever batch, micro-batch or process it lands in. `draw_u(generator) -> (1,)` samples the timestep density."""
    device = data.mean.device
    index = index.to(device, non_blocking=True)  # tiny copy; a blocking one would wait for the GPU
    mean, std = data.mean[index], data.std[index]
    if data.flip_mean is not None:
        use_flip = flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
        mean = torch.where(use_flip, data.flip_mean[index], mean)
        std = torch.where(use_flip, data.flip_std[index], std)
    shape = (2, *mean.shape[1:])  # per sample: posterior noise, flow noise
    draws, us = [], []
    for seed in seeds:
        generator.manual_seed(seed)  # sets the generator's state on the host: no wait for the device
        draws.append(torch.randn(shape, generator=generator, device=device, dtype=mean.dtype))
        us.append(draw_u(generator))
    draws = torch.stack(draws)  # (B, 2, 16, h, w)
    rows = data.prompt[index]
    return Batch(x0=mean + std * draws[:, 0], noise=draws[:, 1], u=torch.cat(us), joint=data.joint[rows],
                 pooled=data.pooled[rows], weight=torch.full((len(index),), weight, device=device))


def micro_batch(data: TrainingSet, number: int, rank: int, world: int, size: int, seed: int, repeats: int,
                prior_weight: float, draw_u, generator: torch.Generator) -> Batch:
    """Process `rank`'s share of global micro-batch `number`: B instance images (+ B class images with prior)."""
    start = (number * world + rank) * size
    parts = []
    for stream, (prior, weight) in enumerate(((False, 1.0), (True, prior_weight))):
        population = data.select(prior)
        if len(population):
            index, flip = positions(population, seed + stream, repeats, start, size)
            seeds = [sample_seed(seed, stream, p) for p in range(start, start + size)]
            parts.append(make_batch(data, index, flip, seeds, weight, draw_u, generator))
    return Batch(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Batch)})


def sample_seed(seed: int, stream: int, position: int) -> int:
    """The seed of the sample at `position` of instance (0) or class (1) stream."""
    return ((seed * 1_000_003 + position) * 4099 + stream) % (1 << 63)
