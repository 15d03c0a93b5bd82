"""The training set on the device, and the order it is seen in: an exact function of (seed, step).

Latents and prompt embeddings are joined on sample id, never on position, so a shuffle can never pair a caption
with another image's latents (diffusers #14430). Images of one aspect-ratio bucket share a size and are stacked
together; every optimizer step draws all its samples (its effective batch, E) from one bucket, so any split of the
step into micro-batches, accumulation and processes stacks cleanly and trains the same.

Which bucket a step uses follows a seeded schedule: one schedule epoch gives bucket k ceil(n_k · repeats / E)
steps, in a seeded order. Each bucket has its own endless stream of seeded per-epoch permutations of its images,
and the c-th step that bucket k serves takes entries [c·E, (c + 1)·E) of it. With one bucket this is the plain
stream of permutations, step s taking entries [s·E, (s + 1)·E). Each sample's noise, timestep and caption-dropout
coin follow its global position s·E + i: any step can be reproduced on its own, which is what makes resuming exact.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from yem.data import cache
from yem.errors import CacheError
from yem.params import TrainParams

BUCKET_STRIDE = 7_919_111  # separates the seeds of the buckets' streams (bucket 0 keeps the seed it always had)
SCHEDULE_SALT = 0x5CED_B0C4  # keeps the schedule's draws apart from bucket 0's permutations of the same epoch


@dataclass
class Stack:
    """The cached latents of one bucket's n images, on the training device."""
    mean: torch.Tensor  # (n, 16, h, w) posterior mean, scaled
    std: torch.Tensor  # (n, 16, h, w)
    flip_mean: torch.Tensor | None  # mirrored images, when data.random_flip
    flip_std: torch.Tensor | None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return self.mean.shape[-2] * 8, self.mean.shape[-1] * 8


@dataclass
class TrainingSet:
    """Every cached tensor the loop needs, resident on the training device. N samples, E distinct prompts."""
    ids: list[str]
    stacks: list[Stack]  # one per bucket, ordered by (height, width)
    bucket: torch.Tensor  # (N,) long, on the CPU: the stack holding each sample
    slot: torch.Tensor  # (N,) long, on the CPU: its row in that stack
    prompt: torch.Tensor  # (N,) long: each sample's row in joint / pooled
    joint: torch.Tensor  # (E, 77 + T, D)
    pooled: torch.Tensor  # (E, P)
    empty: int | None  # the empty prompt's row in joint / pooled (caption dropout), if encode cached it
    prior: torch.Tensor  # (N,) bool, on the CPU: prior-preservation (class) image
    _groups: dict = dataclasses.field(default_factory=dict, repr=False)  # populations(), worked out once

    def select(self, prior: bool) -> torch.Tensor:
        """(n,) indices of the instance (or class) samples, on the CPU: picking a batch never waits for the device."""
        return torch.nonzero(self.prior == prior).flatten()

    def populations(self, prior: bool) -> list[torch.Tensor]:
        """The instance (or class) samples of each bucket that has any, as (n_k,) indices in id order."""
        if prior not in self._groups:
            chosen = self.select(prior)
            groups = [chosen[self.bucket[chosen] == k] for k in range(len(self.stacks))]
            self._groups[prior] = [group for group in groups if len(group)]
        return self._groups[prior]

    def posterior(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of samples `index`, all of one bucket: each (n, 16, h, w)."""
        stack, rows = self.stacks[int(self.bucket[index[0]])], self.slot[index].to(self.joint.device)
        return stack.mean[rows], stack.std[rows]

    def sizes(self) -> dict[str, int]:
        """Bucket "W×H" -> how many samples it holds."""
        return {f"{w}×{h}": int((self.bucket == k).sum()) for k, (h, w) in enumerate(s.size for s in self.stacks)}


def load_training_set(latents_dir: Path, embeds_dir: Path, device: torch.device) -> TrainingSet:
    """Join the latent and embedding caches on sample id (never on position); stack each bucket's latents."""
    latent_files = cache.read_index(latents_dir)["samples"]
    embeds = cache.read_index(embeds_dir)
    if set(latent_files) != set(embeds["samples"]):
        raise CacheError(f"{latents_dir} and {embeds_dir} list different images. Rerun: dvc repro.")
    ids = sorted(latent_files)
    keys = sorted(set(embeds["samples"].values()) | ({embeds["empty"]} if "empty" in embeds else set()))
    tensors = [cache.read_tensors(latents_dir / latent_files[i]) for i in ids]
    prompts = [cache.read_tensors(embeds_dir / f"{k}.safetensors") for k in keys]
    shapes = sorted({tuple(t["mean"].shape) for t in tensors})
    bucket = [shapes.index(tuple(t["mean"].shape)) for t in tensors]
    slot = [bucket[:i].count(k) for i, k in enumerate(bucket)]

    def stack(name: str, k: int) -> torch.Tensor | None:
        if name not in tensors[0]:
            return None
        return torch.stack([t[name] for t, b in zip(tensors, bucket) if b == k]).to(device)

    return TrainingSet(
        ids=ids, stacks=[Stack(*(stack(n, k) for n in ("mean", "std", "flip_mean", "flip_std")))
                         for k in range(len(shapes))],
        bucket=torch.tensor(bucket), slot=torch.tensor(slot),
        prompt=torch.tensor([keys.index(embeds["samples"][i]) for i in ids], device=device),
        joint=torch.stack([p["prompt_embeds"] for p in prompts]).to(device),
        pooled=torch.stack([p["pooled_prompt_embeds"] for p in prompts]).to(device),
        empty=keys.index(embeds["empty"]) if "empty" in embeds else None,
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


@functools.lru_cache(maxsize=8)  # every micro-batch of a schedule epoch asks for the same one
def bucket_schedule(steps: tuple[int, ...], seed: int, epoch: int) -> torch.Tensor:
    """The bucket of each step of one schedule epoch: bucket k for steps[k] of them, in a seeded order."""
    order = torch.tensor([bucket for bucket, count in enumerate(steps) for _ in range(count)])
    if len(steps) == 1:
        return order  # one bucket: no draw, the steps run as they did before buckets
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) ^ SCHEDULE_SALT)
    return order[torch.randperm(len(order), generator=generator)]


def step_source(populations: list[torch.Tensor], seed: int, repeats: int, effective: int, step: int
                ) -> tuple[int, int]:
    """Which bucket optimizer step `step` draws from, and how many steps that bucket served before it."""
    steps = tuple(math.ceil(len(p) * repeats / effective) for p in populations)
    epoch, offset = divmod(step, sum(steps))
    order = bucket_schedule(steps, seed, epoch)
    bucket = int(order[offset])
    return bucket, epoch * steps[bucket] + int((order[:offset] == bucket).sum())


@dataclass
class Batch:
    x0: torch.Tensor  # (B, 16, h, w) a fresh draw from each image's VAE posterior
    noise: torch.Tensor  # (B, 16, h, w) the flow's noise endpoint
    u: torch.Tensor  # (B,) where each sample's sigma is read from the schedule, in [0, 1)
    joint: torch.Tensor  # (B, 77 + T, D)
    pooled: torch.Tensor  # (B, P)
    weight: torch.Tensor  # (B,) 1 for instance images, train.prior_loss_weight for class images

    @staticmethod
    def joined(parts: list["Batch"]) -> list["Batch"]:
        """Parts of one size as a single batch (one forward pass); parts of different buckets stay apart."""
        if len({p.x0.shape[1:] for p in parts}) > 1:
            return parts
        return [Batch(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Batch)})]


def make_batch(data: TrainingSet, index: torch.Tensor, flip: torch.Tensor, seeds: list[int], weight: float,
               draw_u, generator: torch.Generator, dropout: float = 0.0) -> Batch:
    """Gather samples `index` (of one bucket) and draw their randomness: each from its own seed, so a sample gets the
    same noise whichever batch, micro-batch or process it lands in. `draw_u(generator) -> (1,)` samples the timestep
    density; with `dropout` > 0 a coin drawn after it trains the sample on the empty prompt."""
    device = data.joint.device
    stack, rows = data.stacks[int(data.bucket[index[0]])], data.slot[index].to(device, non_blocking=True)
    mean, std = stack.mean[rows], stack.std[rows]
    if stack.flip_mean is not None:
        use_flip = flip.to(device, non_blocking=True).view(-1, 1, 1, 1)
        mean = torch.where(use_flip, stack.flip_mean[rows], mean)
        std = torch.where(use_flip, stack.flip_std[rows], std)
    shape = (2, *mean.shape[1:])  # per sample: posterior noise, flow noise
    draws, us, coins = [], [], []
    for seed in seeds:
        generator.manual_seed(seed)  # sets the generator's state on the host: no wait for the device
        draws.append(torch.randn(shape, generator=generator, device=device, dtype=mean.dtype))
        us.append(draw_u(generator))
        if dropout:
            coins.append(torch.rand(1, generator=generator, device=device))
    draws = torch.stack(draws)  # (B, 2, 16, h, w)
    prompts = data.prompt[index.to(device, non_blocking=True)]
    if dropout:
        prompts = torch.where(torch.cat(coins) < dropout, data.empty, prompts)
    return Batch(x0=mean + std * draws[:, 0], noise=draws[:, 1], u=torch.cat(us), joint=data.joint[prompts],
                 pooled=data.pooled[prompts], weight=torch.full((len(index),), weight, device=device))


def micro_batch(data: TrainingSet, step: int, start: int, size: int, effective: int, settings: TrainParams, draw_u,
                generator: torch.Generator) -> list[Batch]:
    """Samples [start, start + size) of optimizer step `step`, which draws `effective` instance images (and as many
    class images, with prior preservation) from one bucket per stream. A process's micro-batch m of A, on rank r of
    W, is start = (m·W + r)·size with effective = size·A·W. One Batch per bucket involved (one forward pass each)."""
    if settings.caption_dropout and data.empty is None:
        raise CacheError("train.caption_dropout: the embeddings cache has no empty prompt (got a cache from an "
                         "older yem). Rerun: dvc repro -f encode.")
    parts = []
    for stream, (prior, weight) in enumerate(((False, 1.0), (True, settings.prior_loss_weight))):
        populations = data.populations(prior)
        if populations:
            seed = settings.seed + stream
            bucket, served = step_source(populations, seed, settings.repeats, effective, step)
            index, flip = positions(populations[bucket], seed + bucket * BUCKET_STRIDE, settings.repeats,
                                    served * effective + start, size)
            first = step * effective + start  # the global position of the first sample
            seeds = [sample_seed(settings.seed, stream, p) for p in range(first, first + size)]
            parts.append(make_batch(data, index, flip, seeds, weight, draw_u, generator, settings.caption_dropout))
    return Batch.joined(parts)


def largest_batch(data: TrainingSet, size: int, settings: TrainParams, draw_u, generator: torch.Generator
                  ) -> list[Batch]:
    """`size` samples of the largest bucket (the most pixels) of each stream: what sizing the batch plans for."""
    parts = []
    for stream, (prior, weight) in enumerate(((False, 1.0), (True, settings.prior_loss_weight))):
        populations = data.populations(prior)
        if populations:
            largest = max(populations, key=lambda p: math.prod(data.stacks[int(data.bucket[p[0]])].size))
            index, flip = positions(largest, settings.seed + stream, settings.repeats, 0, size)
            seeds = [sample_seed(settings.seed, stream, p) for p in range(size)]
            parts.append(make_batch(data, index, flip, seeds, weight, draw_u, generator, settings.caption_dropout))
    return Batch.joined(parts)


def sample_seed(seed: int, stream: int, position: int) -> int:
    """The seed of the sample at `position` of instance (0) or class (1) stream."""
    return ((seed * 1_000_003 + position) * 4099 + stream) % (1 << 63)
