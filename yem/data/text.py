"""SD3 prompt embeddings: CLIP-L, CLIP-G and T5, one encoder in memory at a time, cached per distinct text.

SD3 conditions on two tensors per prompt:
  joint  (77 + T, D): CLIP-L and CLIP-G penultimate hidden states side by side (768 + 1280 = 2048 wide in SD3),
                      zero-padded to T5's width D (4096), followed by T5's T tokens (zeros without T5);
  pooled (P,):        CLIP-L and CLIP-G projected pooled outputs side by side (768 + 1280 = 2048 in SD3).
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from yem import atomic, progress
from yem.data import cache
from yem.hardware import device
from yem.hardware.record import Hardware
from yem.model import sd3
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


def encode_prompts(model: ModelParams, texts: list[str], settings: EncodeParams, backend: device.Backend,
                   dtype: torch.dtype, on_progress: Callable[[int], None] = lambda n: None
                   ) -> tuple[torch.Tensor, torch.Tensor, list[Truncation]]:
    """Encode `texts`; returns joint (N, 77 + T, D), pooled (N, P) in fp32 on the CPU, and what was truncated."""
    cuts: list[Truncation] = []
    clip_seqs, pooled = [], []
    for which in ("clip_l", "clip_g"):
        tokenizer, encoder = sd3.load_text_encoder(model, which, dtype, backend)
        seq, pool = _run_chunks(partial(_clip, tokenizer, encoder, backend=backend), texts, on_progress)
        cuts += _truncations(tokenizer, texts, tokenizer.model_max_length, which)
        clip_seqs.append(seq)
        pooled.append(pool)
        del tokenizer, encoder
        device.empty_cache(backend)
    if settings.use_t5:
        tokenizer, encoder = sd3.load_text_encoder(model, "t5", dtype, backend)
        (t5,) = _run_chunks(lambda chunk: _t5(tokenizer, encoder, chunk, settings.max_sequence_length, backend),
                            texts, on_progress)
        cuts += _truncations(tokenizer, texts, settings.max_sequence_length, "t5")
        del tokenizer, encoder
        device.empty_cache(backend)
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
    backend, dtype = hardware.backend, hardware.torch_dtype
    encoders = 3 if settings.use_t5 else 2
    with progress.bar(total=len(texts) * encoders, desc="encode", unit="prompt") as bar:
        joint, pooled, cuts = encode_prompts(model, texts, settings, backend, dtype, bar.update)
    with atomic.staged_dir(out_dir) as staging:
        for i, (key, text) in enumerate(zip(keys, texts)):
            cache.write_tensors(staging / f"{key}.safetensors",
                                {"prompt_embeds": joint[i], "pooled_prompt_embeds": pooled[i]}, {"text": text})
        cache.write_index(staging, {**plan.index(), "use_t5": settings.use_t5})
    return truncation_notes(cuts, text_sources(plan, prompts, captions, caption_files or {}))
