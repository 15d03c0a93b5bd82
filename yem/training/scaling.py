"""Loss scaling for fp16: gradients that flow back through fp16 activations keep their size.

fp16 cannot hold a magnitude below 6e-8 (its smallest subnormal), and a LoRA's gradients reach it through the
frozen fp16 base, where small ones round to zero. So the loss is multiplied by a large scale before backward and
the LoRA's fp32 gradients are divided by it again before clipping and the optimizer step (torch.amp.GradScaler:
what the diffusers example gets from accelerate in fp16). A scale too large overflows to Inf: that update is
skipped and the scale halved; after GROWTH_INTERVAL clean steps it doubles.

bf16 and fp32 have fp32's exponent range and need no scaling: their scaler is disabled and passes everything
through. An overflow is ordinary dynamic scaling, not trouble: it is counted apart from non-finite steps and never
leads to a rollback. The scaler's state (scale, growth tracker) rides in every checkpoint, so a resumed run scales
exactly as an uninterrupted one. Whether a device can scale at all is yem.hardware.precision's to say.
"""

import torch

INITIAL_SCALE = 2.0**16  # torch's default: loss × 65536
GROWTH_INTERVAL = 2000  # clean steps before the scale doubles (torch's default)


def make_scaler(backend: str, dtype: torch.dtype) -> torch.amp.GradScaler:
    """A scaler that scales in fp16 and passes through otherwise."""
    return torch.amp.GradScaler(backend, init_scale=INITIAL_SCALE, growth_interval=GROWTH_INTERVAL,
                                enabled=dtype == torch.float16)


def restored(backend: str, dtype: torch.dtype, saved: dict) -> torch.amp.GradScaler:
    """The scaler a restored run goes on with: the saved state in fp16, a disabled one otherwise (a rollback to
    fp32 ends scaling)."""
    scaler = make_scaler(backend, dtype)
    if scaler.is_enabled() and saved:
        scaler.load_state_dict(saved)
    return scaler


def verdict(scaler: torch.amp.GradScaler, loss: torch.Tensor, norm: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(bad, overflow), each a () bool on the device, for a step whose gradients were unscaled and clipped to
    `norm`. The update is skipped when either is true. `overflow`: the loss is finite and only the scaled
    gradients were not, at a scale of at least 1 (below that the scale is not what overflowed). `bad`: a
    non-finite step otherwise, the kind that counts towards a rollback."""
    skip = ~(torch.isfinite(norm) & torch.isfinite(loss))
    if not scaler.is_enabled():
        return skip, torch.zeros_like(skip)
    scale = scaler.scale(torch.ones((), device=loss.device))  # the current scale, without waiting for it
    overflow = skip & torch.isfinite(loss) & (scale >= 1)
    return skip & ~overflow, overflow
