"""SD3 rectified-flow training math. Pure tensor functions; shapes: latents (B, 16, H/8, W/8), sigma (B,).

Flow time sigma ∈ [0, 1] runs from data (0) to noise (1): x_sigma = (1 - sigma)·x0 + sigma·noise, and the
transformer predicts the velocity dx/dsigma = noise - x0. The model is called with timestep = 1000·sigma.
"""

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

NUM_TRAIN_TIMESTEPS = 1000


def sample_u(batch: int, scheme: str, generator: torch.Generator, logit_mean: float, logit_std: float,
             mode_scale: float, device: torch.device) -> torch.Tensor:
    """(B,) u in [0, 1] from SD3's timestep density (logit-normal by default), drawn on `device`."""
    return compute_density_for_timestep_sampling(scheme, batch, logit_mean, logit_std, mode_scale, device=device,
                                                 generator=generator)


def sigmas_at(sigma_table: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The scheduler's shifted sigma at index ⌊u·1000⌋. `sigma_table` is (1000,), descending from 1 (noise)."""
    index = (u * len(sigma_table)).long().clamp_(0, len(sigma_table) - 1)  # "mode" can reach u = 1
    return sigma_table[index]


def sample_sigmas(sigma_table: torch.Tensor, batch: int, scheme: str, generator: torch.Generator,
                  logit_mean: float, logit_std: float, mode_scale: float) -> torch.Tensor:
    """(B,) sigmas: u from SD3's density, looked up in the shifted schedule, on the table's device."""
    return sigmas_at(sigma_table, sample_u(batch, scheme, generator, logit_mean, logit_std, mode_scale,
                                           sigma_table.device))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - s) * x0 + s * noise


def timesteps(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def per_sample_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, noisy: torch.Tensor,
                    sigma: torch.Tensor, scheme: str, precondition: bool) -> torch.Tensor:
    """(B,) weighted MSE in fp32. Velocity target by default; with `precondition`, the x0 estimate
    x_sigma - sigma·v̂ against x0 (SD3's preconditioned form, equal to sigma² × the velocity loss)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    prediction = prediction.float()
    if precondition:
        prediction, target = noisy - s * prediction, x0
    else:
        target = noise - x0
    weight = compute_loss_weighting_for_sd3(scheme, s).float()  # (B, 1, 1, 1): ones for logit_normal
    return (weight * (prediction - target) ** 2).flatten(1).mean(1)
