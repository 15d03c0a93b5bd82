"""Training really learns, and the LoRA it saves works in diffusers with its alpha intact."""

import dataclasses

import numpy as np
import pytest
import torch

from tests.conftest import RELATIVE_TOLERANCE, cpu_hardware
from yem.model import lora_file
from yem.training.loop import run_training


@pytest.fixture(scope="module")
def project(cached_project):
    return cached_project


def train(project, out_name: str, hardware=None, **changes):
    root, params, trained_on = project
    settings = dataclasses.replace(params.train, **changes)
    return run_training(params.model, settings, hardware or trained_on, root / "latents", root / "embeds",
                        root / out_name, root)


def test_heldout_flow_loss_drops_after_training(project):
    result = train(project, "lora-learn", steps=80, learning_rate=2e-3)
    assert result.heldout_after < 0.85 * result.heldout_before, (result.heldout_before, result.heldout_after)
    metrics = result.metrics()
    assert metrics["steps"] == 80 and len(result.rows) == 80
    assert np.isfinite([row["loss"] for row in result.rows]).all()
    # "before" is measured after training with the adapter switched off: it must be the base model's own value
    fp32 = project[2].dtype == "float32"
    assert result.heldout_before == pytest.approx(base_model_heldout_loss(project),
                                                  rel=1e-5 if fp32 else RELATIVE_TOLERANCE[project[2].dtype])


def base_model_heldout_loss(project) -> float:
    """The held-out loss of the base model alone, on the device and in the precision training used."""
    from yem.data import trainset
    from yem.model import sd3
    from yem.training.objective import heldout_loss

    root, params, hardware = project
    dtype, backend = hardware.torch_dtype, hardware.backend
    data = trainset.load_training_set(root / "latents", root / "embeds", torch.device(backend))
    return heldout_loss(sd3.load_transformer(params.model, dtype, backend), data, dtype)


def test_saved_lora_loads_in_diffusers_changes_output_and_keeps_alpha(project, tiny_model_dir):
    root = project[0]
    train(project, "lora-alpha", steps=20, rank=4, alpha=8.0)
    weights = root / "lora-alpha" / lora_file.WEIGHT_NAME
    assert lora_file.adapter_config(weights)["lora_alpha"] == 4  # the scale 8 / 4 is folded into B
    assert lora_file.read_metadata(weights)["yem.alpha"] == "8.0"  # the alpha it was trained with
    assert lora_file.read_metadata(weights)["yem.base_model"] == "tiny"

    pipe, change = render_change(tiny_model_dir, weights)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["default_0"] == pytest.approx(1.0)  # every loader applies B as it is
    assert change > 1e-3, "the LoRA did not change the image"


def render_change(model_dir, weights):
    """Render a fixed image with the plain diffusers pipeline, load the LoRA file `weights` with
    load_lora_weights, render again. Returns the pipeline and the largest pixel change."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        return pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images[0]

    before = render()
    pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
    return pipe, float(np.abs(render() - before).max())


def test_compiled_blocks_that_recompute_activations_train_like_eager_ones(project):
    """train.compile with train.saved_activations < 1 (the partitioner recomputes part of the activations in
    backward) runs the same step as eager: the same losses, step by step, and the same adapter, within what the
    training precision rounds. On a Mac it runs on the CPU: yem never compiles for MPS unless asked, and
    inductor's Metal backend is a prototype."""
    from safetensors.torch import load_file

    hardware = cpu_hardware() if project[2].backend == "mps" else project[2]
    eager = train(project, "lora-eager", hardware, steps=4, compile=False)
    compiled = train(project, "lora-compiled", hardware, steps=4, compile=True, saved_activations=0.5)
    rel = RELATIVE_TOLERANCE[hardware.dtype]
    assert [r["loss"] for r in compiled.rows] == pytest.approx([r["loss"] for r in eager.rows], rel=rel)
    root = project[0]
    a, b = (load_file(root / name / lora_file.WEIGHT_NAME) for name in ("lora-eager", "lora-compiled"))
    # The adapter trains in fp32 whatever the base's precision: its updates carry the base's rounding. Adam moves a
    # weight by about the learning rate (1e-3) per step whatever its gradient's size, so in half precision a weight
    # whose gradient is near zero may take other steps: up to 4 steps × 1e-3 apart (2.1e-3 seen on an H200, bf16).
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=10 * rel, atol=1e-5 if hardware.dtype == "float32" else 4e-3)


def test_compile_auto_compiles_only_long_runs_on_cuda(project):
    from yem.training.setup import COMPILE_MIN_STEPS, compiles

    settings = project[1].train
    long, short = (dataclasses.replace(settings, compile="auto", steps=n) for n in (COMPILE_MIN_STEPS, 100))
    assert compiles(long, "cuda") and not compiles(short, "cuda")  # short: the compile time would not pay off
    assert not compiles(long, "mps") and not compiles(long, "cpu")
    assert compiles(dataclasses.replace(short, compile=True), "cpu")  # as set, whatever the length
    assert not compiles(dataclasses.replace(long, compile=False), "cuda")


def test_a_lora_that_learned_nothing_is_reported_by_train_and_render(project):
    """Learning rate 0: the weights never move from their initial values (B = 0), the held-out loss is unchanged,
    and the renders match the base model's; train and render each say so in one line."""
    from PIL import Image

    from yem.outputs.render import lora_change, no_change_warning

    still = train(project, "lora-still", steps=4, learning_rate=0.0)
    metrics = still.metrics()
    assert metrics["lora_effect"] == "none" and metrics["lora_delta"] == 0 and metrics["heldout_change"] == 0
    assert len(still.warnings) == 1 and still.warnings[0].startswith("train: the LoRA's weights never moved")
    learned = train(project, "lora-moved", steps=4, learning_rate=2e-3)
    assert learned.metrics()["lora_effect"] == "measurable" and not learned.warnings
    assert learned.metrics()["lora_delta"] > 1e-4

    same = [Image.new("RGB", (8, 8), (90, 120, 30))] * 2
    index = lora_change(same, same)
    assert index == {"lora_change": 0.0, "lora_visible": False}
    assert no_change_warning(index).startswith("render: the LoRA renders are the same as the base model's")
    changed = lora_change(same, [Image.new("RGB", (8, 8), (95, 120, 30))] * 2)
    assert changed["lora_visible"] and no_change_warning(changed) is None


def test_caption_dropout_trains_a_different_lora(project):
    """caption_dropout 0.5 trains some samples on the empty prompt, so its LoRA differs from the plain run's (that 0
    draws no coin and keeps every batch as it was is checked on the batches, in tests/test_pairing.py)."""
    from safetensors.torch import load_file

    root = project[0]
    train(project, "dropout-0", steps=6, caption_dropout=0.0)
    train(project, "dropout-half", steps=6, caption_dropout=0.5)
    zero, half = (load_file(root / name / lora_file.WEIGHT_NAME) for name in ("dropout-0", "dropout-half"))
    assert any(not torch.equal(zero[k], half[k]) for k in zero)
