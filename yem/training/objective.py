"""The training objective: SD3's flow-matching loss of a batch, and a held-out measure of it.

The held-out loss uses fixed noise and fixed sigmas that training never draws, on the posterior means of up to
eight instance images: lower after training than before means the adapter learned the images.
"""

import torch

from yem.data.trainset import Batch, TrainingSet
from yem.hardware.device import autocast
from yem.params import TrainParams
from yem.training import flow

HELDOUT_SIGMAS = (0.2, 0.4, 0.6, 0.8)
HELDOUT_SAMPLES = 8
HELDOUT_SEED = 20240614


def batch_loss(model, parts: list[Batch], sigma_table: torch.Tensor, settings: TrainParams, dtype: torch.dtype,
               per_instance: int) -> torch.Tensor:
    """Weighted flow-matching loss of one micro-batch: mean over instance images + w × mean over class images. One
    forward pass per part (a micro-batch's instance and class images are two parts when their buckets differ)."""
    total = None
    for batch in parts:
        sigma, noise = flow.sigmas_at(sigma_table, batch.u), batch.noise
        noisy = flow.add_noise(batch.x0, noise, sigma)
        prediction = model(hidden_states=noisy.to(dtype), timestep=flow.timesteps(sigma),
                           encoder_hidden_states=batch.joint.to(dtype), pooled_projections=batch.pooled.to(dtype),
                           return_dict=False)[0]
        losses = flow.per_sample_loss(prediction, batch.x0, noise, noisy, sigma, settings.weighting_scheme,
                                      settings.precondition_outputs)
        part = (losses * batch.weight).sum() / per_instance
        total = part if total is None else total + part
    return total


@torch.no_grad()
def timestep_density(settings: TrainParams, device: torch.device):
    """draw_u(generator) -> (1,): one u from SD3's timestep density (logit-normal by default), on `device`."""
    def draw_u(generator: torch.Generator) -> torch.Tensor:
        return flow.sample_u(1, settings.weighting_scheme, generator, settings.logit_mean, settings.logit_std,
                             settings.mode_scale, device)
    return draw_u


@torch.no_grad()
def heldout_loss(model, data: TrainingSet, dtype: torch.dtype) -> float:
    """Velocity MSE of up to 8 instance images at fixed sigmas with fixed noise that training never draws.

    One image per forward pass, with no autograd graph: it must fit wherever a training step of batch 1 fits
    (eight 1024 px images at once would need several times that). It runs eagerly: compiling (and on CUDA
    recording graphs) for a few dozen forward passes would cost more than it saves. The noise is drawn per bucket,
    for the bucket's images together, in the order of their ids.
    """
    chosen = data.select(prior=False)[:HELDOUT_SAMPLES]
    generator = torch.Generator().manual_seed(HELDOUT_SEED)
    total = 0.0
    with _eager(), autocast(data.joint.device.type, dtype):
        for bucket in dict.fromkeys(data.bucket[chosen].tolist()):
            index = chosen[data.bucket[chosen] == bucket]
            x0 = data.posterior(index)[0]  # (n, 16, H/8, W/8)
            noises = [torch.randn(x0.shape, generator=generator).to(x0.device) for _ in HELDOUT_SIGMAS]
            total += _heldout_sum(model, data, index, x0, noises, dtype)
    return total / (len(HELDOUT_SIGMAS) * len(chosen))


def _heldout_sum(model, data: TrainingSet, index: torch.Tensor, x0: torch.Tensor, noises: list[torch.Tensor],
                 dtype: torch.dtype) -> float:
    """The summed velocity error of images `index` (latents x0) at each held-out sigma, one image per pass."""
    total = 0.0
    for sigma_value, noise in zip(HELDOUT_SIGMAS, noises):
        for i, row in enumerate(data.prompt[index.to(data.prompt.device)].tolist()):
            sigma = torch.full((1,), sigma_value, device=x0.device)
            noisy = flow.add_noise(x0[i:i + 1], noise[i:i + 1], sigma)
            prediction = model(hidden_states=noisy.to(dtype), timestep=flow.timesteps(sigma),
                               encoder_hidden_states=data.joint[row:row + 1].to(dtype),
                               pooled_projections=data.pooled[row:row + 1].to(dtype), return_dict=False)[0]
            total += flow.per_sample_loss(prediction.float(), x0[i:i + 1], noise[i:i + 1], noisy, sigma,
                                          "none", False).sum().item()
    return total


def _eager():
    """Run compiled modules eagerly (torch >= 2.6); older torch just uses the compiled code."""
    from contextlib import nullcontext

    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else nullcontext()
