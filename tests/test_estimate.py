"""The fit estimate: its table checked against the real architectures, its activation formula re-measured on a
configuration it was not calibrated on, orderings that must hold, and worked examples on a 16 GB and a 64 GB Mac."""

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.test_batching import AllocationLimit
from tests.test_memory import MAC_16, MAC_64
from yem import doctor
from yem.hardware.budget import memory_budget
from yem.hardware.memory import GIB
from yem.model import architecture, footprint
from yem.model.architecture import KNOWN_MODELS
from yem.model.footprint import Workload
from yem.params import load_params

SD3_MEDIUM = KNOWN_MODELS["stabilityai/stable-diffusion-3-medium-diffusers"]
SD35_MEDIUM = KNOWN_MODELS["stabilityai/stable-diffusion-3.5-medium"]
SD35_LARGE = KNOWN_MODELS["stabilityai/stable-diffusion-3.5-large"]
REPO = Path(__file__).resolve().parents[1]

# SD3 transformer configs (notes/diffusers.md §4); the table must match what diffusers builds from them.
COMMON = dict(attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048, patch_size=2,
              in_channels=16, out_channels=16, sample_size=128)
CONFIGS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": dict(num_layers=24, num_attention_heads=24,
                                                            caption_projection_dim=1536, pos_embed_max_size=192),
    "stabilityai/stable-diffusion-3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                    pos_embed_max_size=384, qk_norm="rms_norm",
                                                    dual_attention_layers=tuple(range(13))),
    "stabilityai/stable-diffusion-3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                                   pos_embed_max_size=192, qk_norm="rms_norm"),
}


def work(**changes) -> Workload:
    base = Workload(backend="mps", dtype_bytes=2, resolution=1024, render_resolution=1024, batch_size=1,
                    checkpointing=False, rank=4, targets=4, use_t5=True, t5_tokens=77)
    return dataclasses.replace(base, **changes)


def needs(arch, stage: str, **changes) -> int:
    return footprint.STAGES[stage](arch, work(**changes)).total


@pytest.mark.parametrize("model_id", list(CONFIGS))
def test_known_models_match_what_diffusers_builds(model_id):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # shapes only: no memory, a fraction of a second
        built = SD3Transformer2DModel(**COMMON, **CONFIGS[model_id])
    count = sum(p.numel() for p in built.parameters()) + sum(b.numel() for b in built.buffers())
    known = KNOWN_MODELS[model_id]
    assert known.transformer_params == count
    assert (known.layers, known.width) == (built.config.num_layers, built.inner_dim)
    assert known.qk_norm == (built.config.qk_norm is not None)
    assert known.dual_attention_layers == len(built.config.dual_attention_layers)


def test_the_tiny_model_is_read_from_its_files(tiny_model_dir):
    from diffusers import SD3Transformer2DModel

    arch = architecture.architecture_from_folder(tiny_model_dir, "tiny")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    stored = sum(p.numel() for p in transformer.parameters()) + sum(b.numel() for b in transformer.buffers())
    assert arch.transformer_params == stored  # from the safetensors header alone
    assert (arch.layers, arch.width, arch.joint_dim) == (transformer.config.num_layers, transformer.inner_dim,
                                                         transformer.config.joint_attention_dim)
    assert set(arch.text_encoders) == {"clip_l", "clip_g", "t5"}
    assert dataclasses.replace(architecture.architecture_for("tiny"), name="tiny") == arch


def test_a_folder_without_t5_has_no_t5_stage(tmp_path, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "model", ignore=shutil.ignore_patterns("text_encoder_3"))
    arch = architecture.architecture_for(str(tmp_path / "model"))
    assert "t5" not in arch.text_encoders


def test_an_unknown_model_that_is_not_downloaded_is_explained():
    from yem.errors import ModelError

    with pytest.raises(ModelError, match="model.id: someone/not-sd3"):
        architecture.architecture_for("someone/not-sd3")


def test_the_activation_formula_holds_on_a_model_it_was_not_calibrated_on(tiny_model_dir):
    """Count every live tensor byte of real forward + backward passes of the tiny SD3 (2 blocks, width 128, mostly
    text tokens; the constants came from 4-8 blocks, width 256-512, mostly image tokens) with yem's LoRA."""
    from diffusers import SD3Transformer2DModel

    from yem.model import lora

    transformer = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").requires_grad_(False)
    lora.attach(transformer, 4, 4, ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"])
    transformer.train()
    arch = architecture.architecture_from_folder(tiny_model_dir, "tiny")
    for resolution, batch, checkpointing in [(256, 2, False), (512, 1, False), (256, 2, True)]:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        side, text = resolution // 8, 77 + 77
        inputs = dict(hidden_states=torch.randn(batch, 16, side, side), timestep=torch.full((batch,), 500.0),
                      encoder_hidden_states=torch.randn(batch, text, arch.joint_dim),
                      pooled_projections=torch.randn(batch, 96))
        with AllocationLimit(2**62) as live:
            transformer(**inputs, return_dict=False)[0].square().mean().backward()
        predicted = footprint.train_activations(arch, work(backend="cpu", dtype_bytes=4, resolution=resolution,
                                                          batch_size=batch, checkpointing=checkpointing))
        assert 0.95 * live.peak <= predicted <= 1.3 * live.peak, (resolution, batch, checkpointing)


def test_training_memory_grows_with_resolution_batch_and_model_and_shrinks_with_checkpointing():
    assert needs(SD3_MEDIUM, "train", resolution=512) < needs(SD3_MEDIUM, "train") < needs(SD3_MEDIUM, "train",
                                                                                            resolution=1536)
    assert needs(SD3_MEDIUM, "train") < needs(SD3_MEDIUM, "train", batch_size=2) < needs(SD3_MEDIUM, "train",
                                                                                        batch_size=4)
    assert needs(SD3_MEDIUM, "train", checkpointing=True) < needs(SD3_MEDIUM, "train") / 2
    assert needs(SD3_MEDIUM, "train") < needs(SD35_MEDIUM, "train") < needs(SD35_LARGE, "train")
    assert needs(SD3_MEDIUM, "train", dtype_bytes=2) < needs(SD3_MEDIUM, "train", dtype_bytes=4)
    # MPS keeps every block's attention matrix for backward; flash attention on CUDA does not
    assert needs(SD3_MEDIUM, "train", backend="cuda") < needs(SD3_MEDIUM, "train", backend="mps")


def test_activations_are_linear_in_the_batch_so_extrapolation_is_sound():
    one, two, five = (needs(SD3_MEDIUM, "train", batch_size=b, checkpointing=True) for b in (1, 2, 5))
    assert five - one == pytest.approx(4 * (two - one), rel=1e-9)


def test_encode_is_the_largest_text_encoder_and_t5_off_removes_it():
    parts = footprint.encode_stage(SD3_MEDIUM, work()).parts
    t5_weights = SD3_MEDIUM.text_encoders["t5"][0] * 2
    assert parts["T5-XXL weights"] == t5_weights and 9 * 10**9 < t5_weights < 10 * 10**9  # "T5-XXL ≈ 9.5 GB fp16"
    without = footprint.encode_stage(SD3_MEDIUM, work(use_t5=False))
    assert "CLIP-G weights" in without.parts and without.total < needs(SD3_MEDIUM, "encode") / 5
    assert needs(SD3_MEDIUM, "encode", backend="cpu", dtype_bytes=4) > 2 * t5_weights * 0.99  # fp32 on the CPU


def test_the_vae_stages_grow_with_the_pixels():
    assert needs(SD3_MEDIUM, "latents", resolution=512) < needs(SD3_MEDIUM, "latents", resolution=1024)
    assert needs(SD3_MEDIUM, "render", render_resolution=512) < needs(SD3_MEDIUM, "render")
    assert needs(SD3_MEDIUM, "render") < needs(SD35_LARGE, "render")


def test_16gb_mac_at_1024px_gets_concrete_advice_and_a_64gb_mac_needs_none():
    small, large = memory_budget(MAC_16).bytes, memory_budget(MAC_64).bytes
    on_16 = {v.stage: v for v in doctor.verdicts(SD3_MEDIUM, work(), small, "16 GB Mac")}
    assert not on_16["train"].fits and any("gradient_checkpointing" in a for a in on_16["train"].advice)
    assert any("set data.resolution: 512" in a and ", fits" in a for a in on_16["train"].advice)
    assert on_16["encode"].tight or not on_16["encode"].fits  # T5-XXL alone is most of a 16 GB Mac's budget
    assert any(a.startswith("16 GB Mac: set encode.use_t5: false") for a in on_16["encode"].advice)
    on_64 = {v.stage: v for v in doctor.verdicts(SD3_MEDIUM, work(checkpointing=True), large, "64 GB Mac")}
    assert all(v.fits and not v.advice for v in on_64.values())


def test_sd35_large_weights_alone_do_not_fit_a_16gb_mac():
    verdicts = {v.stage: v for v in doctor.verdicts(SD35_LARGE, work(checkpointing=True), memory_budget(MAC_16).bytes,
                                                      "16 GB Mac")}
    assert not verdicts["train"].fits and any("weights alone" in a for a in verdicts["train"].advice)


def test_an_int8_base_halves_the_training_weights_and_is_offered_where_weights_bind():
    plain, int8 = (footprint.train_stage(SD3_MEDIUM, work(quantized_base=q)).parts["transformer weights"]
                   for q in (False, True))
    assert int8 == pytest.approx(2.12 * GIB, rel=0.05) and plain == pytest.approx(3.99 * GIB, rel=0.05)
    verdicts = {v.stage: v for v in doctor.verdicts(SD35_LARGE, work(checkpointing=True), memory_budget(MAC_16).bytes,
                                                      "16 GB Mac")}
    assert any("set train.quantize_base: int8" in a for a in verdicts["train"].advice)
    already = {v.stage: v for v in doctor.verdicts(SD35_LARGE, work(checkpointing=True, quantized_base=True),
                                                     memory_budget(MAC_16).bytes, "16 GB Mac")}
    assert not any("quantize_base" in a for a in already["train"].advice)


def test_auto_settings_resolve_as_training_would():
    params = load_params(REPO / "params.yaml")
    auto = dataclasses.replace(params.train, batch_size="auto", gradient_checkpointing="auto")
    small, large = memory_budget(MAC_16).bytes, memory_budget(MAC_64).bytes
    on_16, note_16 = doctor.resolve_auto(SD3_MEDIUM, work(resolution=512), small, auto)
    on_64, note_64 = doctor.resolve_auto(SD3_MEDIUM, work(resolution=512), large, auto)
    assert on_16.checkpointing and not on_64.checkpointing
    assert "batch auto" in note_16 and "checkpointing on" in note_16
    assert 0 < doctor.largest_batch(SD3_MEDIUM, on_16, small) < doctor.largest_batch(SD3_MEDIUM, on_16, large)
    assert doctor.largest_batch(SD35_LARGE, work(checkpointing=True), 2 * GIB) == 0


def test_workload_follows_params_yaml():
    params = load_params(REPO / "params.yaml")
    found = footprint.workload(params, "cpu", 4)
    assert (found.resolution, found.rank, found.targets) == (params.data.resolution, params.train.rank,
                                                             len(params.train.targets))
    assert found.text_tokens == 77 + params.encode.max_sequence_length and found.use_t5 == params.encode.use_t5
    assert found.quantized_base == (params.train.quantize_base == "int8")
