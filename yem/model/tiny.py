"""The offline tiny SD3: a random-weight pipeline with the real latent layout, built without any download.

It has what matters for testing the real code paths: 16-channel latents, a VAE that downsamples ×8, patch 2,
three text encoders (CLIP-L, CLIP-G, T5) whose outputs SD3 joins as in the real model, and tokenizers that yem
writes itself. It is saved with `save_pretrained` and loaded back through the same `from_pretrained` code as a
hub model. Its transformer follows the shape ComfyUI can build (head dim 64, heads = layers), so LoRA files
trained on it map onto ComfyUI's MMDiT too.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from yem.paths import yem_home

# Bump when the architecture or the build changes: the folder name carries it, so a stale build is never reused.
TINY_VERSION = 1
LAYERS = 2
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 64, 128  # SD3: 768, 1280, 4096
CLIP_MAX_TOKENS = 77


def tiny_model_dir(home: Path | None = None) -> Path:
    """Where the tiny model lives: $YEM_HOME (default ~/.cache/yem) / models / tiny-sd3-v<N>."""
    return (home or yem_home()) / "models" / f"tiny-sd3-v{TINY_VERSION}"


def ensure_tiny_model(home: Path | None = None) -> Path:
    """Build the tiny SD3 once per machine (deterministic, seed 0) and return its diffusers folder."""
    target = tiny_model_dir(home)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            build_tiny_pipeline(Path(scratch)).save_pretrained(staging, safe_serialization=True)
        try:
            os.replace(staging, target)  # atomic: concurrent builders race harmlessly, one wins
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny_pipeline(workdir: Path):
    """Construct the tiny StableDiffusion3Pipeline in memory (tokenizers are written under `workdir`)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip_tokenizer = _write_clip_tokenizer(workdir / "_clip_tokenizer")
    t5_tokenizer = _write_t5_tokenizer(workdir / "_t5_tokenizer")
    special = dict(bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
                   pad_token_id=clip_tokenizer.pad_token_id, vocab_size=len(clip_tokenizer))

    def clip(width: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=4,
                                num_hidden_layers=3, projection_dim=width, max_position_embeddings=CLIP_MAX_TOKENS,
                                hidden_act="gelu", layer_norm_eps=1e-5, **special)
        return CLIPTextModelWithProjection(config)

    torch.manual_seed(0)
    clip_l, clip_g = clip(CLIP_L_WIDTH), clip(CLIP_G_WIDTH)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH,
                                 num_layers=2, num_heads=4, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0,
                                 pad_token_id=0, eos_token_id=1))
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=LAYERS,
        attention_head_dim=64, num_attention_heads=LAYERS, caption_projection_dim=64 * LAYERS,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH, pos_embed_max_size=64)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305)  # SD3's real shift and scale
    modules = (clip_l, clip_g, t5, transformer, vae)
    for module in modules:
        module.eval()  # built modules start in train mode; dropout would make encodings nondeterministic
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip_l, tokenizer=clip_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def _write_clip_tokenizer(folder: Path):
    """A byte-level BPE with no merges: every word is spelled out in bytes; bos/eos are the highest ids."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_TOKENS)


def _write_t5_tokenizer(folder: Path):
    """A unigram tokenizer over letters, digits and punctuation, with T5's special ids (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace("▁", prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace("▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "extra_ids": 0,
              "model_max_length": 512, "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return T5TokenizerFast.from_pretrained(folder)


def _byte_symbols() -> list[str]:
    """GPT-2's reversible byte → printable-unicode table, which CLIP's BPE tokenizer expects."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]
