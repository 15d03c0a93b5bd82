"""LoRA exports: every layout maps back to the same adapter and the same images, and each file is read the way the
target tool reads it (ComfyUI's key mapping is written down below as data, from its sources)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from yem.cli import main as cli
from yem.errors import YemError
from yem.model import export, lora_file

RANK, ALPHA = 4, 8.0  # alpha != rank: a scale of 2, which a reader that ignores alpha gets wrong
# Every kind of module the layouts treat differently: fused q/k/v (both streams), plain projections, the
# AdaLayerNormContinuous linears whose halves SAI stores swapped, and modules outside the blocks.
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff_context.net.2", "norm1_context.linear",
           "norm_out.linear", "proj_out", "context_embedder", "timestep_embedder.linear_1"]
PROVENANCE = {"yem.version": "0.1.0", "yem.base_model": "tiny", "yem.base_model_revision": "abc123",
              "yem.instance_prompt": "a photo of sks dog", "yem.steps": "20", "yem.resolution": "64",
              "yem.rank": str(RANK), "yem.alpha": str(ALPHA)}


def make_lora(model_dir, path, rank: int = RANK, alpha: float = ALPHA, targets=tuple(TARGETS), seed: int = 0):
    """A LoRA saved by yem's own saver, with random A and B (a trained LoRA has non-zero B)."""
    from diffusers import SD3Transformer2DModel

    from yem.model import lora

    transformer = SD3Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    lora.attach(transformer, rank, alpha, list(targets))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    return lora.save(transformer, path, PROVENANCE)


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_model_dir):
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora") / lora_file.WEIGHT_NAME)


@pytest.fixture(scope="module")
def exported(original, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    return {fmt: export.convert(original, fmt, folder / export.file_name(fmt, "rex")) for fmt in export.FORMATS}


def peft_deltas(path) -> dict[str, np.ndarray]:
    """ΔW per diffusers module as peft computes it: lora_alpha / r · B @ A, from the raw file."""
    config, tensors = lora_file.adapter_config(path), lora_file.read_tensors(path)
    scale = config["lora_alpha"] / config["r"]
    names = {key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in tensors if "lora_A" in key}
    return {name: scale * tensors[f"transformer.{name}.lora_B.weight"].astype(np.float64)
            @ tensors[f"transformer.{name}.lora_A.weight"] for name in names}


def test_yem_saves_the_scale_folded_into_b_and_keeps_the_trained_alpha_in_its_header(original):
    config, header = lora_file.adapter_config(original), lora_file.read_metadata(original)
    assert config["r"] == config["lora_alpha"] == RANK  # scale 1: what ComfyUI assumes without .alpha tensors
    assert header["yem.alpha"] == str(ALPHA)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_each_format_reads_back_to_the_same_tensors_and_alpha(original, exported, fmt):
    before, _ = export.read(original)
    after, _ = export.read(exported[fmt])
    assert sorted(after) == sorted(before)
    for name, module in before.items():
        assert np.array_equal(after[name].down, module.down) and np.array_equal(after[name].up, module.up), name
        assert after[name].alpha == pytest.approx(RANK, rel=1e-6), name  # the scale lives in up
    deltas = peft_deltas(original)
    for name, module in after.items():
        np.testing.assert_allclose(module.delta(), deltas[name], rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_converting_back_to_diffusers_restores_the_original_file(original, exported, fmt, tmp_path):
    back = export.convert(exported[fmt], "diffusers", tmp_path / lora_file.WEIGHT_NAME)
    source, restored = lora_file.read_tensors(original), lora_file.read_tensors(back)
    assert restored.keys() == source.keys()
    assert all(np.array_equal(restored[key], source[key]) for key in source)
    assert lora_file.adapter_config(back) == lora_file.adapter_config(original)


def test_kohya_fuses_qkv_into_one_lora_with_the_same_scale(original, exported):
    tensors = lora_file.read_tensors(exported["kohya"])
    key = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    down, up, alpha = (tensors[f"{key}.{part}"] for part in ("lora_down.weight", "lora_up.weight", "alpha"))
    hidden = up.shape[0] // 3
    assert down.shape == (3 * RANK, hidden) and up.shape == (3 * hidden, 3 * RANK)
    assert alpha.shape == () and alpha.item() == 3 * RANK  # 3 · alpha of the (folded) source, whose alpha is r
    deltas = peft_deltas(original)
    fused = np.vstack([deltas[f"transformer_blocks.0.attn.to_{p}"] for p in "qkv"])
    # kohya and ComfyUI both scale by alpha / down.shape[0]
    np.testing.assert_allclose(alpha.item() / down.shape[0] * (up.astype(np.float64) @ down), fused, atol=1e-9)


def test_every_export_carries_the_provenance(exported):
    for fmt, path in exported.items():
        header = lora_file.read_metadata(path)
        assert {key: header[key] for key in PROVENANCE} == PROVENANCE, fmt
        assert header["yem.layout"] == fmt


# ---- ComfyUI's view, as data. Comfy-Org/ComfyUI comfy/lora.py `model_lora_keys_unet` (SD3 branch) maps
# "transformer.<diffusers name>" through comfy/utils.py `mmdit_to_diffusers`, and "lora_unet_<SAI name with _>" for
# every weight of its MMDiT; `load_lora` reads `<key>.alpha`; weight_adapter/lora.py scales by alpha / down rows
# (1.0 without alpha) and reads lora_up/lora_down or lora_B/lora_A.
COMFY_QKV = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
             "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
             "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2)}
COMFY_BLOCK = {"norm1_context.linear": "context_block.adaLN_modulation.1", "attn.to_add_out": "context_block.attn.proj",
               "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
               "norm1.linear": "x_block.adaLN_modulation.1", "attn.to_out.0": "x_block.attn.proj",
               "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2"}
COMFY_BASIC = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
               "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
               "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
               "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
               "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}
COMFY_SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}  # + the last block's norm1_context
COMFY_SUFFIXES = [(".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")]


def swap_scale_shift(weight: np.ndarray) -> np.ndarray:
    shift, scale = np.split(weight, 2)
    return np.concatenate([scale, shift])


def comfy_key_map(depth: int, mmdit_weights) -> dict[str, tuple[str, int | None, bool]]:
    """LoRA key -> (SAI weight, row block of the fused qkv or None, swap halves), for an SD3 of `depth` blocks."""
    key_map = {}
    for i in range(depth):
        for name, (sai, slot) in COMFY_QKV.items():
            key_map[f"transformer.transformer_blocks.{i}.{name}"] = (f"joint_blocks.{i}.{sai}", slot, False)
        for name, sai in COMFY_BLOCK.items():
            last_context_norm = name == "norm1_context.linear" and i == depth - 1
            key_map[f"transformer.transformer_blocks.{i}.{name}"] = (f"joint_blocks.{i}.{sai}", None, last_context_norm)
    for name, sai in {**COMFY_BASIC, **COMFY_SWAPPED}.items():
        key_map[f"transformer.{name}"] = (sai, None, name in COMFY_SWAPPED)
    for sai in mmdit_weights:  # lora_unet_ keys come from the MMDiT's own weight names
        key_map["lora_unet_" + sai.replace(".", "_")] = (sai, None, False)
    return key_map


def comfy_mmdit_rows(depth: int, patch_out: int) -> dict[str, int]:
    """Output rows of every Linear weight in ComfyUI's MMDiT (ldm/modules/diffusionmodules/mmdit.py) for SD3 of
    `depth` blocks: hidden = 64 · depth, MLP ratio 4, the last block's context stream pre-only."""
    hidden = 64 * depth
    rows = {"context_embedder": hidden, "t_embedder.mlp.0": hidden, "t_embedder.mlp.2": hidden,
            "y_embedder.mlp.0": hidden, "y_embedder.mlp.2": hidden, "final_layer.linear": patch_out,
            "final_layer.adaLN_modulation.1": 2 * hidden}
    for i in range(depth):
        streams = ("x_block", "context_block") if i < depth - 1 else ("x_block",)
        for stream in streams:
            rows |= {f"joint_blocks.{i}.{stream}.{name}": n * hidden for name, n in
                     (("adaLN_modulation.1", 6), ("attn.qkv", 3), ("attn.proj", 1), ("mlp.fc1", 4), ("mlp.fc2", 1))}
        if i == depth - 1:
            rows |= {f"joint_blocks.{i}.context_block.adaLN_modulation.1": 2 * hidden,
                     f"joint_blocks.{i}.context_block.attn.qkv": 3 * hidden}
    return rows


def comfy_patches(tensors: dict[str, np.ndarray], key_map) -> tuple[dict, set[str]]:
    """What ComfyUI adds to each SAI weight (a list of (qkv block or None, ΔW)), and the keys it leaves unused."""
    patches, used = {}, set()
    for key, (sai, slot, swap) in key_map.items():
        for up_name, down_name in COMFY_SUFFIXES:
            if key + up_name not in tensors:
                continue
            up, down = tensors[key + up_name].astype(np.float64), tensors[key + down_name]
            scale = tensors[key + ".alpha"].item() / down.shape[0] if key + ".alpha" in tensors else 1.0
            delta = scale * up @ down
            patches.setdefault(sai, []).append((slot, swap_scale_shift(delta) if swap else delta))
            used |= {key + up_name, key + down_name, key + ".alpha"}
    return patches, set(tensors) - used


def sai_deltas(patches: dict, offset: int) -> dict[str, np.ndarray]:
    """Sum the patches per SAI weight; q, k and v land in their row blocks of the fused qkv (3·offset rows)."""
    out = {}
    for sai, parts in patches.items():
        height = 3 * offset if parts[0][0] is not None else parts[0][1].shape[0]
        out[sai] = np.zeros((height, parts[0][1].shape[1]))
        for slot, delta in parts:
            out[sai][slice(None) if slot is None else slice(slot * offset, (slot + 1) * offset)] += delta
    return out


@pytest.fixture(scope="module")
def comfy_view(original, tiny_model_dir):
    """ComfyUI's key map for the tiny SD3, and the ΔW per SAI weight that peft's view of the LoRA implies."""
    import json

    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    depth = config["num_layers"]
    offset = 64 * depth  # ComfyUI's qkv slice size (utils.py); the tiny model keeps hidden = 64 · depth
    assert offset == config["num_attention_heads"] * config["attention_head_dim"]
    patch_out = config["patch_size"] ** 2 * config["out_channels"]
    mmdit_rows = comfy_mmdit_rows(depth, patch_out)
    key_map = comfy_key_map(depth, mmdit_rows)
    patches = {}
    for name, delta in peft_deltas(original).items():
        sai, slot, swap = key_map[f"transformer.{name}"]
        patches.setdefault(sai, []).append((slot, swap_scale_shift(delta) if swap else delta))
    return key_map, offset, mmdit_rows, sai_deltas(patches, offset)


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_comfyui_consumes_every_key_and_patches_the_same_weights(exported, comfy_view, fmt):
    """ComfyUI's reading of each file (its scale: `.alpha` / rank when the tensor exists, else 1) gives the ΔW peft
    reads from yem's diffusers file (header alpha / r): the diffusers file too, since its scale is in B."""
    key_map, offset, mmdit_rows, expected = comfy_view
    patches, ignored = comfy_patches(lora_file.read_tensors(exported[fmt]), key_map)
    assert not ignored, f"ComfyUI would log 'lora key not loaded' for {sorted(ignored)[:3]}"
    got = sai_deltas(patches, offset)
    assert sorted(got) == sorted(expected)
    for sai in expected:
        assert sai in mmdit_rows, f"{sai}: not a weight of ComfyUI's MMDiT, it would log 'NOT LOADED'"
        assert got[sai].shape[0] == mmdit_rows[sai], f"{sai}: ComfyUI would log 'ERROR lora' (shape)"
        np.testing.assert_allclose(got[sai], expected[sai], rtol=1e-6, atol=1e-9, err_msg=sai)


def test_comfyui_would_misread_a_file_whose_scale_lives_only_in_its_header(original, comfy_view, tmp_path):
    """Why the diffusers file carries its scale in B: a peft file with alpha ≠ rank in its header only (what
    diffusers' saver writes as it is) reaches ComfyUI at scale 1, half the strength here."""
    modules, metadata = export.read(original)
    unfolded = {name: export.Module(m.down, m.up * RANK / ALPHA, ALPHA) for name, m in modules.items()}
    export.write(unfolded, metadata, "comfyui", tmp_path / "header_only.safetensors")
    tensors = {k: v for k, v in lora_file.read_tensors(tmp_path / "header_only.safetensors").items()
               if not k.endswith(".alpha")}  # the file diffusers would write: alpha in the header alone
    key_map, offset, _, expected = comfy_view
    got = sai_deltas(comfy_patches(tensors, key_map)[0], offset)
    for sai in expected:
        np.testing.assert_allclose(got[sai] * ALPHA / RANK, expected[sai], rtol=1e-6, atol=1e-9, err_msg=sai)


# ---- diffusers itself


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def render(pipeline, lora=None) -> np.ndarray:
    pipeline.unload_lora_weights()
    if lora is not None:
        pipeline.load_lora_weights(str(lora.parent), weight_name=lora.name)
    return pipeline("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]


def test_round_tripped_files_render_the_same_image(pipe, original, exported, tmp_path):
    reference = render(pipe, original)
    assert np.abs(reference - render(pipe)).max() > 1e-3, "the LoRA does not change the image: the test is moot"
    for fmt in export.FORMATS:
        back = export.convert(exported[fmt], "diffusers", tmp_path / fmt / lora_file.WEIGHT_NAME)
        np.testing.assert_allclose(render(pipe, back), reference, atol=1e-6, err_msg=fmt)


def test_the_saved_file_changes_the_output_as_the_trained_adapter_does(pipe, tiny_model_dir, tmp_path):
    """load_lora_weights of the folded file (alpha recorded = r) renders what the live adapter (alpha 8, r 4)
    renders: folding moved the scale, not the change."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from yem.model import lora

    transformer = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    lora.attach(transformer, RANK, ALPHA, ["attn.to_q", "attn.to_v", "ff.net.0.proj"])
    generator = torch.Generator().manual_seed(1)
    for name, parameter in transformer.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    saved = lora.save(transformer, tmp_path / lora_file.WEIGHT_NAME, PROVENANCE)
    live = StableDiffusion3Pipeline.from_pretrained(tiny_model_dir, transformer=transformer, local_files_only=True)
    live.set_progress_bar_config(disable=True)
    expected = live("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]  # (render() would unload the adapter)
    assert np.abs(expected - render(pipe)).max() > 1e-3, "the adapter does not change the image: the test is moot"
    np.testing.assert_allclose(render(pipe, saved), expected, atol=1e-5)


def test_diffusers_refuses_alpha_tensors_so_the_default_file_has_none(pipe, exported):
    with pytest.raises(ValueError, match="(?i)lora"):  # diffusers < 0.37: "Invalid LoRA checkpoint."
        pipe.load_lora_weights(str(exported["comfyui"].parent), weight_name=exported["comfyui"].name)
    assert not any(key.endswith(".alpha") for key in lora_file.read_tensors(exported["diffusers"]))


# ---- files from elsewhere, and what cannot be converted


def write_kohya_qkv(path, down: np.ndarray, up: np.ndarray, alpha: float | None) -> None:
    tensors = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up}
    if alpha is not None:
        tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.alpha"] = np.array(alpha, np.float32)
    lora_file.write(path, tensors, {})


def test_a_qkv_lora_trained_fused_splits_into_the_same_delta(tmp_path):
    rng = np.random.default_rng(0)
    down, up = rng.normal(size=(4, 16)).astype(np.float32), rng.normal(size=(48, 4)).astype(np.float32)
    write_kohya_qkv(tmp_path / "fused.safetensors", down, up, alpha=2.0)
    modules, _ = export.read(tmp_path / "fused.safetensors")
    full = 2.0 / 4 * (up.astype(np.float64) @ down)
    for slot, projection in enumerate("qkv"):
        module = modules[f"transformer_blocks.0.attn.to_{projection}"]
        np.testing.assert_allclose(module.delta(), full[slot * 16:(slot + 1) * 16], rtol=1e-6)


def test_bfloat16_kohya_file_without_alpha_reads_with_scale_one(tmp_path):
    from safetensors.torch import save_file

    up = torch.zeros(48, 3, dtype=torch.bfloat16)
    up[16:32, 1] = 1.0  # only k is trained
    down = torch.ones(3, 16, dtype=torch.bfloat16)
    save_file({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
               "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up}, str(tmp_path / "bf16.safetensors"))
    modules, _ = export.read(tmp_path / "bf16.safetensors")
    assert list(modules) == ["transformer_blocks.0.attn.to_k"]  # untrained q and v are not invented
    assert modules["transformer_blocks.0.attn.to_k"].scale == 1.0
    np.testing.assert_array_equal(modules["transformer_blocks.0.attn.to_k"].delta(), np.ones((16, 16)))


def test_unknown_layouts_and_unmappable_modules_are_refused_clearly(tmp_path):
    lora_file.write(tmp_path / "sdxl.safetensors", {"lora_te1_text_model.alpha": np.array(1.0, np.float32)}, {})
    with pytest.raises(YemError, match="sdxl.safetensors: not an SD3 transformer LoRA"):
        export.read(tmp_path / "sdxl.safetensors")
    conv = {"pos_embed.proj": export.Module(np.ones((2, 4), np.float32), np.ones((3, 2), np.float32), 2.0)}
    with pytest.raises(YemError, match="pos_embed.proj: has no counterpart in SAI's MMDiT"):
        export.write(conv, {}, "kohya", tmp_path / "conv.safetensors")
    export.write(conv, {}, "comfyui", tmp_path / "conv.safetensors")  # diffusers names hold any module


def test_yem_export_command_converts_a_trained_lora_and_back(original, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "--format", "kohya", "--lora", str(original.parent), "--out",
                                 str(tmp_path)])
    assert result.exit_code == 0, result.output
    kohya = tmp_path / "lora_kohya.safetensors"
    assert all(key.startswith("lora_unet_") for key in lora_file.read_tensors(kohya))
    back = tmp_path / "back" / lora_file.WEIGHT_NAME
    result = runner.invoke(cli, ["export", "--format", "diffusers", "--lora", str(kohya), "--out", str(back)])
    assert result.exit_code == 0, result.output
    assert lora_file.adapter_config(back) == lora_file.adapter_config(original)
    missing = runner.invoke(cli, ["export", "--format", "comfyui", "--lora", str(tmp_path / "nope"), "--out",
                                  str(tmp_path)])
    assert missing.exit_code == 1 and "no such file or folder" in missing.output and "Traceback" not in missing.output
