"""The arithmetic of one training step: matmul FLOPs, counted from the architecture, for time estimates.

A step is forward + backward of the transformer with its base frozen. Each Linear costs 2·in·out FLOPs per token
forward and the same again backward (the input's gradient; the frozen weight gets none). Per block and token
stream (image: I tokens, text: X tokens, width W):

  projections   q, k, v, out (4 W²) and the feed-forward (W → 4W → W: 8 W²), on both streams (the last block's
                text stream stops after q, k, v: SD3's context_pre_only); MMDiT-X blocks (SD3.5-medium) add an
                image-only q, k, v, out; the first block's inputs need no gradient, so its q, k, v skip theirs
  attention     Q Kᵀ and P V: 4 T² W forward, T = I + X; backward recomputes S and forms dV, dP, dQ, dK:
                10 T² W for chunked attention (yem.model.chunked), 8 T² W where the scores are kept
  LoRA          rank r on each target: 2 r (W + W) per token forward, twice that backward (input and weight)
  checkpointing runs each block's forward once more in backward

tests/test_flops.py holds this against torch's FlopCounterMode on the real step (the tiny model, and SD3-medium,
SD3.5-medium and SD3.5-large on the meta device); the modulation Linears (one token per sample), the embedders and
the final projection are left out, under 1 % of a step.
"""

from yem.model.architecture import Architecture
from yem.model.footprint import VAE_SCALE, Workload


def step_flops(arch: Architecture, work: Workload) -> float:
    """Matmul FLOPs of one training step of `work` (batch, resolution, text tokens, checkpointing, LoRA rank and
    targets, attention) on `arch`."""
    width, batch = arch.width, work.batch_size
    image = (work.resolution // VAE_SCALE // arch.patch_size) ** 2
    text, tokens = work.text_tokens, image + work.text_tokens
    layers = arch.layers
    projections = 2 * width**2 * (12 * image * layers + 12 * text * (layers - 1) + 3 * text)
    projections += 2 * width**2 * 4 * image * arch.dual_attention_layers
    attention = 4 * tokens**2 * width * layers + 4 * image**2 * width * arch.dual_attention_layers
    lora = 2 * work.rank * 2 * width * work.targets * image * layers
    backward_attention = (10 if work.attention == "chunked" else 8) / 4 * attention
    forward = projections + attention + lora
    # the first block's inputs need no gradient: its q, k, v projections (both streams) skip theirs
    backward = projections - 2 * width**2 * 3 * tokens + backward_attention + 2 * lora
    return batch * (forward * (2 if work.checkpointing else 1) + backward)
