"""The motion-transfer engine: one loaded model, many edits.

    engine = load_engine("tiny", device="cpu", cache_dir=Path("cache"))
    result = engine.transfer(clip_frames, TransferSettings(prompt="a train"),
                             progress=print_progress, cancelled=lambda: False)
    result.frames      # (F_out, H, W, 3) uint8 at model resolution
    result.metadata    # the JSON sidecar: settings, seed, model, cache hit, timings

One edit, as the reference runs it (DESIGN.md §3):

    1. encode      frames → VAE latent z₀ (in slices of frames)
    2. invert      DDIM inversion of z₀ with the source prompt, and the source SMM
                   features at the guided timesteps — or both from the cache
    3. sample      low-frequency initial latent; for each of the `steps` timesteps:
                   guided steps optimise x_t with Adam on the pairwise SMM loss
                   (target prompt, UNet truncated after up_blocks[1]); then a CFG
                   DDIM step; then restart: re-noise back to t and step again
    4. decode      VAE decode (in slices), retime if asked
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from backend.errors import BadSettingsError, JobCancelled, OutOfMemoryError
from backend.features import TAP_NAMES, capture_taps, checkpointed_blocks, truncated_smm
from backend.guidance import (
    lowfreq_init,
    pairwise_smm_loss,
    renoise_to_first_timestep,
    restart_renoise,
    smm,
)
from backend.inversion import InversionCache, SourceState, cache_key, ddim_invert
from backend.model import Components, load_components
from backend.video import resize_frames, retime_frames, sample_indices
from shared.settings import TransferSettings

ProgressCallback = Callable[[str, int, int], None]
"""progress(phase, step, total); phases in order: "encode", "invert", "features", "sample",
"decode" ("encode", "invert" and "features" are skipped when the inversion is cached)."""

CancelCheck = Callable[[], bool]
"""Returns True when the caller wants the edit stopped; checked between steps."""

OUT_OF_MEMORY = (
    "The GPU ran out of memory; try --gradient-checkpointing, fewer --frames, a smaller "
    "--vae-slice or a smaller --width/--height, or stop other programs using the GPU."
)


@dataclass
class TransferResult:
    frames: np.ndarray  # (F_out, H, W, 3) uint8
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Procedure:
    """How much work an edit may skip. Understudy's defaults; the reference's in `bench`."""

    use_cache: bool = True  # reuse inversion + source features for the same clip
    truncate_guidance: bool = True  # stop the UNet after up_blocks[1] while guiding
    cache_source_features: bool = True  # compute source features once, at inversion time


class Engine:
    """A loaded model plus the on-disk inversion cache.

    `unet_passes` counts UNet work per (phase, kind) in batch elements, kind being
    "full", "truncated" or "truncated_backward"; the benchmark turns it into
    forward-equivalents.
    """

    def __init__(self, components: Components, cache_dir: Path | None = None) -> None:
        self.components = components
        self.cache = InversionCache(cache_dir)
        self.unet_passes: Counter[tuple[str, str]] = Counter()

    def describe(self) -> dict[str, Any]:
        """What the server reports in its hello: model id, device, dtype."""
        c = self.components
        return {"model": c.model_id, "device": str(c.device), "dtype": str(c.dtype).removeprefix("torch.")}

    # ------------------------------------------------------------------ the edit

    def transfer(
        self,
        clip_frames: np.ndarray,
        settings: TransferSettings,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        procedure: Procedure | None = None,
    ) -> TransferResult:
        """Edit a clip.

        clip_frames: (N, H, W, 3) uint8, the whole clip; frames are sampled from it
        by settings.num_frames / settings.start and resized to settings.width×height.
        Raises BadClipError, BadSettingsError, OutOfMemoryError, JobCancelled.
        """
        procedure = procedure or Procedure()
        report = _Reporter(progress, cancelled)
        self.check_settings(settings, len(clip_frames))
        seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
        indices = sample_indices(len(clip_frames), settings.num_frames, settings.start)
        frames = resize_frames(clip_frames[indices], settings.width, settings.height)
        timings: dict[str, float] = {}
        try:
            with _timed(timings, "encode_invert"):
                source, from_cache = self._source_state(frames, settings, procedure, report)
            with _timed(timings, "sample"):
                latent = self._sample(source, settings, seed, procedure, report)
            with _timed(timings, "decode"):
                out = self._decode(latent, settings.vae_slice, report)
        except torch.cuda.OutOfMemoryError as error:
            raise OutOfMemoryError(OUT_OF_MEMORY) from error
        finally:
            if self.components.device.type == "cuda":
                torch.cuda.empty_cache()
        out = retime_frames(out, settings.output_frames or len(out))
        metadata = {
            "settings": settings.to_dict(),
            "seed": seed,
            "model": self.components.model_id,
            "device": str(self.components.device),
            "dtype": str(self.components.dtype).removeprefix("torch."),
            "input_frame_indices": indices.tolist(),
            "inversion_from_cache": from_cache,
            "timings_s": {name: round(value, 3) for name, value in timings.items()},
        }
        return TransferResult(frames=out, metadata=metadata)

    def check_settings(self, settings: TransferSettings, clip_length: int) -> None:
        """Refuse, before any work, settings this model or this clip cannot run.

        Raises BadSettingsError or BadClipError with one sentence.
        """
        scale = self.components.vae_scale_factor
        if settings.width % scale or settings.height % scale:
            raise BadSettingsError(f"Width and height must be multiples of {scale} for this model.")
        if min(settings.width, settings.height) // scale < settings.lowfreq_factor:
            raise BadSettingsError("The frame is too small for the low-frequency factor; lower it.")
        sampling = _timesteps(self.components.scheduler, settings.steps)
        inversion = _timesteps(self.components.scheduler, settings.inversion_steps)
        if set(sampling) - set(inversion):
            raise BadSettingsError(
                f"Inversion with {settings.inversion_steps} steps does not visit the sampling "
                f"timesteps of {settings.steps} steps; use a multiple of {settings.steps} "
                f"(for example 50 or 999 with 50 steps)."
            )
        sample_indices(clip_length, settings.num_frames, settings.start)

    # ------------------------------------------------------------------ steps 1–2

    def _source_state(
        self, frames: np.ndarray, settings: TransferSettings, procedure: Procedure, report: _Reporter
    ) -> tuple[SourceState, bool]:
        """Inverted latents and source features: from the cache, or computed and cached."""
        c = self.components
        key = cache_key(frames, {
            "model": c.model_id, "dtype": str(c.dtype), "source_prompt": _full_prompt(settings, settings.source_prompt),
            "inversion_steps": settings.inversion_steps, "steps": settings.steps,
            "guided_steps": settings.guided_steps,
        })
        if procedure.use_cache:
            cached = self.cache.load(key, c.device)
            if cached is not None:
                return cached, True
        report("encode", 0, 1)
        source_latent = self._encode(frames, settings.vae_slice)
        report("encode", 1, 1)
        source_embedding = self._embed([_full_prompt(settings, settings.source_prompt)])

        sampling = _timesteps(c.scheduler, settings.steps)
        inversion = sorted(_timesteps(c.scheduler, settings.inversion_steps))

        def inversion_eps(latent: torch.Tensor, timestep: int) -> torch.Tensor:
            report.check()
            return self._unet_eps(latent, timestep, source_embedding, "invert")

        with torch.no_grad():
            inverted = ddim_invert(
                inversion_eps, source_latent, inversion, c.scheduler.alphas_cumprod,
                float(c.scheduler.final_alpha_cumprod),
                on_step=lambda step, total: report("invert", step, total),
            )
        state = SourceState(
            source_latent=source_latent,
            inverted={t: inverted[t] for t in sampling},
            noisiest_timestep=inversion[-1],
            noisiest=inverted[inversion[-1]],
            features={},
        )
        if procedure.cache_source_features:
            guided = sampling[: settings.guided_steps]
            with torch.no_grad():
                for index, timestep in enumerate(guided):
                    state.features[timestep] = self._source_features(state, timestep, source_embedding)
                    report("features", index + 1, len(guided))
        if procedure.use_cache:
            self.cache.save(key, state)
        return state, False

    def _source_features(self, state: SourceState, timestep: int, source_embedding: torch.Tensor) -> list[torch.Tensor]:
        """Source SMM features: the three taps on the inverted x_t at t, source prompt."""
        self.unet_passes["features", "truncated"] += 1
        taps = truncated_smm(self.components.unet, state.inverted[timestep], timestep, source_embedding)
        return [tap[0] for tap in taps]

    # ------------------------------------------------------------------ step 3

    def _sample(
        self, source: SourceState, settings: TransferSettings, seed: int, procedure: Procedure,
        report: _Reporter,
    ) -> torch.Tensor:
        """The guided, restarted DDIM sampling loop; returns the final latent z₀."""
        c = self.components
        scheduler = DDIMScheduler.from_config(c.scheduler.config)
        scheduler.set_timesteps(settings.steps)
        timesteps = [int(t) for t in scheduler.timesteps]
        generator = torch.Generator("cpu").manual_seed(seed)

        target = self._embed([_full_prompt(settings, settings.prompt)])
        negative = self._embed([settings.negative_prompt])
        source_embedding = None if procedure.cache_source_features else self._embed(
            [_full_prompt(settings, settings.source_prompt)])
        learning_rates = settings.guidance_learning_rates()

        alphas = c.scheduler.alphas_cumprod
        start = renoise_to_first_timestep(
            source.source_latent.float(), source.noisiest.float(),
            float(alphas[source.noisiest_timestep]), float(alphas[timesteps[0]]),
        )
        fresh_noise = torch.randn(start.shape, generator=generator).to(c.device)
        latent = lowfreq_init(start, fresh_noise, settings.lowfreq_factor)

        report("sample", 0, len(timesteps))
        for index, timestep in enumerate(timesteps):
            report.check()
            if index < settings.guided_steps:
                if procedure.cache_source_features:
                    source_features = source.features[timestep]
                else:
                    with torch.no_grad():
                        source_features = self._source_features(source, timestep, source_embedding)
                latent = self._guide(latent, timestep, target, source_features,
                                     learning_rates[index], settings, procedure, report)
            latent = self._denoise(latent, timestep, scheduler, target, negative, settings.cfg_scale)
            is_last = index == len(timesteps) - 1
            if settings.restart and not is_last:
                t_next = timesteps[index + 1]
                latent = restart_renoise(latent, c.scheduler.betas, t_next, timestep - t_next, generator)
                latent = self._denoise(latent, timestep, scheduler, target, negative, settings.cfg_scale)
            report("sample", index + 1, len(timesteps))
        return latent

    def _guide(
        self, latent: torch.Tensor, timestep: int, target: torch.Tensor,
        source_features: list[torch.Tensor], learning_rate: float, settings: TransferSettings,
        procedure: Procedure, report: _Reporter,
    ) -> torch.Tensor:
        """Adam on a copy of x_t so its SMM-difference pattern matches the source's."""
        unet = self.components.unet
        x = latent.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=learning_rate)
        kind = "truncated" if procedure.truncate_guidance else "full"
        with checkpointed_blocks(unet, settings.gradient_checkpointing), torch.enable_grad():
            for _ in range(settings.guidance_iterations):
                report.check()
                optimizer.zero_grad(set_to_none=True)
                if procedure.truncate_guidance:
                    taps = truncated_smm(unet, x.to(self.components.dtype), timestep, target)
                else:
                    taps = self._full_pass_taps(x, timestep, target)
                loss = sum(pairwise_smm_loss(source, tap[0], settings.loss)
                           for source, tap in zip(source_features, taps, strict=True))
                loss.backward()
                optimizer.step()
                self.unet_passes["guide", kind] += 1
                self.unet_passes["guide", f"{kind}_backward"] += 1
        return x.detach()

    def _full_pass_taps(self, x: torch.Tensor, timestep: int, target: torch.Tensor) -> list[torch.Tensor]:
        """The reference's guidance pass: the whole UNet runs, the taps are read on the way."""
        frames = x.shape[2]
        with capture_taps(self.components.unet, stop_after=False) as captured:
            self.components.unet(x.to(self.components.dtype), timestep, encoder_hidden_states=target)
        return [smm(captured[n].reshape(1, frames, *captured[n].shape[1:]).float()) for n in TAP_NAMES]

    @torch.no_grad()
    def _denoise(
        self, latent: torch.Tensor, timestep: int, scheduler: DDIMScheduler, target: torch.Tensor,
        negative: torch.Tensor, cfg_scale: float,
    ) -> torch.Tensor:
        """One DDIM step (eta 0) with classifier-free guidance: ε = ε_neg + s·(ε_text − ε_neg)."""
        both = torch.cat([negative, target])
        eps_negative, eps_text = self._unet_eps(torch.cat([latent, latent]), timestep, both, "sample").chunk(2)
        eps = eps_negative + cfg_scale * (eps_text - eps_negative)
        return scheduler.step(eps.float(), timestep, latent.float(), eta=0.0).prev_sample

    # ------------------------------------------------------------------ model calls

    def _unet_eps(self, latent: torch.Tensor, timestep: int, embedding: torch.Tensor, phase: str) -> torch.Tensor:
        c = self.components
        if embedding.shape[0] != latent.shape[0]:
            embedding = embedding.expand(latent.shape[0], -1, -1)
        self.unet_passes[phase, "full"] += latent.shape[0]
        return c.unet(latent.to(c.dtype), timestep, encoder_hidden_states=embedding).sample

    @torch.no_grad()
    def _embed(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings, (len(prompts), 77, E)."""
        c = self.components
        length = min(c.tokenizer.model_max_length, c.text_encoder.config.max_position_embeddings)
        ids = c.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids.to(c.device)
        return c.text_encoder(ids)[0].to(c.dtype)

    @torch.no_grad()
    def _encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(F, H, W, 3) uint8 → z₀ (1, C, F, h, w), VAE mean × scaling factor."""
        c = self.components
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = []
        for chunk in pixels.split(frames_per_slice):
            encoded = c.vae.encode(chunk.to(c.device, c.dtype)).latent_dist.mean
            latents.append(encoded * c.vae.config.scaling_factor)
        return torch.cat(latents).permute(1, 0, 2, 3).unsqueeze(0)

    @torch.no_grad()
    def _decode(self, latent: torch.Tensor, frames_per_slice: int, report: _Reporter) -> np.ndarray:
        """z₀ (1, C, F, h, w) → (F, H, W, 3) uint8."""
        c = self.components
        planes = (latent[0].permute(1, 0, 2, 3) / c.vae.config.scaling_factor).to(c.dtype)
        chunks = planes.split(frames_per_slice)
        images = []
        for index, chunk in enumerate(chunks):
            report.check()
            decoded = c.vae.decode(chunk).sample.float().clamp(-1, 1)
            images.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
            report("decode", index + 1, len(chunks))
        return torch.cat(images).numpy()


class _Reporter:
    """Progress out, cancellation in: called between every unit of work."""

    def __init__(self, progress: ProgressCallback | None, cancelled: CancelCheck | None) -> None:
        self.progress = progress
        self.cancelled = cancelled

    def __call__(self, phase: str, step: int, total: int) -> None:
        self.check()
        if self.progress is not None:
            self.progress(phase, step, total)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JobCancelled("The edit was cancelled.")


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - started


def _timesteps(scheduler: DDIMScheduler, steps: int) -> list[int]:
    """The DDIM timesteps for `steps` steps, noisiest first (981, 961, …, 1 for 50)."""
    probe = DDIMScheduler.from_config(scheduler.config)
    probe.set_timesteps(steps)
    return [int(t) for t in probe.timesteps]


def _full_prompt(settings: TransferSettings, prompt: str) -> str:
    """The reference prefixes prompts with a quality phrase; an empty prompt stays empty."""
    return settings.prompt_prefix + prompt if prompt else ""


def load_engine(
    model: str, device: str | None = None, dtype: str | None = None, cache_dir: Path | None = None
) -> Engine:
    """Load a model ("tiny", a hub id, or a local diffusers folder) once."""
    return Engine(load_components(model, device, dtype), cache_dir)
