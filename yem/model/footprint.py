"""Will it fit? The memory each stage needs, estimated before any weights load, against the budget.

The model's shape comes from yem.model.architecture (no weights are read). The stages, as yem runs them (s = bytes
per element of the chosen dtype):

  encode   the largest text encoder, alone in memory: T5-XXL's 4.76 B params are 9.5 GB in fp16 (19 GB in fp32,
           which is what a CPU uses), plus 24 s per token × width for one chunk of 8 prompts
  latents  the VAE in fp32 + its encoder's activations at the training resolution
  train    the transformer at s + LoRA params, grads and AdamW state (16 B per param, all fp32) + the cached latents
           and embeddings + the activations kept for the backward pass (the formula below)
  render   the transformer and the VAE at s + the larger of one transformer call (batch 2: classifier-free
           guidance) and one VAE decode

Activation formula. With W = heads × head_dim, image tokens I = (H / 8 / patch)·(W / 8 / patch) for the
largest aspect-ratio bucket H × W (resolution² for the square), text tokens
X = 77 CLIP + encode.max_sequence_length T5 (zeros without T5, but still there), T = I + X, B = batch, L = layers;
counts are in elements of a hidden state: i = B·I·W, x = B·X·W, u = i + x:

  kept per block        (6.1 s + 6.1·4) i      activations autograd keeps for the image stream; the fp32 part is
                        + 8.5 s x              peft's LoRA path (the LoRA targets sit on the image stream only)
                        + 3.0·4 u if qk_norm   (RMSNorm computes in fp32)
                        + (1.4 s + 2.8·4) i    for an MMDiT-X block's second attention (SD3.5-medium: 13 blocks)
  backward working set  8.3 s u                gradients in flight for one block
  int8 base             + 6.0 s u per block: optimum-quanto's Linear keeps its input for backward even where the
                        weight is frozen (a plain nn.Linear then keeps nothing), 6 hidden widths per token
                        (q/k/v's and out's inputs, both feed-forward Linears', the second 4 W wide, some shared)
  checkpointing         keeps 1.3 s u per block (its inputs) and recomputes one block at a time in backward
  attention scores      where attention runs as torch's math composite (MPS with train.attention: sdpa), every
                        block keeps its (T × T) probabilities in fp32 whatever the dtype, B × heads × T² × 4 bytes,
                        and backward needs 2.9 × that for one block; flash/efficient kernels (CUDA, CPU) keep O(T)
  chunked attention     (yem.model.chunked) keeps its output in fp32 where flash keeps it at s, B·H·T·D·(4 − s)
                        more per attention, and one attention call's chunks and fp32 copies of k and v are the
                        transient (`chunk_bytes` + `fixed_bytes`: about 10 % of the budget, chosen by the budget)
  render, per call      7 s u for the batch of 2 per image (classifier-free guidance), + 2.3 × one block's scores
                        on MPS (math) or one chunk's score buffer and k, v in fp32 (chunked)
  VAE                   encode and decode 6 fp32 elements per pixel × its first block's width (128 in SD3), or
                        twice the mid-block's (resolution/8)⁴ fp32 attention scores on MPS if larger; render decodes
                        one image at a time (slicing), in 512 px tiles when tiled

Where the constants come from: the per-block, backward and render ones were measured on the CPU (torch 2.13,
diffusers 0.42, peft LoRA on attn.to_q/k/v/out.0, fp32 and bf16) by counting the bytes of every live tensor with
a TorchDispatchMode (and the kept ones with saved_tensors_hooks) in forward + backward of SD3Transformer2DModel
with 4-8 blocks, width 256-512, 1024 image and 16-300 text tokens; they were linear in L, I, X, W and B to within
5 %. On an H100 (torch 2.11, bf16, the SD3-medium architecture with random weights, 512 and 1024 px, batch 1-4)
the formula matched torch.cuda.max_memory_allocated within 1 % without checkpointing and was 16 % over with it.
The score constants come from the same H100 runs with SDPA forced to the math backend (within 4 %); SimpleTuner's
MPS measurement of one fp32 attention (H 24, 6144 tokens: 11.98 GiB = 1 kept + 2.55 transient score matrices)
agrees within 10 %, but no SD3 step has been measured on a Mac. The MPS path itself (chunked or math attention,
fp16, eager, no autocast) was measured on an H200 for issue 14: every estimate within 7 % of the allocator's peak
(benchmarks/RESULTS.md), the int8 and render constants fitted there. Render, VAE and T5 were measured on the same H100
(SD3-medium, SD3's VAE and T5-XXL with random weights, 512 and 1024 px); the GPU needed more than the CPU's
live-tensor count (12.3, 5.0 and 6.0 elements: cuBLAS/cuDNN workspaces, and diffusers' VAE upsamplers compute in
fp32 for bf16 inputs), so the constants are the GPU's. tests/test_estimate.py re-measures a configuration the
formula was not fitted on. These are tensor bytes: allocators hold more. On the CPU, glibc kept 2.2× the live
activations in RSS (`ALLOCATOR_OVERHEAD`); the MPS and CUDA caches are covered by the budget's and the batch
planner's margins.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from yem.model import chunked
from yem.model.architecture import Architecture
from yem.params import Params, TrainParams

CLIP_TOKENS = 77
ENCODE_CHUNK = 8  # prompts per text-encoder call (yem.data.text.CHUNK)
LORA_BYTES_PER_PARAM = 16  # fp32 weight + grad + AdamW's two moments
# Share of SD3-medium's transformer parameters that int8 stores in one byte (the blocks' Linears): its bf16
# weights measured 3.99 GiB, int8 2.12 GiB with the scales (benchmarks/RESULTS.md, CPU int8 section).
INT8_QUANTIZED_SHARE = 0.94
LATENT_CHANNELS, VAE_SCALE = 16, 8

KEPT_IMAGE_AT_DTYPE, KEPT_IMAGE_FP32, KEPT_TEXT_AT_DTYPE = 6.1, 6.1, 8.5
QK_NORM_FP32 = 3.0
INT8_KEPT_AT_DTYPE = 6.0  # measured on an H200, SD3-medium at 512 px, eager (benchmarks/RESULTS.md, issue 14)
DUAL_AT_DTYPE, DUAL_FP32 = 1.4, 2.8
BACKWARD_AT_DTYPE = 8.3
CHECKPOINT_AT_DTYPE = 1.3
SCORE_BYTES = 4  # the math composite keeps softmax probabilities in fp32, even for bf16/fp16 inputs
SCORES_BACKWARD = 2.9
# H200, the MPS path, SD3-medium at 1024 px with 1 and 4 images per call (benchmarks/RESULTS.md, issue 14); the
# earlier 14 came from H100 runs of one image per call, where the VAE decode and the call could not be told apart
RENDER_AT_DTYPE = 7.0
RENDER_SCORES = 2.3
ENCODER_AT_DTYPE = 24.0  # per token × width of the text encoder, one chunk
VAE_ENCODE_PER_PIXEL = VAE_DECODE_PER_PIXEL = 6.0  # fp32 elements per pixel × the VAE's first width
ALLOCATOR_OVERHEAD = {"cpu": 2.2, "mps": 1.0, "cuda": 1.0}  # applied to activations
ENCODER_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}
# Rendering, least memory last: images per pipeline call, then the side of the VAE's decode tiles (None: whole).
RENDER_IMAGES = (4, 2, 1)
VAE_TILES = (None, 512, 256)


@dataclass(frozen=True, slots=True)
class Workload:
    """What the params ask of each stage, in the terms the estimate needs."""
    backend: str
    dtype_bytes: int  # of the base weights and activations (LoRA and the latents' VAE are always fp32)
    resolution: int
    render_resolution: int
    batch_size: int
    checkpointing: bool
    rank: int
    targets: int  # LoRA target modules per block
    use_t5: bool
    t5_tokens: int
    quantized_base: bool = False  # train.quantize_base: int8
    images: int = 30
    prompts: int = 30
    attention: chunked.Kind = "sdpa"  # train.attention, resolved for the backend
    render_attention: chunked.Kind = "sdpa"
    chunk_budget: int = chunked.CHUNK_BUDGET_MAX  # bytes of one chunked attention call's chunks
    render_images: int = 1  # images per pipeline call
    vae_tile: int | None = None  # px: the side of the VAE's decode tiles; None: whole images
    size: tuple[int, int] | None = None  # (height, width) px of the largest aspect-ratio bucket; None: the square

    @property
    def text_tokens(self) -> int:
        return CLIP_TOKENS + self.t5_tokens

    @property
    def pixels(self) -> tuple[int, int]:
        """(height, width) of the largest image a training step sees."""
        return self.size or (self.resolution, self.resolution)


def workload(params: Params, backend: str, dtype_bytes: int, images: int = 30, budget: int | None = None,
             size: tuple[int, int] | None = None) -> Workload:
    """The workload of a params.yaml; auto settings start at batch 1 without checkpointing (see `resolve_auto`).
    `size`: the largest aspect-ratio bucket the photos train in, (height, width) px; None: the square."""
    train = params.train
    attention = {"attention": chunked.resolve(train.attention, backend),
                 "render_attention": chunked.resolve(params.render.attention, backend),
                 "chunk_budget": chunked.chunk_budget(budget)}
    return Workload(backend=backend, dtype_bytes=dtype_bytes, resolution=params.data.resolution,
                    render_resolution=params.render.resolution or params.data.resolution,
                    batch_size=1 if train.batch_size == "auto" else train.batch_size,
                    checkpointing=train.gradient_checkpointing is True, rank=train.rank, targets=len(train.targets),
                    use_t5=params.encode.use_t5, t5_tokens=params.encode.max_sequence_length,
                    quantized_base=train.quantize_base == "int8", images=images, size=size,
                    prompts=images + len(params.prompts.validation_prompts()) + 2, **attention)


@dataclass(frozen=True, slots=True)
class StageEstimate:
    stage: str
    parts: dict[str, int]  # what takes the memory -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def estimate(arch: Architecture, work: Workload) -> list[StageEstimate]:
    return [encode_stage(arch, work), latents_stage(arch, work), train_stage(arch, work), render_stage(arch, work)]


def encode_stage(arch: Architecture, work: Workload) -> StageEstimate:
    """One text encoder at a time: the largest one decides."""
    used = [k for k in arch.text_encoders if k != "t5" or work.use_t5]
    if not used:
        return StageEstimate("encode", {})
    return encoder_estimate(arch, max(used, key=lambda k: arch.text_encoders[k][0]), work)


def encoder_estimate(arch: Architecture, name: str, work: Workload) -> StageEstimate:
    """One text encoder (clip_l, clip_g or t5) in memory: its weights and one chunk of prompts' activations."""
    params, width = arch.text_encoders[name]
    tokens = work.t5_tokens if name == "t5" else CLIP_TOKENS
    activations = ENCODER_AT_DTYPE * ENCODE_CHUNK * tokens * width * work.dtype_bytes
    return StageEstimate("encode", {f"{ENCODER_LABELS[name]} weights": params * work.dtype_bytes,
                                    "activations": _allocated(activations, work)})


def latents_stage(arch: Architecture, work: Workload) -> StageEstimate:
    """The VAE encodes one image at a time, in fp32."""
    height, width = work.pixels
    activations = max(VAE_ENCODE_PER_PIXEL * arch.vae_width * height * width * 4, _vae_scores(work.pixels, work))
    return StageEstimate("latents", {"VAE weights (fp32)": arch.vae_params * 4,
                                     "activations": _allocated(activations, work)})


def train_stage(arch: Architecture, work: Workload) -> StageEstimate:
    latent = math.prod(side // VAE_SCALE for side in work.pixels) * LATENT_CHANNELS * 4  # the largest bucket's
    cached = work.images * 2 * latent + work.prompts * work.text_tokens * arch.joint_dim * 4  # means + stds, embeds
    return StageEstimate("train", {"transformer weights": training_weights(arch, work),
                                   "LoRA + AdamW": lora_params(arch, work) * LORA_BYTES_PER_PARAM,
                                   "cached latents + embeddings": cached,
                                   "activations": _allocated(train_activations(arch, work), work)})


def training_workload(train: TrainParams, backend: str, dtype_bytes: int, size: tuple[int, int], text_tokens: int,
                      images: int, prompts: int, memory_budget: int | None) -> Workload:
    """A train stage run on its cached data at the smallest setting its params allow: batch 1 where auto,
    checkpointing where auto or on. `size`: its largest bucket, (height, width) px; `text_tokens`: the embeddings'
    length (77 CLIP + T5)."""
    return Workload(backend=backend, dtype_bytes=dtype_bytes, resolution=max(size), render_resolution=max(size),
                    size=size,
                    batch_size=1 if train.batch_size == "auto" else train.batch_size,
                    checkpointing=train.gradient_checkpointing is not False, rank=train.rank,
                    targets=len(train.targets), use_t5=True, t5_tokens=text_tokens - CLIP_TOKENS,
                    quantized_base=train.quantize_base == "int8", images=images, prompts=prompts,
                    attention=chunked.resolve(train.attention, backend),
                    chunk_budget=chunked.chunk_budget(memory_budget))


def training_peak(arch: Architecture, work: Workload) -> Callable[[int, bool], int]:
    """peak(batch, checkpointing): the estimated bytes of one training step of `work` at another batch and
    checkpointing, in the form the batch planner measures it (yem.training.batching.Measure)."""
    return lambda batch, checkpointing: train_stage(arch, replace(work, batch_size=batch,
                                                                  checkpointing=checkpointing)).total


def training_weights(arch: Architecture, work: Workload) -> float:
    """The frozen base in training: int8 stores the blocks' Linear weights (most of the parameters) in one byte."""
    if not work.quantized_base:
        return arch.transformer_params * work.dtype_bytes
    share = INT8_QUANTIZED_SHARE
    return arch.transformer_params * (share * 1 + (1 - share) * work.dtype_bytes)


def render_stage(arch: Architecture, work: Workload) -> StageEstimate:
    s = work.dtype_bytes
    guided = replace(work, batch_size=2 * work.render_images, resolution=work.render_resolution, size=None,
                     attention=work.render_attention)
    transformer_call = RENDER_AT_DTYPE * sum(_units(arch, guided)) * s + _attention_inference(arch, guided)
    side = min(work.vae_tile or work.render_resolution, work.render_resolution)  # one image (slicing) or tile
    decode = max(VAE_DECODE_PER_PIXEL * arch.vae_width * side**2 * 4, _vae_scores((side, side), work))
    return StageEstimate("render", {"transformer + VAE weights": (arch.transformer_params + arch.vae_params) * s,
                                    "LoRA": lora_params(arch, work) * 4,
                                    "activations": _allocated(max(transformer_call, decode), work)})


def render_plans(work: Workload) -> list[Workload]:
    """The ways to render `work`, from the fastest to the least memory: fewer images per call, then VAE tiles.
    Where attention is chunked (a memory-bound machine) the VAE always decodes in tiles, so it never sets the
    peak (a whole 1024 px decode takes 3 GiB, three times a chunked transformer call)."""
    tiles = [t for t in VAE_TILES if t is None or t < work.render_resolution]
    if work.render_attention == "chunked" and len(tiles) > 1:
        tiles = tiles[1:]
    return [replace(work, render_images=n, vae_tile=t) for n in RENDER_IMAGES for t in tiles[:1]] + \
        [replace(work, render_images=1, vae_tile=t) for t in tiles[1:]]


def render_plan(arch: Architecture, work: Workload, budget: int) -> Workload:
    """The first of `render_plans` that fits the budget, else the one that needs least."""
    plans = render_plans(work)
    return next((plan for plan in plans if render_stage(arch, plan).total <= budget), plans[-1])


def train_activations(arch: Architecture, work: Workload) -> float:
    """Bytes of activations at the peak of one training step (forward + backward), before allocator overhead."""
    s, (image, text) = work.dtype_bytes, _units(arch, work)
    units = image + text
    per_block = (image * (KEPT_IMAGE_AT_DTYPE * s + KEPT_IMAGE_FP32 * 4) + text * KEPT_TEXT_AT_DTYPE * s
                 + (units * QK_NORM_FP32 * 4 if arch.qk_norm else 0)
                 + (units * INT8_KEPT_AT_DTYPE * s if work.quantized_base else 0))
    attention = _attention_kept(arch, work, text=True)
    dual_block = image * (DUAL_AT_DTYPE * s + DUAL_FP32 * 4) + _attention_kept(arch, work, text=False)
    backward = BACKWARD_AT_DTYPE * units * s + _attention_backward(arch, work)
    if work.checkpointing:  # block inputs kept; one block recomputed with everything it keeps
        recomputed = per_block + attention + (dual_block if arch.dual_attention_layers else 0.0)
        return arch.layers * CHECKPOINT_AT_DTYPE * units * s + recomputed + backward
    return arch.layers * (per_block + attention) + arch.dual_attention_layers * dual_block + backward


def _units(arch: Architecture, work: Workload) -> tuple[int, int]:
    """Elements of the image and the text hidden states: (B·I·W, B·X·W)."""
    return work.batch_size * _image_tokens(arch, work) * arch.width, work.batch_size * work.text_tokens * arch.width


def _image_tokens(arch: Architecture, work: Workload) -> int:
    """Patches of the largest image: (H / 8 / patch) × (W / 8 / patch)."""
    return math.prod(side // VAE_SCALE // arch.patch_size for side in work.pixels)


def attention_tokens(arch: Architecture, work: Workload, text: bool = True) -> int:
    """Tokens one attention attends over; `text` False: the image-only second attention of MMDiT-X blocks."""
    return _image_tokens(arch, work) + (work.text_tokens if text else 0)


def _math_scores(arch: Architecture, work: Workload, text: bool = True) -> float:
    """One attention's (T × T) fp32 probabilities, where the attention materialises them (the math composite)."""
    if work.attention == "chunked" or work.backend not in chunked.KEEPS_SCORES:
        return 0.0
    return work.batch_size * arch.heads * attention_tokens(arch, work, text) ** 2 * SCORE_BYTES


def _attention_kept(arch: Architecture, work: Workload, text: bool = True) -> float:
    """What one attention keeps for backward beyond what flash attention keeps (the constants' calibration):
    the math composite's probabilities, or chunked attention's fp32 output where flash keeps it at s."""
    if work.attention == "chunked":
        tokens = attention_tokens(arch, work, text)
        return work.batch_size * arch.heads * tokens * arch.head_dim * (4 - work.dtype_bytes)
    return _math_scores(arch, work, text)


def _chunked_transient(arch: Architecture, work: Workload, score_buffers: int) -> float:
    """One chunked attention call's working set: its chunks' fp32 buffers and the O(T) fp32 copies."""
    batch, heads, tokens, dim = work.batch_size, arch.heads, attention_tokens(arch, work), arch.head_dim
    chunk = chunked.chunk_for_budget(batch, heads, tokens, tokens, dim, work.chunk_budget)
    return (chunked.chunk_bytes(batch, heads, tokens, dim, chunk, score_buffers)
            + chunked.fixed_bytes(batch, heads, tokens, tokens, dim, work.dtype_bytes, backward=score_buffers > 1))


def _attention_backward(arch: Architecture, work: Workload) -> float:
    if work.attention == "chunked":
        return _chunked_transient(arch, work, chunked.SCORE_BUFFERS)
    return SCORES_BACKWARD * _math_scores(arch, work)


def _attention_inference(arch: Architecture, work: Workload) -> float:
    """One attention call without autograd: math's scores and softmax, or one chunk's score buffer."""
    if work.attention == "chunked":
        return _chunked_transient(arch, work, score_buffers=1)
    return RENDER_SCORES * _math_scores(arch, work)


def _vae_scores(size: tuple[int, int], work: Workload) -> float:
    """The VAE mid-block's single-head attention over (H / 8)·(W / 8) positions: scores and softmax."""
    positions = math.prod(side // VAE_SCALE for side in size)
    return 2 * positions**2 * SCORE_BYTES if work.backend in chunked.KEEPS_SCORES else 0.0


def _allocated(tensor_bytes: float, work: Workload) -> int:
    return int(tensor_bytes * ALLOCATOR_OVERHEAD.get(work.backend, 1.0))


def lora_params(arch: Architecture, work: Workload) -> int:
    """rank × (in + out) per target and block; attention projections are width → width (an FF target is
    width → 4 width: this undercounts it, by a few MB at most)."""
    return arch.layers * work.targets * work.rank * 2 * arch.width


STAGES = {"encode": encode_stage, "latents": latents_stage, "train": train_stage, "render": render_stage}
