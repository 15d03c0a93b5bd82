"""fp16 loss scaling: gradients that would underflow through fp16 activations survive it, an overflowing scale is
skipped and counted apart from non-finite steps, and an interrupted fp16 run resumes with the scale it had."""

import dataclasses

import pytest
import torch

from tests.conftest import interrupt_after_step
from tests.test_resume import assert_same_run, settings
from yem.errors import TrainingStopped
from yem.training import scaling
from yem.training.loop import run_training


def two_layer_grad(scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of an fp32 adapter `delta` on a frozen fp16 layer, reaching it through a second frozen fp16
    layer with small weights (as a LoRA's does through SD3's blocks), with and without yem's scaler; and the same
    gradient computed in fp32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, generator=g)
    first, second = torch.randn(32, 32, generator=g) / 6, torch.randn(32, 32, generator=g) * 1e-3
    delta = torch.nn.Parameter(torch.randn(32, 32, generator=g) * 1e-2)  # fp32, trainable

    def loss(dtype: torch.dtype) -> torch.Tensor:
        h = x.to(dtype) @ first.to(dtype) + (x @ delta).to(dtype)  # (8, 32) in `dtype`
        y = h @ second.to(dtype)  # (8, 32): its gradient is 1e-3 times smaller on the way back to h
        return y.float().square().mean() * 1e-3  # a small loss, as flow matching's late in training

    loss(torch.float32).backward()
    exact, delta.grad = delta.grad.clone(), None
    scaler = scaling.make_scaler("cpu", torch.float16 if scale else torch.float32)
    optimizer = torch.optim.SGD([delta], lr=0.0)
    scaler.scale(loss(torch.float16)).backward()
    scaler.unscale_(optimizer)
    return delta.grad, exact


def test_fp16_gradients_underflow_to_zero_without_scaling_and_survive_with_it():
    unscaled, exact = two_layer_grad(scale=False)
    assert exact.abs().min() > 0 and exact.abs().max() < 1e-6  # tiny, but there
    assert torch.count_nonzero(unscaled) == 0  # every one rounded to zero in fp16
    scaled, _ = two_layer_grad(scale=True)
    torch.testing.assert_close(scaled, exact, rtol=2e-2, atol=exact.abs().max().item() * 2e-2)  # fp16 rounding


def test_an_overflow_is_told_apart_from_a_non_finite_step():
    scaler = scaling.make_scaler("cpu", torch.float16)
    finite, inf, nan = torch.tensor(0.5), torch.tensor(float("inf")), torch.tensor(float("nan"))
    assert [bool(t) for t in scaling.verdict(scaler, finite, finite)] == [False, False]
    assert [bool(t) for t in scaling.verdict(scaler, finite, inf)] == [False, True]  # the scale overflowed
    assert [bool(t) for t in scaling.verdict(scaler, nan, inf)] == [True, False]  # the loss itself is NaN
    tiny = scaling.make_scaler("cpu", torch.float16)
    tiny.load_state_dict({**scaler.state_dict(), "scale": 0.5})
    assert [bool(t) for t in scaling.verdict(tiny, finite, inf)] == [True, False]  # no scale left to blame
    off = scaling.make_scaler("cpu", torch.bfloat16)
    assert not off.is_enabled() and off.state_dict() == {}
    assert [bool(t) for t in scaling.verdict(off, finite, inf)] == [True, False]


def test_fp16_training_skips_overflows_apart_and_resumes_with_its_scale(cached_project, monkeypatch, tmp_path):
    """A scale that starts too high (2^26) overflows in the first steps: those are skipped, halving it, and
    counted apart from non-finite steps. A run interrupted after them resumes with the halved scale and ends with
    exactly the weights and losses of an uninterrupted run (restarting at 2^26 would skip those steps again)."""
    import yem.training.loop

    root, params, hardware = cached_project
    fp16 = dataclasses.replace(hardware, dtype="float16")
    monkeypatch.setattr(scaling, "INITIAL_SCALE", 2.0**26)
    monkeypatch.setenv("YEM_CHECKPOINTS", str(tmp_path))

    def train(out: str):
        return run_training(params.model, settings(cached_project), fp16, root / "latents", root / "embeds",
                            root / out, root)

    reference = train("fp16-reference")
    metrics = reference.metrics()
    assert metrics["dtype"] == "float16" and metrics["loss_scale_skipped_steps"] >= 1
    assert metrics["nonfinite_steps"] == 0 and metrics["rollbacks"] == 0
    assert metrics["loss_scale"] < 2.0**26

    original = interrupt_after_step(monkeypatch, 6)
    with pytest.raises(TrainingStopped, match="after step 7/12"):
        train("fp16-interrupted")
    monkeypatch.setattr(yem.training.loop, "update", original)
    resumed = train("fp16-interrupted")
    assert resumed.resumed_from == 7
    assert resumed.metrics()["loss_scale_skipped_steps"] == metrics["loss_scale_skipped_steps"]
    assert_same_run(root / "fp16-reference", root / "fp16-interrupted", reference.rows, resumed.rows)
