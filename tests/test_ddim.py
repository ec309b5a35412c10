"""ZeroScope's DDIM schedule (backend/backbones/ddim.py) against hand-computed values."""

from __future__ import annotations

import math

import torch

from backend.backbones.ddim import ddim_invert, renoise_to_first_timestep, restart_renoise


def test_renoise_to_first_timestep_recovers_the_implied_noise():
    z0 = torch.tensor([1.0, -2.0])
    eps = torch.tensor([0.5, 0.25])
    a_T, a_0 = 0.01, 0.04
    x_T = math.sqrt(a_T) * z0 + math.sqrt(1 - a_T) * eps
    expected = math.sqrt(a_0) * z0 + math.sqrt(1 - a_0) * eps
    assert torch.allclose(renoise_to_first_timestep(z0, x_T, a_T, a_0), expected, atol=1e-6)


def test_restart_renoise_applies_single_ddpm_transitions():
    betas = torch.tensor([0.0, 0.5, 0.19, 0.36])
    latent = torch.tensor([2.0, 4.0])
    generator = torch.Generator().manual_seed(3)
    noises = torch.randn((2, 2), generator=torch.Generator().manual_seed(3))
    # k = 1: x ← √0.5·x + √0.5·n₀ ; k = 2: x ← √0.81·x + √0.19·n₁
    expected = math.sqrt(0.5) * latent + math.sqrt(0.5) * noises[0]
    expected = 0.9 * expected + math.sqrt(0.19) * noises[1]
    result = restart_renoise(latent, betas, t_next=1, count=2, generator=generator)
    assert torch.allclose(result, expected, atol=1e-6)
    assert torch.equal(restart_renoise(latent, betas, t_next=1, count=0), latent)


def test_ddim_inversion_steps_hand_computed_and_keeps_only_what_is_asked():
    alphas = torch.tensor([1.0, 0.9, 0.7, 0.5])
    x = torch.tensor([2.0, -1.0])
    calls = []

    def constant_eps(latent, timestep):
        calls.append(timestep)
        return torch.full_like(latent, 0.5)

    out = ddim_invert(constant_eps, x, [1, 3], alphas, final_alpha_cumprod=1.0)
    # Step 1 (ᾱ_prev = 1): x̂₀ = x, x₁ = √0.9·x + √0.1·0.5. Step 2: x̂₀ = x again (same ε),
    # x₃ = √0.5·x + √0.5·0.5.
    assert torch.allclose(out[1], math.sqrt(0.9) * x + math.sqrt(0.1) * 0.5)
    assert torch.allclose(out[3], math.sqrt(0.5) * x + math.sqrt(0.5) * 0.5)
    assert calls == [1, 3]
    kept = ddim_invert(constant_eps, x, [1, 3], alphas, final_alpha_cumprod=1.0, keep={3})
    assert list(kept) == [3] and torch.equal(kept[3], out[3])
