"""Rectified-flow (flow-matching) pieces as small pure functions, and the schedule built
on them (`FlowMatchingSchedule`, the Wan backbone's).

The forward process interpolates a clean latent and Gaussian noise along a straight line,
and the model predicts the line's velocity:

    x_σ = (1 − σ)·x₀ + σ·ε,        v = dx_σ/dσ = ε − x₀

so σ = 0 is the clean latent and σ = 1 pure noise. Sampling integrates dx/dσ = v from
σ = 1 down to 0; inversion integrates the same ODE upwards. Diffusers' Wan pipeline runs
this with FlowMatchEulerDiscreteScheduler (or UniPC); these functions reproduce its Euler
arithmetic to the last bit, so a loop written with them equals the pipeline's.

Notation (code name → symbol):

    clean, x0               x₀       clean latent (σ = 0)
    noise                   ε        standard Gaussian noise (σ = 1 end)
    sample, x               x_σ      latent at noise level σ
    velocity, v             v        model output, v = ε − x₀ (Wan's "flow_prediction")
    sigma, sigma_next       σ, σ'    noise levels in [0, 1]
    shift                   s        timestep shift, σ ↦ s·σ / (1 + (s − 1)·σ)
    num_train_timesteps     T        1000 for every Wan model
    timestep                t        what the transformer is given: t = σ·T
    sigma_from, sigma_to    σ_a, σ_b  restart: from the less noisy σ_a to the noisier σ_b
    fresh_noise             n        independent standard Gaussian noise for a restart

Shapes: any; σ may be a Python float or a 0-d tensor (or broadcastable to x).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from backend.backbones.base import Predict, Schedule, Store, Timestep
from backend.errors import BadSettingsError

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(sigma: float | np.ndarray | torch.Tensor, shift: float):
    """The timestep shift: σ_s = s·σ / (1 + (s − 1)·σ).

    Keeps 0 ↦ 0 and 1 ↦ 1; s > 1 spends more of the steps at high noise. Works on floats,
    numpy arrays and tensors alike, in their own precision.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def sampling_sigmas(steps: int, shift: float,
                    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The N + 1 noise levels of an N-step sampler, as FlowMatchEulerDiscreteScheduler(shift)
    computes them (float32, its `sigmas` after `set_timesteps(N)`), ending in σ = 0.

    The training grid σ_k = k/T, k = T … 1, is shifted once at construction:
        σ_max = shift(T/T) = 1,   σ_min = shift(1/T) = s / (T + s − 1)   (float32)
    then N levels are spaced evenly in between and shifted again (diffusers' own double
    shift of the low end; the high end stays 1):
        σ̂_i = σ_max + i·(σ_min − σ_max)/(N − 1),   i = 0 … N − 1          (float64)
        σ_i = shift(σ̂_i),   σ_N = 0
    Raises ValueError for steps < 1 or shift ≤ 0.
    """
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, got {steps}")
    if shift <= 0:
        raise ValueError(f"the timestep shift must be positive, got {shift}")
    # Construction: the training grid's two ends, in float32 as the scheduler stores them.
    ends = torch.tensor([num_train_timesteps, 1], dtype=torch.float32) / num_train_timesteps
    sigma_max, sigma_min = (float(value) for value in shift_sigma(ends, shift))
    # set_timesteps: numpy float64 in timestep units, back to σ, shifted, then float32.
    spaced = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = torch.from_numpy(shift_sigma(spaced / num_train_timesteps, shift)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def sampling_timesteps(sigmas: torch.Tensor,
                       num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The transformer's timesteps for the N sampling levels: t_i = σ_i·T, i = 0 … N − 1.

    `sigmas` is sampling_sigmas' (N + 1) tensor; the terminal σ_N = 0 has no model call.
    Float32, not rounded (the scheduler's `timesteps`).
    """
    return sigmas[:-1].to(torch.float32) * num_train_timesteps


def euler_step(sample: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One Euler step of dx/dσ = v from σ to σ':  x_σ' = x_σ + (σ' − σ)·v.

    σ' < σ samples (towards the clean end); σ' > σ is the inversion step along the same
    ODE. As FlowMatchEulerDiscreteScheduler.step: σ and σ' in float32, the update in
    float32, the result in the velocity's dtype.
    """
    step = torch.as_tensor(sigma_next, dtype=torch.float32) - torch.as_tensor(sigma, dtype=torch.float32)
    return (sample.to(torch.float32) + step * velocity).to(velocity.dtype)


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The forward marginal: x_σ = (1 − σ)·x₀ + σ·ε (the scheduler's `scale_noise`)."""
    sigma = torch.as_tensor(sigma, dtype=clean.dtype, device=clean.device)
    return sigma * noise + (1.0 - sigma) * clean


def implied_noise(sample: torch.Tensor, clean: torch.Tensor, sigma) -> torch.Tensor:
    """The noise that puts x₀ at x_σ:  ε = (x_σ − (1 − σ)·x₀) / σ.

    With x_σ the inverted latent at the top of the schedule, this is the flow's noise end
    that the paper's Eq. 4 filters. Raises ValueError for σ ≤ 0 (no noise is implied).
    """
    sigma_value = float(sigma)
    if sigma_value <= 0:
        raise ValueError(f"no noise is implied at sigma {sigma_value}; it must be above 0")
    sigma = torch.as_tensor(sigma, dtype=sample.dtype, device=sample.device)
    return (sample - (1.0 - sigma) * clean) / sigma


def predicted_clean(sample: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """The clean latent the velocity points at:  x̂₀ = x_σ − σ·v."""
    sigma = torch.as_tensor(sigma, dtype=sample.dtype, device=sample.device)
    return sample - sigma * velocity


def velocity_target(clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model is trained to predict:  v = ε − x₀."""
    return noise - clean


def restart_coefficients(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """(a, b) of the exact forward transition from σ_a to the noisier σ_b ≥ σ_a:

        x_b = a·x_a + b·n,   a = (1 − σ_b)/(1 − σ_a),
                             b = √(σ_b² − ((1 − σ_b)·σ_a/(1 − σ_a))²)

    If x_a = (1 − σ_a)·x₀ + σ_a·ε with ε, n independent N(0, I), then
    x_b = (1 − σ_b)·x₀ + (a·σ_a)·ε + b·n and (a·σ_a)² + b² = σ_b²: x_b has the forward
    marginal at σ_b. Raises ValueError unless 0 ≤ σ_a ≤ σ_b ≤ 1 and σ_a < 1.
    """
    if not 0 <= sigma_from <= sigma_to <= 1 or sigma_from >= 1:
        raise ValueError(
            f"a restart goes from a less noisy to a noisier level in [0, 1) → [0, 1], "
            f"got {sigma_from} → {sigma_to}"
        )
    scale = (1 - sigma_to) / (1 - sigma_from)
    kept_noise = scale * sigma_from
    # max(…, 0) only guards the rounding of σ_b² − (a·σ_a)² at σ_a = σ_b.
    return scale, math.sqrt(max(sigma_to**2 - kept_noise**2, 0.0))


def restart_renoise(sample: torch.Tensor, sigma_from: float, sigma_to: float,
                    fresh_noise: torch.Tensor) -> torch.Tensor:
    """Re-noise a latent from σ_a up to σ_b with the exact forward transition:

        x_b = (1 − σ_b)/(1 − σ_a)·x_a + √(σ_b² − ((1 − σ_b)·σ_a/(1 − σ_a))²)·n

    (restart_coefficients has the derivation). `fresh_noise` n is the caller's seeded
    draw, independent of the latent's own noise.
    """
    scale, noise_scale = restart_coefficients(float(sigma_from), float(sigma_to))
    return scale * sample + noise_scale * fresh_noise.to(sample.dtype)


class FlowMatchingSchedule(Schedule):
    """Rectified flow with Euler steps on diffusers' shifted σ grid (FlowMatchEulerDiscrete).

    Sampling: σ_0 = 1 > σ_1 > … > σ_N = 0, x ← x + (σ_{i+1} − σ_i)·v(x, t_i), t_i = σ_i·1000.
    Inversion walks the same ODE upwards on the same grid, each sampling interval cut into
    k = inversion_steps / steps equal σ sub-steps, v evaluated at the lower end:
        x ← x + (σ_up − σ_low)·v(x, σ_low·1000)
    and keeps the latent at every sampling σ; the top, σ_0 = 1, is the noise end.
    """

    def __init__(self, shift: float) -> None:
        self.shift = shift
        self._sigmas: dict[int, torch.Tensor] = {}
        self._sigma_of: dict[Timestep, float] = {}

    def sigmas(self, steps: int) -> torch.Tensor:
        """The N + 1 float32 σ of an N-step sampler (diffusers' grid, ending in 0)."""
        if steps not in self._sigmas:
            sigmas = sampling_sigmas(steps, self.shift)
            self._sigmas[steps] = sigmas
            for sigma, timestep in zip(sigmas[:-1], sampling_timesteps(sigmas), strict=True):
                self._sigma_of[float(timestep)] = float(sigma)
        return self._sigmas[steps]

    def timesteps(self, steps: int) -> list[Timestep]:
        return [float(t) for t in sampling_timesteps(self.sigmas(steps))]

    def check_grids(self, steps: int, inversion_steps: int) -> None:
        if inversion_steps % steps:
            raise BadSettingsError(
                f"Inversion with {inversion_steps} steps does not visit the sampling "
                f"timesteps of {steps} steps; use a multiple of {steps} "
                f"(for example {steps} or {2 * steps})."
            )

    def inversion_grid(self, steps: int, inversion_steps: int) -> torch.Tensor:
        """Ascending float32 σ from 0 to 1: the sampling σ with each interval cut in k."""
        sigmas = self.sigmas(steps)
        k = inversion_steps // steps
        points = []
        for j in range(steps - 1, -1, -1):  # from the clean end up
            low, high = sigmas[j + 1], sigmas[j]
            points.extend(low + (high - low) * (m / k) for m in range(k))
        points.append(sigmas[0])
        return torch.stack([torch.as_tensor(p, dtype=torch.float32) for p in points])

    def inversion_timesteps(self, steps: int, inversion_steps: int) -> list[Timestep]:
        grid = self.inversion_grid(steps, inversion_steps)
        timesteps = [float(t) for t in sampling_timesteps(grid)]  # all but the top
        for sigma, timestep in zip(grid[:-1], timesteps, strict=True):
            self._sigma_of.setdefault(timestep, float(sigma))
        return timesteps

    def invert(self, predict: Predict, source_latent: torch.Tensor, steps: int,
               inversion_steps: int, store: Store | None = None,
               ) -> tuple[dict[Timestep, torch.Tensor], Timestep, torch.Tensor]:
        grid = self.inversion_grid(steps, inversion_steps)
        timesteps = self.inversion_timesteps(steps, inversion_steps)
        sampling = self.timesteps(steps)
        sampling_sigma_to_t = {float(s): t for s, t in zip(self.sigmas(steps)[:-1], sampling, strict=True)}
        latent = source_latent
        kept: dict[Timestep, torch.Tensor] = {}
        for index, timestep in enumerate(timesteps):
            velocity = predict(latent, timestep).float()
            latent = euler_step(latent.float(), velocity, grid[index], grid[index + 1]).to(source_latent.dtype)
            reached = float(grid[index + 1])
            if reached in sampling_sigma_to_t:
                kept[sampling_sigma_to_t[reached]] = latent if store is None else store(latent)
        top = sampling[0]
        return kept, top, kept[top]

    def sigma_of(self, timestep: Timestep) -> float:
        return self._sigma_of[float(timestep)]

    def start_latent(self, source_latent: torch.Tensor, noisiest: torch.Tensor,
                     noisiest_timestep: Timestep, first_timestep: Timestep) -> torch.Tensor:
        """ε = (x_σT − (1 − σ_T)·z₀)/σ_T, then x = (1 − σ_0)·z₀ + σ_0·ε; with σ_T = σ_0 = 1
        this is the inverted noise itself."""
        noise = implied_noise(noisiest, source_latent, self.sigma_of(noisiest_timestep))
        return add_noise(source_latent, noise, self.sigma_of(first_timestep))

    def step(self, model_output: torch.Tensor, steps: int, index: int,
             latent: torch.Tensor, span: int = 1) -> torch.Tensor:
        """x ← x + (σ_{i+1} − σ_i)·v in float32. (WanPipeline's step returns the velocity's
        dtype, so in bf16 its latent turns bf16 after the first step; here it stays float32.
        In float32 the two are the same, bit for bit.) With span k: to σ_{i+k}, one
        Euler step over k of the grid's intervals (σ_N = 0 past the last)."""
        sigmas = self.sigmas(steps)
        return euler_step(latent.float(), model_output.float(), sigmas[index],
                          sigmas[min(index + span, steps)])

    def restart(self, latent: torch.Tensor, steps: int, index: int,
                generator: torch.Generator) -> torch.Tensor:
        """The exact forward transition from σ_{i+1} back up to σ_i, fresh noise n."""
        sigmas = self.sigmas(steps)
        fresh = torch.randn(latent.shape, generator=generator).to(latent.device)
        return restart_renoise(latent, float(sigmas[index + 1]), float(sigmas[index]), fresh)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        return add_noise(clean, noise, self.sigma_of(timestep))
