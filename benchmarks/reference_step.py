"""The diffusers example's training step (examples/dreambooth/train_dreambooth_lora_sd3.py), re-expressed for the
side-by-side benchmark: same model, same LoRA, same maths, and the same per-step host work as the example.

What the example does every step, and this reproduces (written from reading it, not copied):
- `latent_dist.sample()` from the cached posterior, then shift/scale; with `vae_encode` the fp32 VAE encodes the
  pixels instead (the example's default, without --cache_latents);
- u drawn on the CPU, timesteps looked up on the CPU and copied to the device, and each sigma found with a
  `(schedule == t).nonzero().item()` (one device sync per sample);
- the forward under bf16 autocast (accelerate's mixed_precision=bf16), the loss in fp32, `accelerator.backward`, clip, a
  plain (non-fused) AdamW step, and `loss.detach().item()` for the progress bar (another sync).
"""

from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


@dataclass
class ReferenceRun:
    accelerator: object
    model: torch.nn.Module
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object  # FlowMatchEulerDiscreteScheduler: its timesteps and sigmas live on the CPU
    mean: torch.Tensor  # (N, 16, h, w) cached posterior, unscaled as the VAE gives it
    std: torch.Tensor
    joint: torch.Tensor  # (N, 154, 4096)
    pooled: torch.Tensor  # (N, 2048)
    batch: int
    vae: torch.nn.Module | None = None  # encode pixels every step instead of sampling the cache
    pixels: torch.Tensor | None = None  # (N, 3, H, W) on the CPU (the example's dataloader output)


def build(accelerator, transformer, targets: list[str], rank: int, mean, std, joint, pooled, batch: int,
          gradient_checkpointing: bool, vae=None, pixels=None) -> ReferenceRun:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    cast_training_params(transformer, dtype=torch.float32)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    return ReferenceRun(accelerator, model, params, optimizer, FlowMatchEulerDiscreteScheduler(shift=3.0), mean, std,
                        joint, pooled, batch, vae, pixels)


def step(run: ReferenceRun, number: int) -> float:
    accelerator, device = run.accelerator, run.accelerator.device
    rows = torch.arange(number * run.batch, (number + 1) * run.batch) % len(run.mean)
    if run.vae is not None:
        pixels = run.pixels[rows].to(device, torch.float32)
        posterior = run.vae.encode(pixels).latent_dist
        latents = (posterior.sample() - run.vae.config.shift_factor) * run.vae.config.scaling_factor
    else:
        latents = run.mean[rows] + run.std[rows] * torch.randn_like(run.std[rows])
        latents = (latents - 0.0609) * 1.5305
    latents = latents.to(torch.bfloat16)
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling("logit_normal", run.batch, 0.0, 1.0, 1.29)  # on the CPU
    timesteps = run.scheduler.timesteps[(u * 1000).long()].to(device)
    sigmas_table = run.scheduler.sigmas.to(device, latents.dtype)
    schedule = run.scheduler.timesteps.to(device)
    indices = [(schedule == t).nonzero().item() for t in timesteps]  # a device sync per sample
    sigmas = sigmas_table[indices].flatten().view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    with torch.autocast(device.type, dtype=torch.bfloat16):  # what accelerate's bf16 mixed precision does
        prediction = run.model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=run.joint[rows],
                               pooled_projections=run.pooled[rows], return_dict=False)[0]
    weighting = compute_loss_weighting_for_sd3("logit_normal", sigmas)
    target = noise - latents
    loss = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(run.batch, -1), 1)
    loss = loss.mean()
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    run.optimizer.zero_grad()
    return loss.detach().item()  # the progress bar's postfix: waits for the device
