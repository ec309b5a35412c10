"""DDIM, ZeroScope's schedule: the reference's sampler, inversion and restart.

Notation: ᾱ_t = alphas_cumprod[t], β_k = betas[k] of the reference's scaled-linear
schedule (1000 training timesteps, backend/backbones/zeroscope.py REFERENCE_SCHEDULER).
Sampling is diffusers' DDIMScheduler with η = 0 ("leading" spacing: 981, 961, …, 1 for
50 steps); inversion walks the same deterministic update upwards.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from diffusers import DDIMScheduler

from backend.backbones.base import Predict, Schedule, Store, Timestep
from backend.errors import BadSettingsError


class DDIMSchedule(Schedule):
    """The Schedule of a DDIM-trained ε-prediction model (ZeroScope v2 576w and XL)."""

    def __init__(self, scheduler: DDIMScheduler) -> None:
        self.scheduler = scheduler
        self._samplers: dict[int, DDIMScheduler] = {}

    def sampler(self, steps: int) -> DDIMScheduler:
        """A DDIMScheduler set to `steps` steps (one per step count, reused)."""
        if steps not in self._samplers:
            sampler = DDIMScheduler.from_config(self.scheduler.config)
            sampler.set_timesteps(steps)
            self._samplers[steps] = sampler
        return self._samplers[steps]

    def timesteps(self, steps: int) -> list[Timestep]:
        """The DDIM timesteps for `steps` steps, noisiest first (981, 961, …, 1 for 50)."""
        return [int(t) for t in self.sampler(steps).timesteps]

    def check_grids(self, steps: int, inversion_steps: int) -> None:
        if set(self.timesteps(steps)) - set(self.timesteps(inversion_steps)):
            raise BadSettingsError(
                f"Inversion with {inversion_steps} steps does not visit the sampling "
                f"timesteps of {steps} steps; use a multiple of {steps} "
                f"(for example 50 or 999 with 50 steps)."
            )

    def inversion_timesteps(self, steps: int, inversion_steps: int) -> list[Timestep]:
        return sorted(self.timesteps(inversion_steps))

    def invert(self, predict: Predict, source_latent: torch.Tensor, steps: int,
               inversion_steps: int, store: Store | None = None,
               ) -> tuple[dict[Timestep, torch.Tensor], Timestep, torch.Tensor]:
        sampling = self.timesteps(steps)
        inversion = self.inversion_timesteps(steps, inversion_steps)
        inverted = ddim_invert(predict, source_latent, inversion, self.scheduler.alphas_cumprod,
                               float(self.scheduler.final_alpha_cumprod),
                               keep={*sampling, inversion[-1]}, store=store)
        return {t: inverted[t] for t in sampling}, inversion[-1], inverted[inversion[-1]]

    def start_latent(self, source_latent: torch.Tensor, noisiest: torch.Tensor,
                     noisiest_timestep: Timestep, first_timestep: Timestep) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod
        return renoise_to_first_timestep(source_latent, noisiest, float(alphas[noisiest_timestep]),
                                         float(alphas[first_timestep]))

    def step(self, model_output: torch.Tensor, steps: int, index: int,
             latent: torch.Tensor, span: int = 1) -> torch.Tensor:
        """DDIM (η = 0) from timesteps(steps)[index] to the next one (diffusers' step),
        or `span` steps on, in float32:

            x̂₀ = (x − √(1 − ᾱ_t)·ε) / √ᾱ_t,   x' = √ᾱ_t'·x̂₀ + √(1 − ᾱ_t')·ε

        with ᾱ_t' the final ᾱ past the grid's last timestep."""
        timesteps = self.timesteps(steps)
        timestep = timesteps[index]
        if span == 1:
            return self.sampler(steps).step(model_output.float(), timestep, latent.float(),
                                            eta=0.0).prev_sample
        alphas = self.scheduler.alphas_cumprod
        alpha = float(alphas[timestep])
        alpha_next = (float(alphas[timesteps[index + span]]) if index + span < len(timesteps)
                      else float(self.scheduler.final_alpha_cumprod))
        eps = model_output.float()
        clean = (latent.float() - (1 - alpha) ** 0.5 * eps) / alpha**0.5
        return alpha_next**0.5 * clean + (1 - alpha_next) ** 0.5 * eps

    def restart(self, latent: torch.Tensor, steps: int, index: int,
                generator: torch.Generator) -> torch.Tensor:
        """Single DDPM steps from the next timestep back up to timesteps(steps)[index]."""
        timesteps = self.timesteps(steps)
        t_next = timesteps[index + 1]
        return restart_renoise(latent, self.scheduler.betas, t_next, timesteps[index] - t_next, generator)

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """x_t = √ᾱ_t·z₀ + √(1 − ᾱ_t)·ε (DDIMScheduler.add_noise)."""
        return self.scheduler.add_noise(clean, noise, torch.tensor([timestep]))


def ddim_invert(
    step_eps: Callable[[torch.Tensor, int], torch.Tensor],
    source_latent: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: float,
    on_step: Callable[[int, int], None] | None = None,
    keep: Collection[int] | None = None,
    store: Store | None = None,
) -> dict[int, torch.Tensor]:
    """Deterministic DDIM inversion, as in the reference (and Plug-and-Play before it).

    For ascending timesteps t_1 < t_2 < … with ᾱ_prev the previous step's ᾱ
    (ᾱ_0 = `final_alpha_cumprod` before the first):
        ε   = step_eps(x, t_i)
        x̂₀  = (x − √(1 − ᾱ_prev)·ε) / √ᾱ_prev
        x   ← √ᾱ_{t_i}·x̂₀ + √(1 − ᾱ_{t_i})·ε
    Returns {t_i: x after step i} for every t_i in `keep` (default: all), in the
    input's dtype, each as `store` gave it back when it was reached (default: on the
    input's device); keeping only what is read bounds memory for long clips and fine
    grids, and a store in host memory keeps them off the GPU.
    """
    latent = source_latent
    alpha_prev = final_alpha_cumprod
    out: dict[int, torch.Tensor] = {}
    for index, timestep in enumerate(timesteps):
        alpha = float(alphas_cumprod[timestep])
        eps = step_eps(latent, timestep).float()
        x0 = (latent.float() - (1 - alpha_prev) ** 0.5 * eps) / alpha_prev**0.5
        latent = (alpha**0.5 * x0 + (1 - alpha) ** 0.5 * eps).to(source_latent.dtype)
        if keep is None or timestep in keep:
            out[timestep] = latent if store is None else store(latent)
        alpha_prev = alpha
        if on_step is not None:
            on_step(index + 1, len(timesteps))
    return out




def renoise_to_first_timestep(
    source_latent: torch.Tensor, noisiest_latent: torch.Tensor, alpha_bar_noisiest: float,
    alpha_bar_first: float,
) -> torch.Tensor:
    """Re-noise z₀ to the first sampling timestep with the noise inversion implies.

    ε = (x_T − √ᾱ_T·z₀) / √(1 − ᾱ_T),   x = √ᾱ_t₀·z₀ + √(1 − ᾱ_t₀)·ε
    """
    noise = (noisiest_latent - alpha_bar_noisiest**0.5 * source_latent) / (1 - alpha_bar_noisiest) ** 0.5
    return alpha_bar_first**0.5 * source_latent + (1 - alpha_bar_first) ** 0.5 * noise


def restart_renoise(
    latent: torch.Tensor, betas: torch.Tensor, t_next: int, count: int = 20,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Walk a latent back up `count` single DDPM steps from timestep t_next.

    For k = t_next … t_next + count − 1:  x ← √(1 − β_k)·x + √β_k·n_k,  n_k ~ N(0, I)
    (fresh noise each step, drawn from `generator` on its own device).
    """
    for k in range(t_next, t_next + count):
        beta = float(betas[k])
        device = generator.device if generator is not None else latent.device
        noise = torch.randn(latent.shape, generator=generator, device=device, dtype=torch.float32)
        latent = (1 - beta) ** 0.5 * latent + beta**0.5 * noise.to(latent.device, latent.dtype)
    return latent
