"""train.quantize_base: int8 — the frozen base in int8 (optimum-quanto) still trains a LoRA that plain diffusers
loads: peft wraps the quantized Linears, gradients reach the adapter, and the saved keys are unchanged."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.test_training import render_change, train
from yem.model import lora_file


@pytest.fixture(scope="module")
def project(cached_project):
    return cached_project


def test_int8_base_learns_like_the_plain_one(project):
    result = train(project, "lora-int8", steps=80, learning_rate=2e-3, quantize_base="int8")
    assert result.heldout_after < 0.85 * result.heldout_before, (result.heldout_before, result.heldout_after)
    assert np.isfinite([row["loss"] for row in result.rows]).all()


def test_int8_lora_has_the_plain_keys_and_changes_an_unquantized_pipeline(project, tiny_model_dir):
    root = project[0]
    train(project, "lora-int8-keys", steps=20, quantize_base="int8")
    train(project, "lora-plain-keys", steps=1)
    weights = root / "lora-int8-keys" / lora_file.WEIGHT_NAME
    saved, plain = load_file(weights), load_file(root / "lora-plain-keys" / lora_file.WEIGHT_NAME)
    assert sorted(saved) == sorted(plain)
    assert all(v.dtype == plain[k].dtype and v.shape == plain[k].shape for k, v in saved.items())

    assert render_change(tiny_model_dir, weights)[1] > 1e-3, "the LoRA did not change the image"


def test_int8_quantizes_the_block_linears_only(tiny_model_dir):
    from optimum.quanto import QLinear

    from yem.model.sd3 import load_transformer, quantize_frozen_base
    from yem.params import ModelParams

    transformer = load_transformer(ModelParams(id="tiny", revision=None), torch.float32, "cpu")
    floats = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
    quantize_frozen_base(transformer, "int8")
    quantized = {n for n, m in transformer.named_modules() if isinstance(m, QLinear)}
    assert quantized and all(n.startswith("transformer_blocks.") for n in quantized)
    assert not isinstance(transformer.proj_out, QLinear)
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float32  # dequantized view
    assert sum(t.numel() * t.element_size() for t in transformer.state_dict().values()) < 0.6 * floats
