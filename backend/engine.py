"""The motion-transfer engine: one loaded model, many edits.

    engine = load_engine("tiny", device="cpu", cache_dir=Path("cache"))
    result = engine.transfer(clip_frames, TransferSettings(prompt="a train"),
                             progress=print_progress, cancelled=lambda: False)
    result.frames      # (N, H, W, 3) uint8 at the result size, one per input frame
    result.sidecar     # shared/sidecar.py: settings, seed, steps used, model, framing, windows, …

One edit, as Understudy runs it (docs/method.md):

    0. frame       the frames chosen, the box of them the model sees (framing: fit, crop,
                   stretch; backend/framing.py) resized to the model's size
    1. encode      frames → VAE latent z₀ of the whole clip (in slices of frames)
    2. invert      DDIM inversion of z₀ with the source prompt, and the source SMM
                   features at the guided timesteps, per window — or both from the cache
    3. sample      low-frequency initial latent; for each of the `steps` timesteps:
                   guided steps optimise x_t with Adam on the pairwise SMM loss
                   (target prompt, UNet truncated after up_blocks[1]); then a CFG
                   DDIM step; then restart: re-noise back to t and step again
    4. decode      VAE decode (in slices)
    5. upscale     with settings.upscale "xl": a second engine (ZeroScope XL) re-noises the
                   resized result part of the way and denoises it (video-to-video); then
                   retime if asked

Clips longer than the model's window (24 frames for ZeroScope) keep one latent for
all their frames; every UNet use runs per window and blends (backend/windows.py),
and guidance sums the windows' losses. A clip that fits one window runs exactly as
it would without windows.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler

from backend.errors import BadClipError, BadSettingsError, JobCancelled, OutOfMemoryError
from backend.features import TAP_NAMES, capture_taps, checkpointed_blocks, truncated_smm
from backend.framing import Framing, frames_for_model, plan_framing
from backend.guidance import (
    lowfreq_init,
    pairwise_smm_loss,
    renoise_to_first_timestep,
    restart_renoise,
    smm,
)
from backend.inversion import (
    DEFAULT_CACHE_MAX_BYTES,
    InversionCache,
    SourceState,
    cache_key,
    ddim_invert,
)
from backend.model import ZEROSCOPE_XL, Components, load_components
from backend.results import CancelCheck, ProgressCallback, TransferResult
from backend.video import resize_frames, retime_frames, sample_indices
from backend.windows import Window, blend_windowed, place_windows, window_slice
from shared.settings import TransferSettings
from shared.sidecar import Sidecar

OUT_OF_MEMORY = (
    "The GPU ran out of memory; try --gradient-checkpointing, fewer --frames, a smaller "
    "--vae-slice or a smaller --width/--height, --upscale none, or stop other programs "
    "using the GPU."
)
NO_UPSCALER = (
    "This engine was started without an upscaler, so upscale 'xl' cannot run; set upscale "
    f"to 'none', or fetch ZeroScope XL (`hf download {ZEROSCOPE_XL}`) and load it with "
    "--upscale-model."
)


@dataclass
class Procedure:
    """How much work an edit may skip. Understudy's defaults; the reference's in `bench`."""

    use_cache: bool = True  # reuse inversion + source features for the same clip
    truncate_guidance: bool = True  # stop the UNet after up_blocks[1] while guiding
    cache_source_features: bool = True  # compute source features once, at inversion time


SourceFeatures = list[list[torch.Tensor]]
"""Per window, per tap (TAP_NAMES order): the source SMM, (window frames, D)."""


class Engine:
    """A loaded model plus the on-disk inversion cache.

    `unet_passes` counts UNet work per (phase, kind) in batch elements of one window,
    kind being "full", "truncated" or "truncated_backward"; the benchmark turns it into
    forward-equivalents. `upscaler`, when loaded, is a second Engine (ZeroScope XL) that
    runs the upscaling stage; it counts its own passes.
    """

    def __init__(self, components: Components, cache_dir: Path | None = None,
                 cache_max_bytes: int | None = None, upscaler: Engine | None = None) -> None:
        self.components = components
        self.cache = InversionCache(cache_dir, cache_max_bytes or DEFAULT_CACHE_MAX_BYTES)
        self.unet_passes: Counter[tuple[str, str]] = Counter()
        self.upscaler = upscaler

    def describe(self) -> dict[str, Any]:
        """What the server reports in its hello: model id, device, dtype, and the
        upscaler's model id (None: this engine cannot run upscale 'xl')."""
        c = self.components
        return {"model": c.model_id, "device": str(c.device), "dtype": str(c.dtype).removeprefix("torch."),
                "upscaler": self.upscaler.components.model_id if self.upscaler else None}

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

        clip_frames: (N, H, W, 3) uint8, the whole clip (or anything with len() and
        [index array], like the server's lazily decoded clip); frames are sampled from
        it by settings.num_frames / settings.start and framed by settings.framing.
        Returns frames of the framing's result size covering its crop box of the source.
        Raises BadClipError, BadSettingsError, OutOfMemoryError, JobCancelled.
        """
        # 0. Check everything, choose the frames and frame them, before any model work.
        procedure = procedure or Procedure()
        report = _Reporter(progress, cancelled)
        self.check_settings(settings, len(clip_frames))
        seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
        indices = sample_indices(len(clip_frames), frames_to_edit(settings, len(clip_frames)),
                                 settings.start)
        chosen = np.asarray(clip_frames[indices])
        framing = self.framing_for(settings, (chosen.shape[2], chosen.shape[1]))
        frames = frames_for_model(chosen, framing)
        del chosen
        windows = place_windows(len(frames), settings.window_frames, settings.window_overlap)
        timings: dict[str, float] = {}
        try:
            with _timed(timings, "encode_invert"):
                source, from_cache = self._source_state(frames, windows, settings, procedure, report)
            with _timed(timings, "sample"):
                latent = self._sample(source, windows, settings, seed, procedure, report)
            with _timed(timings, "decode"):
                out = self._decode(latent, settings.vae_slice, report)
            if framing.upscale_size is not None:
                with _timed(timings, "upscale"):
                    out = self.upscaler.video_to_video(out, framing.upscale_size, windows, settings,
                                                       seed, report)
        except torch.cuda.OutOfMemoryError as error:
            raise OutOfMemoryError(OUT_OF_MEMORY) from error
        finally:
            if self.components.device.type == "cuda":
                torch.cuda.empty_cache()
        out = retime_frames(out, settings.output_frames or len(out))
        return TransferResult(out, self._sidecar(settings, seed, framing, indices, windows,
                                                 from_cache, timings))

    def _sidecar(self, settings: TransferSettings, seed: int, framing: Framing,
                 indices: np.ndarray, windows: list[Window], from_cache: bool,
                 timings: dict[str, float]) -> Sidecar:
        """The record of how this edit was made (shared/sidecar.py): the counts it used,
        not only the request (an automatic guided count is None in `settings`)."""
        return Sidecar(
            settings=settings.to_dict(),
            seed=seed,
            model=self.components.model_id,
            steps=settings.steps,
            guided_steps=settings.guided_step_count(),
            device=str(self.components.device),
            dtype=str(self.components.dtype).removeprefix("torch."),
            input_frame_indices=indices.tolist(),
            windows=[list(window) for window in windows],
            inversion_from_cache=from_cache,
            timings_s={name: round(value, 3) for name, value in timings.items()},
            framing=framing.to_dict(),
            upscaler=None if framing.upscale_size is None else {
                "model": self.upscaler.components.model_id, "steps": settings.upscale_step_count()},
        )

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        """Refuse, before any work, settings this model or this clip cannot run.

        frame_size: the clip's (width, height) when known; the framing is checked too.
        Raises BadSettingsError or BadClipError with one sentence.
        """
        scale = self.components.vae_scale_factor
        if settings.width % scale or settings.height % scale:
            raise BadSettingsError(f"Width and height must be multiples of {scale} for this model.")
        if min(settings.width, settings.height) // scale < settings.lowfreq_factor:
            raise BadSettingsError("The frame is too small for the low-frequency factor; lower it.")
        if settings.upscale != "none" and self.upscaler is None:
            raise BadSettingsError(NO_UPSCALER)
        sampling = _timesteps(self.components.scheduler, settings.steps)
        inversion = _timesteps(self.components.scheduler, settings.inversion_steps)
        if set(sampling) - set(inversion):
            raise BadSettingsError(
                f"Inversion with {settings.inversion_steps} steps does not visit the sampling "
                f"timesteps of {settings.steps} steps; use a multiple of {settings.steps} "
                f"(for example 50 or 999 with 50 steps)."
            )
        sample_indices(clip_length, frames_to_edit(settings, clip_length), settings.start)
        if frame_size is not None:
            self.framing_for(settings, frame_size)

    def framing_for(self, settings: TransferSettings, frame_size: tuple[int, int]) -> Framing:
        """Where and at which sizes frames of frame_size (width, height) are edited
        (backend/framing.py). BadClipError with one sentence for a frame too elongated
        for fit; BadSettingsError for a model size too small for the low-pass factor."""
        upscale = None if settings.upscale == "none" else (settings.upscale_width, settings.upscale_height)
        scale = self.components.vae_scale_factor
        try:
            framing = plan_framing(settings.framing, frame_size, (settings.width, settings.height),
                                   scale, upscale)
        except ValueError as error:
            raise BadClipError(str(error)) from None
        if min(framing.model_size) // scale < settings.lowfreq_factor:
            raise BadSettingsError(
                f"The model would run at {framing.model_size[0]}x{framing.model_size[1]}, too small "
                f"for the low-frequency factor {settings.lowfreq_factor}; lower --lowfreq-factor.")
        return framing

    # ------------------------------------------------------------------ steps 1–2

    def _source_state(
        self, frames: np.ndarray, windows: list[Window], settings: TransferSettings,
        procedure: Procedure, report: _Reporter,
    ) -> tuple[SourceState, bool]:
        """Inverted latents and source features of the whole clip: from the cache, or
        computed and cached."""
        c = self.components
        sampling = _timesteps(c.scheduler, settings.steps)
        guided = sampling[: settings.guided_step_count()]
        key = cache_key(frames, {
            "model": c.model_id, "dtype": str(c.dtype), "source_prompt": _full_prompt(settings, settings.source_prompt),
            "inversion_steps": settings.inversion_steps, "steps": settings.steps,
            "guided_steps": len(guided), "windows": windows,
        })
        if procedure.use_cache:
            cached = self.cache.load(key, c.device)
            if cached is not None:
                return cached, True
        report("encode", 0, 1)
        source_latent = self._encode(frames, settings.vae_slice)
        report("encode", 1, 1)
        source_embedding = self._embed([_full_prompt(settings, settings.source_prompt)])
        inversion = sorted(_timesteps(c.scheduler, settings.inversion_steps))
        step_of = {timestep: index for index, timestep in enumerate(inversion)}

        def inversion_eps(latent: torch.Tensor, timestep: int) -> torch.Tensor:
            def window_eps(piece: torch.Tensor, _window: int) -> torch.Tensor:
                report.check()
                return self._unet_eps(piece, timestep, source_embedding, "invert")

            return blend_windowed(window_eps, latent, windows, after_window=lambda k: report(
                "invert", step_of[timestep] * len(windows) + k + 1, len(inversion) * len(windows)))

        with torch.no_grad():
            inverted = ddim_invert(inversion_eps, source_latent, inversion, c.scheduler.alphas_cumprod,
                                   float(c.scheduler.final_alpha_cumprod),
                                   keep={*sampling, inversion[-1]})
        state = SourceState(
            source_latent=source_latent,
            inverted={t: inverted[t] for t in sampling},
            noisiest_timestep=inversion[-1],
            noisiest=inverted[inversion[-1]],
            features={},
        )
        if procedure.cache_source_features:
            with torch.no_grad():
                for index, timestep in enumerate(guided):
                    state.features[timestep] = []
                    for k, window in enumerate(windows):
                        state.features[timestep].append(
                            self._source_features(state, timestep, source_embedding, window, report))
                        report("features", index * len(windows) + k + 1, len(guided) * len(windows))
        if procedure.use_cache:
            self.cache.save(key, state)
        return state, False

    def _source_features(
        self, state: SourceState, timestep: int, source_embedding: torch.Tensor, window: Window,
        report: _Reporter,
    ) -> list[torch.Tensor]:
        """Source SMM features of one window: the three taps on the inverted x_t at t,
        source prompt. (window frames, D) per tap."""
        report.check()
        self.unet_passes["features", "truncated"] += 1
        with self._precision():
            taps = truncated_smm(self.components.unet, self._model_input(
                window_slice(state.inverted[timestep], window)), timestep, source_embedding)
        return [tap[0] for tap in taps]

    # ------------------------------------------------------------------ step 3

    def _sample(
        self, source: SourceState, windows: list[Window], settings: TransferSettings, seed: int,
        procedure: Procedure, report: _Reporter,
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
        guided_steps = len(learning_rates)

        # 3a. The initial latent: low frequencies of z₀ re-noised to t₀, high ones fresh.
        alphas = c.scheduler.alphas_cumprod
        start = renoise_to_first_timestep(
            source.source_latent.float(), source.noisiest.float(),
            float(alphas[source.noisiest_timestep]), float(alphas[timesteps[0]]),
        )
        fresh_noise = torch.randn(start.shape, generator=generator).to(c.device)
        latent = lowfreq_init(start, fresh_noise, settings.lowfreq_factor)

        total = len(timesteps) * len(windows)
        report("sample", 0, total)
        for index, timestep in enumerate(timesteps):
            is_last = index == len(timesteps) - 1
            restarts = settings.restart and not is_last

            # Progress counts windows: the step's last model sweep reports each one.
            def step_done(k: int, index: int = index) -> None:
                report("sample", index * len(windows) + k + 1, total)

            # 3b. Guidance: Adam on x_t towards the source's SMM-difference pattern.
            if index < guided_steps:
                if procedure.cache_source_features:
                    source_features = source.features[timestep]
                else:
                    with torch.no_grad():
                        source_features = [self._source_features(source, timestep, source_embedding,
                                                                 window, report) for window in windows]
                latent = self._guide(latent, timestep, target, source_features, windows,
                                     learning_rates[index], settings, procedure, report)
            # 3c. One CFG DDIM step, t → t_next.
            latent = self._denoise(latent, timestep, scheduler, target, negative, settings.cfg_scale,
                                   windows, report, None if restarts else step_done)
            # 3d. Restart: re-noise t_next → t with single DDPM steps, then step again.
            if restarts:
                t_next = timesteps[index + 1]
                latent = restart_renoise(latent, c.scheduler.betas, t_next, timestep - t_next, generator)
                latent = self._denoise(latent, timestep, scheduler, target, negative, settings.cfg_scale,
                                       windows, report, step_done)
        return latent

    def _guide(
        self, latent: torch.Tensor, timestep: int, target: torch.Tensor,
        source_features: SourceFeatures, windows: list[Window], learning_rate: float,
        settings: TransferSettings, procedure: Procedure, report: _Reporter,
    ) -> torch.Tensor:
        """Adam on a copy of x_t so its SMM-difference pattern matches the source's.

        Each iteration sums the windows' losses, L = Σ_k L_k, backpropagating one
        window at a time (memory holds one window's activations), then takes one Adam
        step on the whole latent. On CUDA in half precision the latent stays float32,
        the UNet runs under autocast and the loss is scaled before backward (a fresh
        GradScaler per guided step), as the reference does.
        """
        unet = self.components.unet
        x = latent.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=learning_rate)
        scaler = torch.amp.GradScaler(self.components.device.type, enabled=self._scales_loss())
        kind = "truncated" if procedure.truncate_guidance else "full"
        with checkpointed_blocks(unet, settings.gradient_checkpointing), torch.enable_grad():
            for _ in range(settings.guidance_iterations):
                optimizer.zero_grad(set_to_none=True)
                for window, window_source in zip(windows, source_features, strict=True):
                    report.check()
                    loss = self._window_loss(window_slice(x, window), timestep, target, window_source,
                                             settings.loss, procedure)
                    scaler.scale(loss).backward()
                    self.unet_passes["guide", kind] += 1
                    self.unet_passes["guide", f"{kind}_backward"] += 1
                scaler.step(optimizer)
                scaler.update()
        return x.detach()

    def guidance_loss(
        self, latent: torch.Tensor, timestep: int, target: torch.Tensor,
        source_features: SourceFeatures, windows: list[Window], loss_kind: str = "cosine",
        procedure: Procedure | None = None,
    ) -> float:
        """L = Σ_k L_k at `latent`: the quantity `_guide` lowers (no gradients kept)."""
        procedure = procedure or Procedure()
        with torch.no_grad():
            return sum(self._window_loss(window_slice(latent.float(), window), timestep, target,
                                         window_source, loss_kind, procedure).item()
                       for window, window_source in zip(windows, source_features, strict=True))

    def _window_loss(
        self, x: torch.Tensor, timestep: int, target: torch.Tensor, source: list[torch.Tensor],
        loss_kind: str, procedure: Procedure,
    ) -> torch.Tensor:
        """One window's loss: the pairwise SMM loss summed over the three taps."""
        with self._precision():
            if procedure.truncate_guidance:
                taps = truncated_smm(self.components.unet, self._model_input(x), timestep, target)
            else:
                taps = self._full_pass_taps(x, timestep, target)
        return sum(pairwise_smm_loss(tap_source, tap[0], loss_kind)
                   for tap_source, tap in zip(source, taps, strict=True))

    def _full_pass_taps(self, x: torch.Tensor, timestep: int, target: torch.Tensor) -> list[torch.Tensor]:
        """The reference's guidance pass: the whole UNet runs, the taps are read on the way."""
        frames = x.shape[2]
        with capture_taps(self.components.unet, stop_after=False) as captured:
            self.components.unet(self._model_input(x), timestep, encoder_hidden_states=target)
        return [smm(captured[n].reshape(1, frames, *captured[n].shape[1:]).float()) for n in TAP_NAMES]

    @torch.no_grad()
    def _denoise(
        self, latent: torch.Tensor, timestep: int, scheduler: DDIMScheduler, target: torch.Tensor,
        negative: torch.Tensor, cfg_scale: float, windows: list[Window], report: _Reporter,
        after_window: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """One DDIM step (eta 0) with classifier-free guidance: ε = ε_neg + s·(ε_text − ε_neg),
        blended over the windows."""
        both = torch.cat([negative, target])

        def cfg_eps(piece: torch.Tensor, _window: int) -> torch.Tensor:
            report.check()
            eps_negative, eps_text = self._unet_eps(torch.cat([piece, piece]), timestep, both,
                                                    "sample").chunk(2)
            return eps_negative + cfg_scale * (eps_text - eps_negative)

        eps = blend_windowed(cfg_eps, latent, windows, after_window=after_window)
        return scheduler.step(eps.float(), timestep, latent.float(), eta=0.0).prev_sample

    # ------------------------------------------------------------------ model calls

    def _scales_loss(self) -> bool:
        """fp16 gradients can underflow; the reference scales the loss on CUDA."""
        c = self.components
        return c.device.type == "cuda" and c.dtype == torch.float16

    def _precision(self) -> AbstractContextManager:
        """Autocast on CUDA in half precision (float32 latents, half-precision UNet
        maths, as the reference runs); elsewhere the UNet runs in its own dtype."""
        c = self.components
        if c.device.type == "cuda" and c.dtype != torch.float32:
            return torch.autocast("cuda", dtype=c.dtype)
        return nullcontext()

    def _model_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Under autocast the UNet takes the latent as it is; else in its weights' dtype."""
        c = self.components
        if c.device.type == "cuda" and c.dtype != torch.float32:
            return latent
        return latent.to(c.dtype)

    def _unet_eps(self, latent: torch.Tensor, timestep: int, embedding: torch.Tensor, phase: str) -> torch.Tensor:
        c = self.components
        if embedding.shape[0] != latent.shape[0]:
            embedding = embedding.expand(latent.shape[0], -1, -1)
        self.unet_passes[phase, "full"] += latent.shape[0]
        with self._precision():
            return c.unet(self._model_input(latent), timestep, encoder_hidden_states=embedding).sample

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
        """(F, H, W, 3) uint8 → z₀ (1, C, F, h, w): the VAE posterior's mean × scaling
        factor (the reference samples the posterior; the mean keeps a re-edit's
        inversion deterministic)."""
        c = self.components
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = []
        for chunk in pixels.split(frames_per_slice):
            encoded = c.vae.encode(chunk.to(c.device, c.dtype)).latent_dist.mean
            latents.append(encoded * c.vae.config.scaling_factor)
        return torch.cat(latents).permute(1, 0, 2, 3).unsqueeze(0)

    @torch.no_grad()
    def _decode(self, latent: torch.Tensor, frames_per_slice: int, report: _Reporter,
                phase: str = "decode", done: int = 0, total: int | None = None) -> np.ndarray:
        """z₀ (1, C, F, h, w) → (F, H, W, 3) uint8; reports (phase, done + slices decoded,
        total or the slice count)."""
        c = self.components
        planes = (latent[0].permute(1, 0, 2, 3) / c.vae.config.scaling_factor).to(c.dtype)
        chunks = planes.split(frames_per_slice)
        images = []
        for index, chunk in enumerate(chunks):
            report.check()
            decoded = c.vae.decode(chunk).sample.float().clamp(-1, 1)
            images.append(((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
            report(phase, done + index + 1, total or len(chunks))
        return torch.cat(images).numpy()

    # ------------------------------------------------------------------ step 5 (the upscaler's)

    @torch.no_grad()
    def video_to_video(
        self, frames: np.ndarray, size: tuple[int, int], windows: list[Window],
        settings: TransferSettings, seed: int, report: _Reporter,
    ) -> np.ndarray:
        """The upscaling stage, run by the upscaler's engine: ZeroScope XL's documented
        workflow, video-to-video from the first stage's frames (SDEdit).

        (F, h, w, 3) uint8 → (F, H, W, 3) at size = (W, H):
            5a. resize the frames to W×H (bicubic) and encode them: z₀
            5b. of the `steps` DDIM timesteps keep the last k = ⌊steps·upscale_strength⌋,
                re-noise z₀ to the first of them, t₀: x = √ᾱ_t₀·z₀ + √(1 − ᾱ_t₀)·ε
                (ε from a CPU generator seeded with the edit's seed)
            5c. k CFG DDIM steps with the same prompt, negative prompt and CFG scale,
                blended over the same temporal windows; no guidance, no restart
            5d. decode
        """
        c = self.components
        scheduler = DDIMScheduler.from_config(c.scheduler.config)
        scheduler.set_timesteps(settings.steps)
        timesteps = [int(t) for t in scheduler.timesteps][settings.steps - settings.upscale_step_count():]
        slices = math.ceil(len(frames) / settings.vae_slice)
        total = 1 + len(timesteps) * len(windows) + slices
        report("upscale", 0, total)

        # 5a.
        latent = self._encode(resize_frames(frames, *size), settings.vae_slice).float()
        report("upscale", 1, total)
        # 5b.
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latent.shape, generator=generator).to(c.device)
        latent = scheduler.add_noise(latent, noise, torch.tensor([timesteps[0]]))
        # 5c.
        target = self._embed([_full_prompt(settings, settings.prompt)])
        negative = self._embed([settings.negative_prompt])
        for index, timestep in enumerate(timesteps):
            def step_done(k: int, index: int = index) -> None:
                report("upscale", 1 + index * len(windows) + k + 1, total)

            latent = self._denoise(latent, timestep, scheduler, target, negative, settings.cfg_scale,
                                   windows, report, step_done)
        # 5d.
        return self._decode(latent, settings.vae_slice, report, "upscale",
                            1 + len(timesteps) * len(windows), total)


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


def frames_to_edit(settings: TransferSettings, clip_length: int) -> int:
    """How many frames the model edits: `num_frames` if set, else the whole clip; never
    more than the frame limit (BadClipError with one sentence)."""
    limit = settings.frame_limit
    count = settings.num_frames if settings.num_frames is not None else clip_length
    if count > limit:
        raise BadClipError(
            f"{count} frames is more than the limit of {limit} frames per edit; trim the clip, "
            f"ask for fewer frames (--frames {limit} samples it evenly) or raise the limit "
            f"with --frame-limit."
        )
    return count


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
    model: str, device: str | None = None, dtype: str | None = None, cache_dir: Path | None = None,
    cache_max_bytes: int | None = None, upscale_model: str | None = None,
) -> Engine:
    """Load a model ("tiny", a hub id, or a local diffusers folder) once; the inversion
    cache keeps at most `cache_max_bytes` (default DEFAULT_CACHE_MAX_BYTES).

    upscale_model (ZEROSCOPE_XL, a local folder, "tiny"; None: no upscaler) is loaded
    first, so missing upscaler weights end in one sentence before anything else loads."""
    upscaler = None
    if upscale_model is not None:
        upscaler = Engine(load_components(upscale_model, device, dtype, flag="--upscale-model"))
    return Engine(load_components(model, device, dtype), cache_dir, cache_max_bytes, upscaler)
