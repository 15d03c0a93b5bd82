"""Every op each torch stage of yem runs has an MPS kernel (or is composite), and no float64 or complex tensor
reaches the device: checked on any machine, by recording the ops on the CPU (tests/mps_ops.py) and looking each
one up in the registry shipped in the torch wheel. The check fails on a planted CPU-only op (CPU flash attention).
"""

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import mps_ops
from tests.conftest import REPO
from tests.mps_ops import OpRecorder, Support, check, failures, recording, report

FUSED_ATTENTION = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                   "aten::_scaled_dot_product_cudnn_attention")


@pytest.fixture(scope="module")
def registry() -> mps_ops.Registry:
    return mps_ops.default_registry()


def assert_runs_on_mps(recorder: OpRecorder) -> list[mps_ops.Finding]:
    findings = check(recorder.records())
    assert not failures(findings), report(findings)
    assert not any(op.startswith(FUSED_ATTENTION) for op in recorder.ops())
    return findings


# ------------------------------------------------------------------------------------------------- the registry

@pytest.mark.parametrize("op, support, why", [
    ("aten::mm", Support.MPS, "via mm.out"),  # structured_delegate followed to the .out overload
    ("aten::add_.Tensor", Support.MPS, "via add.out"),
    ("aten::abs.out", Support.MPS, "MPS"),  # `CPU, CUDA, MPS, MTIA: abs_out`: comma-joined keys
    ("aten::_fused_adamw", Support.MPS, "via _fused_adamw_"),  # autogen'd from the in-place op
    ("aten::_amp_update_scale_", Support.MPS, "MPS"),  # GradScaler on MPS (torch >= 2.8)
    ("aten::_scaled_dot_product_attention_math_for_mps", Support.MPS, "MPS"),
    ("aten::_scaled_dot_product_attention_math", Support.COMPOSITE, "CompositeImplicitAutograd"),  # no dispatch
    ("aten::_safe_softmax", Support.COMPOSITE, "CompositeExplicitAutograd"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", Support.MISSING, "CPU kernels only"),
    ("aten::_fused_rms_norm_backward", Support.MISSING, "kernels only"),  # CUDA's (torch 2.11), + XPU's (2.13)
    ("aten::_nested_get_values", Support.MISSING, "no dense kernels only"),  # `dispatch: {}`
    ("aten::no_such_op", Support.UNKNOWN, "not in native_functions.yaml"),
])
def test_registry_verdicts(registry, op, support, why):
    verdict = registry.verdict(op)
    assert (verdict.support, verdict.why.endswith(why)) == (support, True), verdict


def test_registry_agrees_with_the_dispatcher_on_composite_implicit_ops(registry):
    """The one dispatch fact any build can confirm: which ops have a CompositeImplicitAutograd kernel."""
    disagree = []
    for name, entry in registry.entries.items():
        try:
            live = torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "CompositeImplicitAutograd")
        except RuntimeError:  # an autogen'd .out of a composite op: listed, never generated
            assert entry.how == "autogen", name
            continue
        if live != ("CompositeImplicitAutograd" in entry.keys):
            disagree.append(name)
    assert disagree == [] and len(registry.entries) > 3000


# ------------------------------------------------------------------------------------------------- the recorder

def test_cpu_flash_attention_is_reported_with_its_call_site():
    """The planted CPU-only op: SDPA on the CPU picks its flash kernel unless math is forced."""
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with OpRecorder(sites=True) as recorder:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    found = failures(check(recorder.records()))
    assert {f.op for f in found} == {"aten::_scaled_dot_product_flash_attention_for_cpu",
                                     "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
    assert "CPU kernels only" in report(found) and "test_mps_ops.py" in report(found)


def test_math_attention_runs_on_mps_forward_and_backward():
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    with recording() as recorder:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    assert_runs_on_mps(recorder)
    assert {"aten::bmm", "aten::_safe_softmax", "aten::_softmax_backward_data"} <= recorder.ops()


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear, self.norm = torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(*[F.gelu(self.norm(self.linear(x)))] * 3)
        return F.interpolate(self.conv(y), scale_factor=2.0, mode="nearest")


def leaf_ops(recorder: OpRecorder) -> dict[str, int]:
    counts: dict[str, int] = {}
    for use in recorder.records():
        if not use.decomposed:
            counts[use.op] = counts.get(use.op, 0) + use.count
    return counts


def test_inference_mode_records_what_no_grad_records():
    """inference_mode skips the Autograd key where composite ops decompose: they reach the recorder whole, and it
    decomposes them through their C++ kernel, so both modes record the same kernels."""
    block, x = Block(), torch.randn(1, 2, 8, 16)
    with torch.no_grad(), recording() as no_grad:
        block(x)
    with torch.inference_mode(), recording() as inference:
        block(x)
    assert leaf_ops(inference) == leaf_ops(no_grad)
    assert {u.op for u in inference.records() if u.decomposed} >= {"aten::linear", "aten::layer_norm"}
    assert "aten::upsample_nearest2d" in leaf_ops(no_grad)  # eager's kernel, not torch._decomp's _unsafe_index


def test_float64_on_the_device_is_reported_and_a_host_cast_is_a_note():
    with recording(sites=True) as recorder:
        torch.randn(4, dtype=torch.float64).exp()
        torch.from_numpy(np.linspace(0.0, 1.0, 4)).to(dtype=torch.float32)  # diffusers' scheduler idiom
    findings = check(recorder.records())
    assert {(f.kind, f.op) for f in failures(findings)} == {("dtype", "aten::randn"), ("dtype", "aten::exp")}
    assert {(f.kind, f.op) for f in findings if not f.fails} == {("cast", "aten::lift_fresh"),
                                                                 ("cast", "aten::_to_copy")}


def test_the_cpu_only_branches_the_check_skips_still_branch_on_the_device():
    """mps_ops.CPU_ONLY_BRANCHES: skipped because torch takes another branch on MPS; revisit if that changes."""
    import inspect

    source = inspect.getsource(torch.amp.GradScaler.unscale_)
    assert ".double().reciprocal().float()" in source and 'torch.device("mps:0")' in source
    assert set(mps_ops.CPU_ONLY_BRANCHES) == {("amp/grad_scaler.py", "unscale_")}


def test_bfloat16_is_reported_only_before_macos_14():
    with recording() as recorder:
        torch.ones(2, dtype=torch.bfloat16).sum()
    assert not check(recorder.records())
    assert {f.op for f in check(recorder.records(), dtypes=mps_ops.unsupported_dtypes(macos=(13, 5)))} == {
        "aten::ones", "aten::sum"}


class Wrapped(torch.Tensor):
    """A tensor subclass that runs every op on the plain tensor inside it, as quanto's weight tensors do."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def unwrap(t):
            return t.inner if isinstance(t, Wrapped) else t

        return func(*map(unwrap, args), **{k: unwrap(v) for k, v in (kwargs or {}).items()})


def test_a_call_on_a_tensor_subclass_is_handed_back_and_its_inner_ops_recorded():
    with recording() as recorder:
        torch.mm(Wrapped(torch.randn(4, 4)), torch.randn(4, 4))
    (handed_back,) = [u for u in recorder.records() if u.handled_by]
    assert (handed_back.op, handed_back.handled_by) == ("aten::mm", "Wrapped")
    assert any(u.op == "aten::mm" and not u.handled_by for u in recorder.records())  # the subclass's own call
    assert_runs_on_mps(recorder)


def test_quanto_runs_its_composite_kernels():
    quanto = pytest.importorskip("optimum.quanto")
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    # quanto registers qbytes_mm's MPS kernel under `quanto_py` (a typo), so MPS runs the default kernel
    assert has("quanto_py::qbytes_mm", "MPS") and not has("quanto::qbytes_mm", "MPS")
    layer = torch.nn.Sequential(torch.nn.Linear(32, 32)).to(torch.bfloat16)  # quantize swaps children
    quanto.quantize(layer, weights=quanto.qint8)
    quanto.freeze(layer)
    with recording() as recorder:
        layer(torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)).float().sum().backward()
    assert_runs_on_mps(recorder)
    assert "quanto::qbytes_mm" in recorder.ops() and "aten::_weight_int8pack_mm" not in recorder.ops()


# ------------------------------------------------------------------------------------------------- yem's stages

@pytest.fixture(scope="module")
def yem(tiny_model_dir):
    from yem.params import load_params

    return load_params(REPO / "params.yaml")


def training_set(latent: int = 8, tokens: int = 77 + 8):
    """Two cached samples as the loop holds them, in one bucket: 8×8 latents (64 px), 77 CLIP + 8 T5 tokens of the
    tiny SD3."""
    from yem.data.trainset import Stack, TrainingSet

    g = torch.Generator().manual_seed(0)
    stack = Stack(mean=torch.randn(2, 16, latent, latent, generator=g),
                  std=torch.rand(2, 16, latent, latent, generator=g), flip_mean=None, flip_std=None)
    return TrainingSet(ids=["instance/a", "instance/b"], stacks=[stack], bucket=torch.tensor([0, 0]),
                       slot=torch.tensor([0, 1]), prompt=torch.tensor([0, 0]),
                       joint=torch.randn(1, tokens, 128, generator=g), pooled=torch.randn(1, 96, generator=g),
                       empty=None, prior=torch.tensor([False, False]))


def train_step(params, transformer: torch.nn.Module, dtype: torch.dtype, checkpointing: bool, tmp_path,
               as_on_mps: bool = True, attention: str = "sdpa") -> OpRecorder:
    """yem's own optimizer step (yem.training.loop.update: micro-batch, loss, scaled backward in fp16, clipping,
    fused AdamW told which steps to skip, loss-scale update) on a run set up by yem.training.setup; `attention`
    as train.attention sets it (chunked: what auto runs on MPS)."""
    from yem.model import sd3
    from yem.training import loop, setup

    settings = dataclasses.replace(params.train, batch_size=1, gradient_accumulation=1, compile=False,
                                   gradient_checkpointing=checkpointing, attention=attention)
    run = setup.assemble(setup.make_accelerator("cpu", params.thermal), transformer, training_set(),
                         sd3.load_training_scheduler(params.model).sigmas, settings, dtype, params.thermal,
                         run_dir=tmp_path, provenance={})
    with recording(sites=True) if as_on_mps else OpRecorder(sites=True) as recorder:
        loss = loop.update(run, 0)
    assert torch.isfinite(loss) and transformer.is_gradient_checkpointing == checkpointing
    return recorder


@pytest.mark.parametrize("dtype, checkpointing, attention", [(torch.float16, False, "chunked"),
                                                              (torch.bfloat16, True, "sdpa")],
                         ids=["fp16-scaled-chunked", "bf16-checkpointing-sdpa"])
def test_training_step(yem, dtype, checkpointing, attention, tmp_path):
    from yem.model import sd3

    transformer = sd3.load_transformer(yem.model, dtype, "cpu")
    recorder = train_step(yem, transformer, dtype, checkpointing, tmp_path, attention=attention)
    assert_runs_on_mps(recorder)
    ops = recorder.ops()
    assert {"aten::_fused_adamw_", "aten::linalg_vector_norm"} <= ops
    assert not any(op.startswith("aten::_foreach_norm") for op in ops)  # MPS clips tensor by tensor
    scaling = {"aten::_amp_foreach_non_finite_check_and_unscale_", "aten::_amp_update_scale_"}
    assert scaling <= ops if dtype == torch.float16 else not scaling & ops


def test_training_step_with_cpu_attention_is_caught(yem, tmp_path):
    """The check fails when attention is left to the CPU's choice: its flash kernel, in diffusers' processor."""
    from yem.model import sd3

    transformer = sd3.load_transformer(yem.model, torch.float32, "cpu")
    recorder = train_step(yem, transformer, torch.float32, False, tmp_path, as_on_mps=False)
    found = failures(check(recorder.records()))
    assert {f.op for f in found} == {"aten::_scaled_dot_product_flash_attention_for_cpu",
                                     "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
    assert "attention_processor.py" in report(found)


def test_sd35_shaped_training_step(yem, tmp_path):
    """SD3.5's additions: RMS qk-norm and a dual attention layer."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, caption_projection_dim=128, joint_attention_dim=128, pooled_projection_dim=96,
        pos_embed_max_size=64, qk_norm="rms_norm", dual_attention_layers=(0,))
    transformer = transformer.to(torch.bfloat16).requires_grad_(False)
    recorder = train_step(yem, transformer, torch.bfloat16, False, tmp_path)
    assert_runs_on_mps(recorder)
    assert "aten::rsqrt" in recorder.ops()  # diffusers' RMSNorm is written out, not aten::_fused_rms_norm


def test_int8_base_training_step(yem, tmp_path):
    """train.quantize_base: int8 (optimum-quanto's ops)."""
    pytest.importorskip("optimum.quanto")
    from yem.model import sd3

    transformer = sd3.quantize_frozen_base(sd3.load_transformer(yem.model, torch.bfloat16, "cpu"), "int8")
    recorder = train_step(yem, transformer, torch.bfloat16, False, tmp_path)
    assert_runs_on_mps(recorder)
    assert "quanto::qbytes_mm" in recorder.ops()


def test_vae_encode(yem):
    from PIL import Image

    from yem.data import latents
    from yem.model import sd3

    vae = sd3.load_vae(yem.model, "cpu")  # fp32, as the latents stage loads it
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with recording(sites=True) as recorder:
        latents.encode(vae, image, "cpu")  # under torch.inference_mode, as in the stage
    assert_runs_on_mps(recorder)
    assert {"aten::native_group_norm", "aten::convolution", "aten::bmm"} <= recorder.ops()


def test_text_encoders(yem):
    from yem.data import text
    from yem.model import sd3

    dtype, texts = torch.float16, ["a photo of sks dog"]
    encoders = {which: sd3.load_text_encoder(yem.model, which, dtype, "cpu") for which in ("clip_l", "clip_g", "t5")}
    with recording(sites=True) as recorder:
        for which in ("clip_l", "clip_g"):
            tokenizer, encoder = encoders[which]
            text._run_chunks(partial(text._clip, tokenizer, encoder, backend="cpu"), texts, lambda n: None)
        tokenizer, encoder = encoders["t5"]
        text._run_chunks(lambda chunk: text._t5(tokenizer, encoder, chunk, 16, "cpu"), texts, lambda n: None)
    assert_runs_on_mps(recorder)
    assert "aten::embedding" in recorder.ops()


def test_render(yem):
    """Two images in one call, as render does where the budget allows, with the attention auto runs on MPS."""
    from yem.model import attention, footprint, sd3
    from yem.outputs import render

    dtype = torch.float16
    pipeline = sd3.load_render_pipeline(yem.model, dtype, "cpu")
    attention.use(pipeline.transformer, "chunked", "mps", None)
    g = torch.Generator().manual_seed(0)
    condition = {"prompt_embeds": torch.randn(1, 85, 128, generator=g),
                 "pooled_prompt_embeds": torch.randn(1, 96, generator=g),
                 "negative_prompt_embeds": torch.zeros(1, 85, 128), "negative_pooled_prompt_embeds": torch.zeros(1, 96)}
    settings = dataclasses.replace(yem.render, steps=2, guidance_scale=5.0)
    plan = footprint.Workload(backend="mps", dtype_bytes=2, resolution=64, render_resolution=64, batch_size=1,
                              checkpointing=False, rank=1, targets=1, use_t5=False, t5_tokens=8, render_images=2)
    with recording(sites=True) as recorder:
        images = render.render_batch(pipeline, [{"condition": condition, "seed": seed} for seed in (0, 1)], settings,
                                     plan, dtype)
    assert [image.size for image in images] == [(64, 64)] * 2
    notes = [f for f in assert_runs_on_mps(recorder) if not f.fails]
    # the scheduler's sigmas: torch.from_numpy(float64).to(device, float32), cast on the CPU
    assert {f.op for f in notes} <= {"aten::lift_fresh", "aten::_to_copy"}
    assert all("scheduling_flow_match_euler_discrete.py" in s for f in notes for u in f.uses for s in u.sites)
