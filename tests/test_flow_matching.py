"""The flow-matching pieces against hand-computed values and diffusers' own scheduler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from backend.backbones.flow_matching import (
    add_noise,
    euler_step,
    implied_noise,
    predicted_clean,
    restart_coefficients,
    restart_renoise,
    sampling_sigmas,
    sampling_timesteps,
    shift_sigma,
    velocity_target,
)


def test_shift_keeps_the_ends_and_moves_the_middle_by_hand():
    assert shift_sigma(0.0, 3.0) == 0.0
    assert shift_sigma(1.0, 3.0) == 1.0
    # 3·0.5 / (1 + 2·0.5) = 0.75;  5·0.2 / (1 + 4·0.2) = 1/1.8
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert shift_sigma(0.2, 5.0) == pytest.approx(1 / 1.8)
    assert shift_sigma(0.37, 1.0) == pytest.approx(0.37)


def test_sigmas_by_hand_for_two_and_three_steps():
    # shift 1: σ_max = 1, σ_min = 1/1000; two levels, then the terminal 0.
    assert sampling_sigmas(2, 1.0).tolist() == pytest.approx([1.0, 0.001, 0.0])
    # shift 3, three steps: σ_min = 3·0.001/1.002; the midpoint of [σ_min, 1] and σ_min
    # are shifted once more; σ_max stays 1.
    low = 3 * 0.001 / (1 + 2 * 0.001)
    middle = (1 + low) / 2
    expected = [1.0, 3 * middle / (1 + 2 * middle), 3 * low / (1 + 2 * low), 0.0]
    sigmas = sampling_sigmas(3, 3.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (4,)
    assert sigmas.tolist() == pytest.approx(expected, rel=1e-6)
    # One step: only σ_max = 1, then 0.
    assert sampling_sigmas(1, 5.0).tolist() == [1.0, 0.0]


def test_timesteps_are_sigma_times_1000_without_the_terminal_level():
    sigmas = sampling_sigmas(3, 3.0)
    timesteps = sampling_timesteps(sigmas)
    assert timesteps.shape == (3,)
    assert timesteps.tolist() == pytest.approx([s * 1000 for s in sigmas[:-1].tolist()], rel=1e-7)
    assert timesteps[0].item() == 1000.0


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (2, 3.0), (3, 5.0), (10, 3.0), (25, 7.0), (50, 5.0),
                                          (50, 3.0), (40, 2.5)])
def test_sigmas_and_timesteps_equal_diffusers_scheduler_exactly(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas = sampling_sigmas(steps, shift)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert torch.equal(sampling_timesteps(sigmas), scheduler.timesteps)


def test_bad_schedules_say_what_is_wrong():
    with pytest.raises(ValueError, match="at least one step"):
        sampling_sigmas(0, 3.0)
    with pytest.raises(ValueError, match="shift must be positive"):
        sampling_sigmas(10, 0.0)


def test_euler_step_by_hand_both_directions():
    x = torch.tensor([1.0, -2.0])
    v = torch.tensor([0.5, 4.0])
    # Down from 0.75 to 0.25: x − 0.5·v.
    assert euler_step(x, v, 0.75, 0.25).tolist() == [0.75, -4.0]
    # Inversion, up from 0.25 to 0.75: x + 0.5·v.
    assert euler_step(x, v, 0.25, 0.75).tolist() == [1.25, 0.0]


def test_euler_step_equals_the_scheduler_step_bit_for_bit():
    generator = torch.Generator().manual_seed(3)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(6)
    sigmas = sampling_sigmas(6, 5.0)
    sample = torch.randn(1, 16, 3, 4, 6, generator=generator)
    ours = sample.clone()
    for index, timestep in enumerate(scheduler.timesteps):
        velocity = torch.randn(sample.shape, generator=generator)
        sample = scheduler.step(velocity, timestep, sample, return_dict=False)[0]
        ours = euler_step(ours, velocity, sigmas[index], sigmas[index + 1])
        assert torch.equal(ours, sample)
    # Python floats for σ give the same bits: both are taken to float32 first.
    velocity = torch.randn(sample.shape, generator=generator)
    assert torch.equal(euler_step(ours, velocity, float(sigmas[2]), float(sigmas[3])),
                       euler_step(ours, velocity, sigmas[2], sigmas[3]))


def test_euler_step_returns_the_velocitys_dtype_as_the_scheduler_does():
    x = torch.ones(3)
    v = torch.ones(3, dtype=torch.bfloat16)
    assert euler_step(x, v, 1.0, 0.5).dtype == torch.bfloat16


def test_exact_velocity_makes_euler_exact_on_the_straight_line():
    """On x_σ = (1 − σ)x₀ + σε the velocity is constant, so one Euler step lands on the line."""
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 5, generator=generator), torch.randn(2, 5, generator=generator)
    velocity = velocity_target(clean, noise)
    down = euler_step(add_noise(clean, noise, 0.8), velocity, 0.8, 0.3)
    assert torch.allclose(down, add_noise(clean, noise, 0.3), atol=1e-6)
    up = euler_step(add_noise(clean, noise, 0.3), velocity, 0.3, 0.8)
    assert torch.allclose(up, add_noise(clean, noise, 0.8), atol=1e-6)
    assert torch.allclose(predicted_clean(add_noise(clean, noise, 0.6), velocity, 0.6), clean, atol=1e-6)


def test_add_noise_by_hand_and_equal_to_scale_noise():
    clean = torch.tensor([2.0, 0.0])
    noise = torch.tensor([1.0, -1.0])
    assert add_noise(clean, noise, 0.25).tolist() == [1.75, -0.25]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(1, 4, 2, 3, 3, generator=generator), torch.randn(1, 4, 2, 3, 3, generator=generator)
    for index, timestep in enumerate(scheduler.timesteps):
        expected = scheduler.scale_noise(clean, timestep[None], noise)
        assert torch.equal(add_noise(clean, noise, scheduler.sigmas[index]), expected)


def test_implied_noise_recovers_the_noise_and_refuses_sigma_zero():
    # x_σ = 0.6·x₀ + 0.4·ε with x₀ = 1, ε = 2: x_σ = 1.4; (1.4 − 0.6)/0.4 = 2.
    assert implied_noise(torch.tensor([1.4]), torch.tensor([1.0]), 0.4).tolist() == pytest.approx([2.0])
    generator = torch.Generator().manual_seed(2)
    clean, noise = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    assert torch.allclose(implied_noise(add_noise(clean, noise, 0.9), clean, 0.9), noise, atol=1e-5)
    with pytest.raises(ValueError, match="above 0"):
        implied_noise(clean, clean, 0.0)


def test_restart_by_hand():
    # σ_a = 0.5 → σ_b = 0.8: a = 0.2/0.5 = 0.4; a·σ_a = 0.2; b = √(0.64 − 0.04) = √0.6.
    scale, noise_scale = restart_coefficients(0.5, 0.8)
    assert scale == pytest.approx(0.4)
    assert noise_scale == pytest.approx(math.sqrt(0.6))
    out = restart_renoise(torch.tensor([1.0, 2.0]), 0.5, 0.8, torch.tensor([1.0, 0.0]))
    assert out.tolist() == pytest.approx([0.4 + math.sqrt(0.6), 0.8])


@pytest.mark.parametrize("sigma_from, sigma_to", [(0.0, 0.3), (0.1, 0.5), (0.5, 0.8), (0.3, 0.3),
                                                  (0.2, 1.0), (0.95, 0.99)])
def test_restart_transition_gives_the_forward_marginal_at_sigma_to(sigma_from, sigma_to):
    """x_a = (1 − σ_a)x₀ + σ_a·ε, so restart_renoise is linear in (x₀, ε, n): push unit
    vectors through it to read its coefficients on x₀, ε and n, then check the mean
    (x₀'s coefficient is 1 − σ_b) and the variance ((ε's)² + (n's)² = σ_b²)."""
    unit, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)

    def through(clean_part: torch.Tensor, noise_part: torch.Tensor, fresh: torch.Tensor) -> float:
        sample = (1 - sigma_from) * clean_part + sigma_from * noise_part
        return restart_renoise(sample, sigma_from, sigma_to, fresh).item()

    on_clean = through(unit, zero, zero)
    on_noise = through(zero, unit, zero)
    on_fresh = through(zero, zero, unit)
    assert on_clean == pytest.approx(1 - sigma_to, abs=1e-12)
    assert on_noise**2 + on_fresh**2 == pytest.approx(sigma_to**2, abs=1e-12)
    # From the clean end a restart is add_noise; to σ_b = 1 it forgets x entirely.
    if sigma_from == 0.0:
        assert (on_noise, on_fresh) == (0.0, pytest.approx(sigma_to))
    if sigma_to == 1.0:
        assert on_clean == 0.0 and on_noise == 0.0


def test_restart_refuses_to_go_down_or_start_from_pure_noise():
    sample = torch.zeros(2)
    with pytest.raises(ValueError, match="less noisy to a noisier"):
        restart_renoise(sample, 0.8, 0.5, sample)
    with pytest.raises(ValueError, match="less noisy to a noisier"):
        restart_renoise(sample, 1.0, 1.0, sample)
    with pytest.raises(ValueError, match="less noisy to a noisier"):
        restart_renoise(sample, 0.2, 1.5, sample)


def test_sigmas_are_strictly_decreasing_to_zero():
    for steps, shift in [(2, 1.0), (50, 3.0), (30, 12.0)]:
        sigmas = sampling_sigmas(steps, shift).numpy()
        assert np.all(np.diff(sigmas) < 0) and sigmas[-1] == 0.0 and sigmas[0] == 1.0
