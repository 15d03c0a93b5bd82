"""The step's FLOPs from the architecture (yem.model.flops) against torch's count of the real step."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.test_estimate import COMMON, CONFIGS, SD3_MEDIUM, SD35_MEDIUM, work
from yem.model import architecture, attention, flops, lora

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]


def counted(transformer, resolution: int, text: int, dtype, checkpointing: bool) -> float:
    """FLOPs torch counts in forward + backward of `transformer` with chunked attention (the in-place dK and dV
    accumulations, which FlopCounterMode leaves out, counted as the batched matmuls they are)."""
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    device = next(transformer.parameters()).device
    side, joint = resolution // 8, transformer.config.joint_attention_dim
    with torch.device(device):
        inputs = dict(hidden_states=torch.randn(1, 16, side, side, dtype=dtype), timestep=torch.full((1,), 500.0),
                      encoder_hidden_states=torch.randn(1, text, joint, dtype=dtype),
                      pooled_projections=torch.randn(1, transformer.config.pooled_projection_dim, dtype=dtype))

    def inplace_baddbmm(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.baddbmm_: inplace_baddbmm}) as counter:
        transformer(**inputs, return_dict=False)[0].float().sum().backward()
    return counter.get_total_flops()


def test_the_tiny_models_real_step(tiny_model_dir):
    from diffusers import SD3Transformer2DModel

    arch = architecture.architecture_from_folder(tiny_model_dir, "tiny")
    transformer = SD3Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer").requires_grad_(False)
    lora.attach(transformer, 8, 8, TARGETS)
    attention.use(transformer, "chunked", "cpu", None)
    found = counted(transformer, 256, 154, torch.float32, checkpointing=False)
    expected = flops.step_flops(arch, work(resolution=256, rank=8, attention="chunked"))
    assert expected == pytest.approx(found, rel=0.02)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_full_size_sd35_medium_on_the_meta_device(checkpointing):
    """SD3.5-medium has every part the count knows: qk-norm, MMDiT-X blocks, the pre-only last block."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**COMMON, **CONFIGS["stabilityai/stable-diffusion-3.5-medium"])
    transformer.to(torch.float16).requires_grad_(False)
    lora.attach(transformer, 16, 16, TARGETS)
    attention.use(transformer, "chunked", "mps", None)
    found = counted(transformer, 512, 154, torch.float16, checkpointing)
    expected = flops.step_flops(SD35_MEDIUM, work(resolution=512, rank=16, attention="chunked",
                                                  checkpointing=checkpointing))
    assert expected == pytest.approx(found, rel=0.01)


def test_what_the_count_grows_with():
    base = work(resolution=1024, attention="chunked")
    one = flops.step_flops(SD3_MEDIUM, base)
    assert flops.step_flops(SD3_MEDIUM, dataclasses.replace(base, batch_size=2)) == pytest.approx(2 * one)
    assert 1.2 * one < flops.step_flops(SD3_MEDIUM, dataclasses.replace(base, checkpointing=True)) < 1.5 * one
    assert flops.step_flops(SD3_MEDIUM, dataclasses.replace(base, attention="sdpa")) < one  # no recomputed scores
    assert flops.step_flops(SD3_MEDIUM, dataclasses.replace(base, resolution=512)) < one / 3
