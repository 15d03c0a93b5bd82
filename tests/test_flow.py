"""Flow-matching math against its definitions."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from yem.training import flow


def test_add_noise_interpolates_from_data_to_noise():
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(3)), noise)
    half = flow.add_noise(x0, noise, torch.full((3,), 0.5))
    assert torch.allclose(half, (x0 + noise) / 2)


def test_sigmas_come_from_the_shifted_table_and_the_device_generator():
    table = FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas
    draws = [flow.sample_sigmas(table, 4096, scheme, torch.Generator().manual_seed(0), 0.0, 1.0, 1.29)
             for scheme in ("logit_normal", "mode", "none")]
    for sigma in draws:
        assert sigma.shape == (4096,) and 0 < sigma.min() and sigma.max() <= 1
        assert torch.isin(sigma, table).all()
    again = flow.sample_sigmas(table, 4096, "logit_normal", torch.Generator().manual_seed(0), 0.0, 1.0, 1.29)
    assert torch.equal(draws[0], again)
    # shift 3 pushes logit-normal u (median 0.5) to sigma ≈ 0.75
    assert abs(draws[0].median().item() - 0.75) < 0.03


def test_velocity_loss_is_zero_for_the_true_velocity():
    x0, noise, sigma = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    noisy = flow.add_noise(x0, noise, sigma)
    loss = flow.per_sample_loss(noise - x0, x0, noise, noisy, sigma, "logit_normal", False)
    assert loss.shape == (2,) and torch.allclose(loss, torch.zeros(2), atol=1e-6)


def test_preconditioned_loss_is_sigma_squared_times_velocity_loss():
    x0, noise, sigma = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.3, 0.8])
    noisy, prediction = flow.add_noise(x0, noise, sigma), torch.randn(2, 16, 4, 4)
    velocity = flow.per_sample_loss(prediction, x0, noise, noisy, sigma, "none", False)
    preconditioned = flow.per_sample_loss(prediction, x0, noise, noisy, sigma, "none", True)
    assert torch.allclose(preconditioned, sigma**2 * velocity, rtol=1e-5)


def test_sigma_sqrt_weighting_divides_by_sigma_squared():
    x0, noise, sigma = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([0.5, 0.25])
    noisy, prediction = flow.add_noise(x0, noise, sigma), torch.randn(2, 16, 4, 4)
    plain = flow.per_sample_loss(prediction, x0, noise, noisy, sigma, "none", False)
    weighted = flow.per_sample_loss(prediction, x0, noise, noisy, sigma, "sigma_sqrt", False)
    assert torch.allclose(weighted, plain / sigma**2, rtol=1e-5)
