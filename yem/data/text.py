"""SD3 prompt embeddings: CLIP-L, CLIP-G and T5, one encoder in memory at a time, cached per distinct text.

Each encoder runs on the training device where yem's estimate puts it within the memory budget, else on the CPU
(T5-XXL on a 8 GB Mac, say: 9 GiB in half precision), with a warning; never past either budget.

SD3 conditions on two tensors per prompt:
  joint  (77 + T, D): CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280 = 2048 wide in SD3),
                      zero-padded to T5's width D (4096), followed by T5's T tokens (zeros without T5);
  pooled (P,):        CLIP-L and CLIP-G projected pooled outputs side by side (768 + 1280 = 2048 in SD3).
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from yem import atomic, progress
from yem.data import cache
from yem.errors import HardwareError, YemError
from yem.hardware import device, fallbacks, memory
from yem.hardware.budget import memory_budget
from yem.hardware.memory import gib
from yem.hardware.record import Hardware
from yem.model import architecture, footprint, sd3
from yem.model.architecture import Architecture
from yem.params import EncodeParams, ModelParams, PromptParams

CHUNK = 8  # prompts per encoder call: bounds activation memory for T5-XXL
ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5": "T5"}


def text_key(text: str) -> str:
    """Cache key of a prompt: identical texts share one embedding, whatever role they play."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PromptPlan:
    texts: dict[str, str]  # key -> text, each distinct text once
    samples: dict[str, str]  # sample id -> key of its caption (or of the instance / prior prompt)
    validation: list[str]  # keys, in params order
    negative: str  # key of the negative prompt (classifier-free guidance)
    instance: str  # the instance prompt's text: the trigger people will type
    empty: str  # key of the empty prompt, which train.caption_dropout trains on

    def index(self) -> dict:
        return {"texts": self.texts, "samples": self.samples, "validation": self.validation,
                "negative": self.negative, "instance": self.instance, "empty": self.empty}


def plan_prompts(prompts: PromptParams, captions: dict[str, str | None]) -> PromptPlan:
    """Decide the text for every sample (its caption, else the instance or prior prompt) and for rendering."""
    samples: dict[str, str] = {}
    texts: dict[str, str] = {}

    def add(text: str) -> str:
        texts[text_key(text)] = text
        return text_key(text)

    for sample_id, caption in captions.items():
        kind = sample_id.split("/", 1)[0]
        fallback = prompts.instance if kind == "instance" else prompts.prior
        if caption is None and fallback is None:
            raise ValueError(f"{sample_id}: no caption and no prompts.prior")  # params validation prevents this
        samples[sample_id] = add(caption if kind == "instance" and caption is not None else fallback)
    validation = [add(text) for text in prompts.validation_prompts()]  # derived from the instance prompt if unset
    return PromptPlan(texts=texts, samples=samples, validation=validation, negative=add(prompts.negative),
                      instance=prompts.instance, empty=add(""))


@dataclass(frozen=True, slots=True)
class Truncation:
    """A text longer than an encoder reads: the tokens past `limit` are cut off."""
    text: str
    encoder: str  # clip_l, clip_g or t5
    limit: int
    tokens: int  # how many it had, special tokens included


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one text encoder runs, and why there."""
    device: str  # the training device, or "cpu"
    dtype: torch.dtype
    note: str | None  # a warning for the user when it is not the training device


def placement(arch: Architecture, name: str, work: footprint.Workload, dtype: torch.dtype, device_budget: int,
              cpu_budget: int) -> Placement:
    """The training device in `dtype` where the encoder's estimate fits its budget; else the CPU in bfloat16 (T5's
    own training precision, with fp32's range) where it fits the memory the CPU may use; else HardwareError."""
    needs = footprint.encoder_estimate(arch, name, work).total
    if needs <= device_budget:
        return Placement(work.backend, dtype, None)
    on_cpu = footprint.encoder_estimate(arch, name, replace(work, backend="cpu", dtype_bytes=2)).total
    label = footprint.ENCODER_LABELS[name]
    if work.backend != "cpu" and on_cpu <= cpu_budget:
        return Placement("cpu", torch.bfloat16, f"{label} needs about {gib(needs)}, over the {gib(device_budget)} "
                                                f"{work.backend} budget: it runs on the CPU in bf16 instead (slower; "
                                                f"about {gib(on_cpu)} of RAM). Set encode.use_t5: false to skip T5.")
    key = "encode.use_t5" if name == "t5" else "model.id"
    raise HardwareError(f"{key}: {label} needs about {gib(needs)}, over the {gib(device_budget)} memory budget, "
                        f"and about {gib(on_cpu)} on the CPU, over the {gib(cpu_budget)} it may use (got "
                        f"{'true' if name == 't5' else arch.name}). Set encode.use_t5: false (SD3's T5-free mode), "
                        f"or close other apps.")


def place_encoders(model: ModelParams, settings: EncodeParams, hardware: Hardware) -> dict[str, Placement]:
    """Each encoder the prompts need, placed (`placement`) by yem's estimate before it loads."""
    names = ["clip_l", "clip_g"] + (["t5"] if settings.use_t5 else [])
    dtype = hardware.torch_dtype
    try:
        arch = architecture.architecture_for(model.id, model.revision)
    except YemError:  # a model yem cannot size: the training device, as before (loading it will explain)
        return {name: Placement(hardware.backend, dtype, None) for name in names}
    work = footprint.Workload(backend=hardware.backend, dtype_bytes=dtype.itemsize, resolution=64,
                              render_resolution=64, batch_size=1, checkpointing=False, rank=1, targets=1,
                              use_t5=settings.use_t5, t5_tokens=settings.max_sequence_length)
    cpu_budget = memory_budget(memory.read("cpu")).bytes
    return {name: placement(arch, name, work, dtype, hardware.budget_bytes, cpu_budget) for name in names}


def encode_prompts(model: ModelParams, texts: list[str], settings: EncodeParams, places: dict[str, Placement],
                   on_progress: Callable[[int], None] = lambda n: None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[Truncation]]:
    """Encode `texts`, one encoder in memory at a time, each where `places` puts it; returns joint (N, 77 + T, D),
    pooled (N, P) in fp32 on the CPU, and what was truncated."""
    cuts: list[Truncation] = []
    clip_seqs, pooled = [], []
    for which in ("clip_l", "clip_g"):
        where = places[which]
        tokenizer, encoder = sd3.load_text_encoder(model, which, where.dtype, where.device)
        with fallbacks.sample(which):
            seq, pool = _run_chunks(partial(_clip, tokenizer, encoder, backend=where.device), texts, on_progress)
        cuts += _truncations(tokenizer, texts, tokenizer.model_max_length, which)
        clip_seqs.append(seq)
        pooled.append(pool)
        del tokenizer, encoder
        device.empty_cache(where.device)
    if settings.use_t5:
        where = places["t5"]
        tokenizer, encoder = sd3.load_text_encoder(model, "t5", where.dtype, where.device)
        with fallbacks.sample("t5"):
            (t5,) = _run_chunks(lambda chunk: _t5(tokenizer, encoder, chunk, settings.max_sequence_length,
                                                  where.device), texts, on_progress)
        cuts += _truncations(tokenizer, texts, settings.max_sequence_length, "t5")
        del tokenizer, encoder
        device.empty_cache(where.device)
    else:
        width = sd3.transformer_config(model)["joint_attention_dim"]
        t5 = torch.zeros(len(texts), settings.max_sequence_length, width)  # SD3's T5-free conditioning
    clip = torch.cat(clip_seqs, dim=-1)  # (N, 77, W_L + W_G)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (N, 77, D)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1), cuts


def _run_chunks(encode: Callable, texts: list[str], on_progress: Callable[[int], None]):
    outputs = []
    for start in range(0, len(texts), CHUNK):
        chunk = texts[start:start + CHUNK]
        with torch.inference_mode():
            outputs.append([t.float().cpu() for t in encode(chunk)])
        on_progress(len(chunk))
    return [torch.cat(parts) for parts in zip(*outputs)]


def _clip(tokenizer, encoder, texts: list[str], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    out = encoder(ids.to(backend), output_hidden_states=True)
    return out.hidden_states[-2], out.text_embeds  # penultimate layer (N, 77, W); projected pooled (N, W)


def _t5(tokenizer, encoder, texts: list[str], length: int, backend: str) -> tuple[torch.Tensor]:
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
                    return_tensors="pt").input_ids
    return (encoder(ids.to(backend))[0],)  # (N, T, D)


def _truncations(tokenizer, texts: list[str], limit: int, which: str) -> list[Truncation]:
    # verbose=False: transformers would warn of "indexing errors" for what we truncate on purpose
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False, verbose=False).input_ids]
    return [Truncation(text, which, limit, n) for text, n in zip(texts, lengths) if n > limit]


def text_sources(plan: PromptPlan, prompts: PromptParams, captions: dict[str, str | None],
                 caption_files: dict[str, str]) -> dict[str, list[str]]:
    """Where each text came from, by key: the caption files and params keys a user would edit to change it."""
    sources: dict[str, list[str]] = {}
    for sample_id, file in caption_files.items():
        caption = captions.get(sample_id)
        if caption is not None and plan.samples.get(sample_id) == text_key(caption):  # prior captions are unused
            sources.setdefault(text_key(caption), []).append(file)
    named = [("prompts.instance", prompts.instance), ("prompts.prior", prompts.prior),
             ("prompts.negative", prompts.negative)]
    named += [(f"prompts.validation[{i}]" if prompts.validation else "prompts.instance", text)
              for i, text in enumerate(prompts.validation_prompts())]
    for where, text in named:
        if text is not None:
            sources.setdefault(text_key(text), []).append(where)
    return sources


def truncation_notes(cuts: list[Truncation], sources: dict[str, list[str]]) -> list[str]:
    """One warning per truncated text, naming its caption files or params keys, and what to do."""
    by_text: dict[str, list[Truncation]] = {}
    for cut in cuts:
        by_text.setdefault(cut.text, []).append(cut)
    notes = []
    for text, group in by_text.items():
        where = sources.get(text_key(text)) or [repr(text[:40])]
        shown = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        got = "; ".join(f"{ENCODER_NAMES[c.encoder]} {c.tokens} tokens, {c.limit} kept" for c in group)
        raise_t5 = " or raise encode.max_sequence_length (at most 512)" if any(c.encoder == "t5" for c in group) else ""
        notes.append(f"{shown}: text too long, its end is ignored (got {got}). Shorten it{raise_t5}.")
    return notes


def write_embeddings(model: ModelParams, prompts: PromptParams, settings: EncodeParams, hardware: Hardware,
                     captions: dict[str, str | None], out_dir: Path,
                     caption_files: dict[str, str] | None = None) -> list[str]:
    """Encode every distinct prompt the pipeline needs into `out_dir` (one file per text + index.json).

    Returns a warning per truncated text, naming its caption file (`caption_files`: sample id -> path) or params
    key. The folder replaces `out_dir` only when complete, so a failure keeps the previous embeddings.
    """
    plan = plan_prompts(prompts, captions)
    keys, texts = list(plan.texts), list(plan.texts.values())
    places = place_encoders(model, settings, hardware)
    for note in filter(None, (place.note for place in places.values())):
        progress.note(note)
    with progress.bar(total=len(texts) * len(places), desc="encode", unit="prompt") as bar:
        joint, pooled, cuts = encode_prompts(model, texts, settings, places, bar.update)
    with atomic.staged_dir(out_dir) as staging:
        for i, (key, text) in enumerate(zip(keys, texts)):
            cache.write_tensors(staging / f"{key}.safetensors",
                                {"prompt_embeds": joint[i], "pooled_prompt_embeds": pooled[i]}, {"text": text})
        cache.write_index(staging, {**plan.index(), "use_t5": settings.use_t5})
    return truncation_notes(cuts, text_sources(plan, prompts, captions, caption_files or {}))
