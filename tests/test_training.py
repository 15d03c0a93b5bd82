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
    assert lora_file.adapter_config(weights)["lora_alpha"] == 8.0
    assert lora_file.read_metadata(weights)["yem.base_model"] == "tiny"

    pipe, change = render_change(tiny_model_dir, weights)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["default_0"] == pytest.approx(8.0 / 4)  # alpha / rank survived the round trip
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
    for key in a:  # the adapter trains in fp32 whatever the base's precision: its updates carry the base's rounding
        torch.testing.assert_close(b[key], a[key], rtol=10 * rel, atol=1e-5 if hardware.dtype == "float32" else 1e-3)


def test_compile_auto_compiles_only_long_runs_on_cuda(project):
    from yem.training.setup import COMPILE_MIN_STEPS, compiles

    settings = project[1].train
    long, short = (dataclasses.replace(settings, compile="auto", steps=n) for n in (COMPILE_MIN_STEPS, 100))
    assert compiles(long, "cuda") and not compiles(short, "cuda")  # short: the compile time would not pay off
    assert not compiles(long, "mps") and not compiles(long, "cpu")
    assert compiles(dataclasses.replace(short, compile=True), "cpu")  # as set, whatever the length
    assert not compiles(dataclasses.replace(long, compile=False), "cuda")
