"""Will it fit? The memory each stage needs, estimated before any weights load, against the budget.

Sizes come from the model's files when they are on disk (transformer/config.json for the architecture, safetensors
headers for exact parameter counts: no weights are read) and otherwise from the known SD3 family
(`KNOWN_MODELS`: parameters and stored buffers of the diffusers/transformers models built on the meta device). The
stages, as yem runs them (s = bytes per element of the chosen dtype):

  encode   the largest text encoder, alone in memory: T5-XXL's 4.76 B params are 9.5 GB in fp16 (19 GB in fp32,
           which is what a CPU uses), plus 24 s per token × width for one chunk of 8 prompts
  latents  the VAE in fp32 + its encoder's activations at the training resolution
  train    the transformer at s + LoRA params, grads and AdamW state (16 B per param, all fp32) + the cached latents
           and embeddings + the activations kept for the backward pass (the formula below)
  render   the transformer and the VAE at s + the larger of one transformer call (batch 2: classifier-free
           guidance) and one VAE decode

Activation formula. With W = heads × head_dim, image tokens I = (resolution / 8 / patch)², text tokens
X = 77 CLIP + encode.max_sequence_length T5 (zeros without T5, but still there), T = I + X, B = batch, L = layers;
counts are in elements of a hidden state: i = B·I·W, x = B·X·W, u = i + x:

  kept per block        (6.1 s + 6.1·4) i      activations autograd keeps for the image stream; the fp32 part is
                        + 8.5 s x              peft's LoRA path (the LoRA targets sit on the image stream only)
                        + 3.0·4 u if qk_norm   (RMSNorm computes in fp32)
                        + (1.4 s + 2.8·4) i    for an MMDiT-X block's second attention (SD3.5-medium: 13 blocks)
  backward working set  8.3 s u                gradients in flight for one block
  checkpointing         keeps 1.3 s u per block (its inputs) and recomputes one block at a time in backward
  attention scores      where attention runs as torch's math composite (MPS), every block keeps its (T × T)
                        probabilities in fp32 whatever the dtype, B × heads × T² × 4 bytes, and backward needs
                        2.9 × that for one block; flash/efficient kernels (CUDA, CPU) keep O(T) instead
  render, per call      14 s u for the batch of 2, + 2.3 × one block's scores on MPS
  VAE                   encode and decode 6 fp32 elements per pixel × its first block's width (128 in SD3), or
                        twice the mid-block's (resolution/8)⁴ fp32 attention scores on MPS if larger

Where the constants come from: the per-block, backward and render ones were measured on the CPU (torch 2.13,
diffusers 0.42, peft LoRA on attn.to_q/k/v/out.0, fp32 and bf16) by counting the bytes of every live tensor with
a TorchDispatchMode (and the kept ones with saved_tensors_hooks) in forward + backward of SD3Transformer2DModel
with 4-8 blocks, width 256-512, 1024 image and 16-300 text tokens; they were linear in L, I, X, W and B to within
5 %. On an H100 (torch 2.11, bf16, the SD3-medium architecture with random weights, 512 and 1024 px, batch 1-4)
the formula matched torch.cuda.max_memory_allocated within 1 % without checkpointing and was 16 % over with it.
The score constants come from the same H100 runs with SDPA forced to the math backend (within 4 %); SimpleTuner's
MPS measurement of one fp32 attention (H 24, 6144 tokens: 11.98 GiB = 1 kept + 2.55 transient score matrices)
agrees within 10 %, but no SD3 step has been measured on a Mac. Render, VAE and T5 were measured on the same H100
(SD3-medium, SD3's VAE and T5-XXL with random weights, 512 and 1024 px); the GPU needed more than the CPU's
live-tensor count (12.3, 5.0 and 6.0 elements: cuBLAS/cuDNN workspaces, and diffusers' VAE upsamplers compute in
fp32 for bf16 inputs), so the constants are the GPU's. tests/test_estimate.py re-measures a configuration the
formula was not fitted on. These are tensor bytes: allocators hold more. On the CPU, glibc kept 2.2× the live
activations in RSS (`ALLOCATOR_OVERHEAD`); the MPS and CUDA caches are covered by the budget's and the batch
planner's margins.
"""

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from yem.batching import MAX_AUTO_BATCH, PLAN_MARGIN
from yem.errors import ModelError
from yem.memory import gib
from yem.params import Params, TrainParams

CLIP_TOKENS = 77
ENCODE_CHUNK = 8  # prompts per text-encoder call (yem.text.CHUNK)
LORA_BYTES_PER_PARAM = 16  # fp32 weight + grad + AdamW's two moments
# Share of SD3-medium's transformer parameters that int8 stores in one byte (the blocks' Linears): its bf16
# weights measured 3.99 GiB, int8 2.12 GiB with the scales (benchmarks/RESULTS.md, CPU int8 section).
INT8_QUANTIZED_SHARE = 0.94
LATENT_CHANNELS, VAE_SCALE = 16, 8

KEPT_IMAGE_AT_DTYPE, KEPT_IMAGE_FP32, KEPT_TEXT_AT_DTYPE = 6.1, 6.1, 8.5
QK_NORM_FP32 = 3.0
DUAL_AT_DTYPE, DUAL_FP32 = 1.4, 2.8
BACKWARD_AT_DTYPE = 8.3
CHECKPOINT_AT_DTYPE = 1.3
SCORE_BYTES = 4  # the math composite keeps softmax probabilities in fp32, even for bf16/fp16 inputs
SCORES_BACKWARD = 2.9
RENDER_AT_DTYPE = 14.0
RENDER_SCORES = 2.3
ENCODER_AT_DTYPE = 24.0  # per token × width of the text encoder, one chunk
VAE_ENCODE_PER_PIXEL = VAE_DECODE_PER_PIXEL = 6.0  # fp32 elements per pixel × the VAE's first width
ALLOCATOR_OVERHEAD = {"cpu": 2.2, "mps": 1.0, "cuda": 1.0}  # applied to activations
TIGHT = 0.85  # of the limit: an estimate this close may well not fit (allocator caches, other apps)
ENCODER_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5-XXL"}
KEEPS_SCORES = {"mps"}  # backends whose attention keeps the (T × T) softmax for backward (the math composite)


@dataclass(frozen=True, slots=True)
class Architecture:
    name: str
    layers: int
    heads: int
    head_dim: int
    patch_size: int
    joint_dim: int  # width of the text embeddings (T5's: 4096 in SD3)
    qk_norm: bool
    dual_attention_layers: int  # MMDiT-X blocks with a second, image-only attention
    transformer_params: int  # parameters and stored buffers (the positional embedding)
    vae_params: int
    vae_width: int  # the VAE's first block width: its activations at full resolution scale with it
    text_encoders: dict[str, tuple[int, int]] = field(default_factory=dict)  # clip_l/clip_g/t5 -> (params, width)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


# SD3's text encoders and VAE, shared by every SD3 and SD3.5 model, counted on the meta device from the configs in
# notes/diffusers.md §4 (transformers 5.24, diffusers 0.42). T5's input embedding is tied to `shared` and held once:
# 4.76 B params, 9.5 GB in fp16 (the 4.89 B in the notes counts that 131.6 M embedding twice).
SD3_TEXT_ENCODERS = {"clip_l": (123_650_304, 768), "clip_g": (694_659_840, 1280), "t5": (4_762_310_656, 4096)}
SD3_VAE_PARAMS = 83_819_683


def _sd3(name: str, layers: int, transformer: int, pos_embed: int, qk_norm: bool, dual: int) -> Architecture:
    return Architecture(name=name, layers=layers, heads=layers, head_dim=64, patch_size=2, joint_dim=4096,
                        qk_norm=qk_norm, dual_attention_layers=dual, transformer_params=transformer + pos_embed,
                        vae_params=SD3_VAE_PARAMS, vae_width=128, text_encoders=dict(SD3_TEXT_ENCODERS))


_SD35_LARGE = _sd3("SD3.5-large", 38, 8_056_627_520, 89_653_248, True, 0)
KNOWN_MODELS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": _sd3("SD3-medium", 24, 2_028_328_000, 56_623_104, False, 0),
    "stabilityai/stable-diffusion-3.5-medium": _sd3("SD3.5-medium", 24, 2_243_171_520, 226_492_416, True, 13),
    "stabilityai/stable-diffusion-3.5-large": _SD35_LARGE,
    "stabilityai/stable-diffusion-3.5-large-turbo": replace(_SD35_LARGE, name="SD3.5-large-turbo"),
}
TEXT_FOLDERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}


def architecture_from_folder(folder: Path, name: str) -> Architecture:
    """Read a diffusers SD3 folder: configs, and parameter counts from the safetensors headers."""
    config = _json(folder / "transformer" / "config.json")
    vae = _json(folder / "vae" / "config.json")
    encoders = {}
    for key, sub in TEXT_FOLDERS.items():
        if (folder / sub / "config.json").exists():
            text = _json(folder / sub / "config.json")
            counted = stored_params(folder / sub) or SD3_TEXT_ENCODERS[key][0]
            encoders[key] = (counted, text.get("d_model") or text["hidden_size"])
    return Architecture(
        name=name, layers=config["num_layers"], heads=config["num_attention_heads"],
        head_dim=config["attention_head_dim"], patch_size=config["patch_size"],
        joint_dim=config["joint_attention_dim"], qk_norm=bool(config.get("qk_norm")),
        dual_attention_layers=len(config.get("dual_attention_layers") or ()),
        transformer_params=stored_params(folder / "transformer") or _known_size(config),
        vae_params=stored_params(folder / "vae") or SD3_VAE_PARAMS, vae_width=vae["block_out_channels"][0],
        text_encoders=encoders)


def stored_params(folder: Path) -> int:
    """Elements in every safetensors file of a folder, from the headers alone (8-byte length + JSON)."""
    total = 0
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= dim
                total += count
    return total


def _known_size(config: dict) -> int:
    """A transformer without safetensors (.bin only): the known model with the same depth, else SD3-medium's."""
    same = [a for a in KNOWN_MODELS.values() if a.layers == config["num_layers"]]
    return (same or list(KNOWN_MODELS.values()))[0].transformer_params


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e}). Check that the model folder is complete.")


def architecture_for(model_id: str, revision: str | None = None) -> Architecture:
    """tiny: the folder yem builds; a local folder: its files; a hub id: its downloaded copy, else the table."""
    if model_id == "tiny":
        from yem.tiny import ensure_tiny_model

        return architecture_from_folder(ensure_tiny_model(), "tiny SD3")
    folder = Path(model_id).expanduser()
    if folder.is_dir():
        return architecture_from_folder(folder, folder.name)
    cached = _hub_snapshot(model_id, revision)
    if cached is not None and (cached / "transformer" / "config.json").exists():
        return architecture_from_folder(cached, model_id.split("/")[-1])
    if model_id in KNOWN_MODELS:
        return KNOWN_MODELS[model_id]
    raise ModelError(f"model.id: {model_id} is not downloaded and not a model yem knows the size of (got "
                     f"{model_id!r}). Download it (`hf download {model_id}`) to estimate its memory.")


def _hub_snapshot(model_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # not cached, not a valid id, offline: fall back to the known table
        return None


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

    @property
    def text_tokens(self) -> int:
        return CLIP_TOKENS + self.t5_tokens


def workload(params: Params, backend: str, dtype_bytes: int, images: int = 30) -> Workload:
    """The workload of a params.yaml; auto settings start at batch 1 without checkpointing (see `resolve_auto`)."""
    train = params.train
    return Workload(backend=backend, dtype_bytes=dtype_bytes, resolution=params.data.resolution,
                    render_resolution=params.render.resolution or params.data.resolution,
                    batch_size=1 if train.batch_size == "auto" else train.batch_size,
                    checkpointing=train.gradient_checkpointing is True, rank=train.rank, targets=len(train.targets),
                    use_t5=params.encode.use_t5, t5_tokens=params.encode.max_sequence_length,
                    quantized_base=train.quantize_base == "int8", images=images,
                    prompts=images + len(params.prompts.validation) + 1)


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
    used = {k: v for k, v in arch.text_encoders.items() if k != "t5" or work.use_t5}
    if not used:
        return StageEstimate("encode", {})
    name = max(used, key=lambda k: used[k][0])
    params, width = used[name]
    tokens = work.t5_tokens if name == "t5" else CLIP_TOKENS
    activations = ENCODER_AT_DTYPE * ENCODE_CHUNK * tokens * width * work.dtype_bytes
    return StageEstimate("encode", {f"{ENCODER_LABELS[name]} weights": params * work.dtype_bytes,
                                    "activations": _allocated(activations, work)})


def latents_stage(arch: Architecture, work: Workload) -> StageEstimate:
    """The VAE encodes one image at a time, in fp32."""
    pixels = work.resolution**2
    activations = max(VAE_ENCODE_PER_PIXEL * arch.vae_width * pixels * 4, _vae_scores(work.resolution, work))
    return StageEstimate("latents", {"VAE weights (fp32)": arch.vae_params * 4,
                                     "activations": _allocated(activations, work)})


def train_stage(arch: Architecture, work: Workload) -> StageEstimate:
    latent = (work.resolution // VAE_SCALE) ** 2 * LATENT_CHANNELS * 4
    cached = work.images * 2 * latent + work.prompts * work.text_tokens * arch.joint_dim * 4  # means + stds, embeds
    return StageEstimate("train", {"transformer weights": training_weights(arch, work),
                                   "LoRA + AdamW": lora_params(arch, work) * LORA_BYTES_PER_PARAM,
                                   "cached latents + embeddings": cached,
                                   "activations": _allocated(train_activations(arch, work), work)})


def training_peak(arch: Architecture, train: TrainParams, backend: str, dtype_bytes: int, resolution: int,
                  text_tokens: int, images: int, prompts: int) -> Callable[[int, bool], int]:
    """peak(batch, checkpointing): the estimated bytes of one training step of this run, in the form the batch
    planner measures it (yem.batching.Measure). `text_tokens` is the cached embeddings' length (77 CLIP + T5)."""
    work = Workload(backend=backend, dtype_bytes=dtype_bytes, resolution=resolution, render_resolution=resolution,
                    batch_size=1, checkpointing=False, rank=train.rank, targets=len(train.targets), use_t5=True,
                    t5_tokens=text_tokens - CLIP_TOKENS, quantized_base=train.quantize_base == "int8",
                    images=images, prompts=prompts)
    return lambda batch, checkpointing: train_stage(arch, replace(work, batch_size=batch,
                                                                  checkpointing=checkpointing)).total


def training_weights(arch: Architecture, work: Workload) -> float:
    """The frozen base in training: int8 stores the blocks' Linear weights (most of the parameters) in one byte."""
    if not work.quantized_base:
        return arch.transformer_params * work.dtype_bytes
    share = INT8_QUANTIZED_SHARE
    return arch.transformer_params * (share * 1 + (1 - share) * work.dtype_bytes)


def render_stage(arch: Architecture, work: Workload) -> StageEstimate:
    s, guided = work.dtype_bytes, replace(work, batch_size=2, resolution=work.render_resolution)
    transformer_call = RENDER_AT_DTYPE * sum(_units(arch, guided)) * s + RENDER_SCORES * _scores(arch, guided)
    decode = max(VAE_DECODE_PER_PIXEL * arch.vae_width * work.render_resolution**2 * 4,
                 _vae_scores(work.render_resolution, work))
    return StageEstimate("render", {"transformer + VAE weights": (arch.transformer_params + arch.vae_params) * s,
                                    "LoRA": lora_params(arch, work) * 4,
                                    "activations": _allocated(max(transformer_call, decode), work)})


def train_activations(arch: Architecture, work: Workload) -> float:
    """Bytes of activations at the peak of one training step (forward + backward), before allocator overhead."""
    s, (image, text) = work.dtype_bytes, _units(arch, work)
    units = image + text
    per_block = (image * (KEPT_IMAGE_AT_DTYPE * s + KEPT_IMAGE_FP32 * 4) + text * KEPT_TEXT_AT_DTYPE * s
                 + (units * QK_NORM_FP32 * 4 if arch.qk_norm else 0))
    scores = _scores(arch, work, text=True)
    dual_block = image * (DUAL_AT_DTYPE * s + DUAL_FP32 * 4) + _scores(arch, work, text=False)
    backward = BACKWARD_AT_DTYPE * units * s + SCORES_BACKWARD * scores
    if work.checkpointing:  # block inputs kept; one block recomputed with everything it keeps
        recomputed = per_block + scores + (dual_block if arch.dual_attention_layers else 0.0)
        return arch.layers * CHECKPOINT_AT_DTYPE * units * s + recomputed + backward
    return arch.layers * (per_block + scores) + arch.dual_attention_layers * dual_block + backward


def _units(arch: Architecture, work: Workload) -> tuple[int, int]:
    """Elements of the image and the text hidden states: (B·I·W, B·X·W)."""
    image_tokens = (work.resolution // VAE_SCALE // arch.patch_size) ** 2
    return work.batch_size * image_tokens * arch.width, work.batch_size * work.text_tokens * arch.width


def _scores(arch: Architecture, work: Workload, text: bool = True) -> float:
    """One attention's (T × T) probabilities, where the backend's attention keeps them; `text` False: the
    image-only second attention of MMDiT-X blocks."""
    if work.backend not in KEEPS_SCORES:
        return 0.0
    tokens = (work.resolution // VAE_SCALE // arch.patch_size) ** 2 + (work.text_tokens if text else 0)
    return work.batch_size * arch.heads * tokens**2 * SCORE_BYTES


def _vae_scores(resolution: int, work: Workload) -> float:
    """The VAE mid-block's single-head attention over (resolution / 8)² positions: scores and softmax."""
    return 2 * (resolution // VAE_SCALE) ** 4 * SCORE_BYTES if work.backend in KEEPS_SCORES else 0.0


def _allocated(tensor_bytes: float, work: Workload) -> int:
    return int(tensor_bytes * ALLOCATOR_OVERHEAD.get(work.backend, 1.0))


def lora_params(arch: Architecture, work: Workload) -> int:
    """rank × (in + out) per target and block; attention projections are width → width (an FF target is
    width → 4 width: this undercounts it, by a few MB at most)."""
    return arch.layers * work.targets * work.rank * 2 * arch.width


STAGES = {"encode": encode_stage, "latents": latents_stage, "train": train_stage, "render": render_stage}


def resolve_auto(arch: Architecture, work: Workload, budget: int, train: TrainParams) -> tuple[Workload, str]:
    """Decide `auto` as training will (checkpointing only when batch 1 does not fit without it) and predict the
    batch `auto` will measure its way to. Returns the workload at the first batch tried, and a note."""
    limit = budget * PLAN_MARGIN
    notes = []
    if train.gradient_checkpointing == "auto":
        without = train_stage(arch, replace(work, checkpointing=False)).total
        work = replace(work, checkpointing=without > limit)
        notes.append(f"gradient checkpointing {'on' if work.checkpointing else 'off'} (auto: batch "
                     f"{work.batch_size} needs {gib(without)} without it)")
    if train.batch_size == "auto":
        expected = largest_batch(arch, work, budget)
        notes.append(f"batch auto: about {expected} per step expected" if expected else
                     "batch auto: not even 1 per step is expected to fit")
    return work, "; ".join(notes)


def largest_batch(arch: Architecture, work: Workload, budget: int) -> int:
    """The largest batch the estimate puts under the planner's margin (0 when batch 1 does not fit)."""
    one = train_stage(arch, replace(work, batch_size=1)).total
    per_image = train_stage(arch, replace(work, batch_size=2)).total - one
    limit = budget * PLAN_MARGIN
    return 0 if one > limit else min(MAX_AUTO_BATCH, 1 + int((limit - one) / per_image))


@dataclass(frozen=True, slots=True)
class Verdict:
    stage: str
    needs: int
    fits: bool
    tight: bool  # fits, but within 15 % of the limit
    largest: str  # what takes most of it: "T5-XXL weights 9.1 GiB"
    advice: list[str]


def verdicts(arch: Architecture, work: Workload, budget: int, machine: str) -> list[Verdict]:
    """Each stage against the budget (train against the batch planner's 90 %), with advice where it is over
    or tight."""
    found = []
    for stage in estimate(arch, work):
        limit = _limit(stage.stage, budget)
        fits, tight = stage.total <= limit, TIGHT * limit < stage.total <= limit
        name, size = max(stage.parts.items(), key=lambda item: item[1]) if stage.parts else ("nothing", 0)
        advice = advise(stage.stage, arch, work, budget, machine) if tight or not fits else []
        found.append(Verdict(stage.stage, stage.total, fits, tight, f"{name} {gib(size)}", advice))
    return found


def _limit(stage: str, budget: int) -> float:
    return budget * PLAN_MARGIN if stage == "train" else budget


def advise(stage: str, arch: Architecture, work: Workload, budget: int, machine: str) -> list[str]:
    """What to change in params.yaml, each with what the stage would then need (from this same estimate)."""
    advice = []
    for setting, changed in _changes(stage, work):
        needs = STAGES[stage](arch, changed).total
        verdict = "fits" if needs <= _limit(stage, budget) else "still over"
        advice.append(f"{machine}: set {setting} ({stage} then needs {gib(needs)}, {verdict} the {gib(budget)} budget)")
    weights = sum(size for part, size in STAGES[stage](arch, work).parts.items() if "weights" in part)
    if stage in ("train", "render") and weights > _limit(stage, budget):
        advice.append(f"{machine}: the {arch.name} weights alone exceed the budget; use a smaller base model (SD3.5 "
                      f"medium rather than large) or a machine with more memory")
    return advice


def _changes(stage: str, work: Workload) -> list[tuple[str, Workload]]:
    """The params.yaml settings that shrink a stage, and the workload each leads to."""
    half, render_half = _half(work.resolution), _half(work.render_resolution)
    if stage == "encode":
        found = [("encode.use_t5: false", replace(work, use_t5=False))] if work.use_t5 else []
        if work.dtype_bytes == 4 and work.backend != "cpu":
            found.append(("device.mixed_precision: auto", replace(work, dtype_bytes=2)))
        return found
    if stage == "latents":
        return [(f"data.resolution: {half}", replace(work, resolution=half))]
    if stage == "render":
        return [(f"render.resolution: {render_half}", replace(work, render_resolution=render_half))]
    found = [] if work.checkpointing else [("train.gradient_checkpointing: auto", replace(work, checkpointing=True))]
    if work.batch_size > 1:
        found.append(("train.batch_size: auto", replace(work, batch_size=1)))
    if not work.quantized_base:
        found.append(("train.quantize_base: int8", replace(work, quantized_base=True)))
    smaller = replace(work, resolution=half, render_resolution=half, checkpointing=True)
    also = "" if work.checkpointing else " with train.gradient_checkpointing: auto"
    return found + [(f"data.resolution: {half}{also}", smaller)]


def _half(resolution: int) -> int:
    """Half the resolution, kept a multiple of 16 (latent ×8, patch ×2) and at least 64."""
    return max(64, resolution // 2 // 16 * 16)
