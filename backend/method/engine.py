"""The motion-transfer engine: one loaded model, many edits.

    engine = load_engine("tiny", device="cpu", cache_dir=Path("cache"))   # backend/edit.py
    result = engine.transfer(clip_frames, TransferSettings(prompt="a train"),
                             progress=print_progress, cancelled=lambda: False)
    result.frames      # (N, H, W, 3) uint8 at the result size, one per input frame
    result.sidecar     # shared/sidecar.py: settings, seed, steps used, model, framing, windows, …

One edit, as Understudy runs it (docs/method.md):

    0. frame       the frames chosen, the box of them the model sees (framing: fit, crop,
                   stretch; backend/method/framing.py) resized to the model's size
    0b. embed      the source, target and negative prompts, in one phase before the
                   denoiser is used: from the embedding cache (backend/method/embeddings.py),
                   or by the text encoder on the GPU alone or on the CPU
                   (backend/memory/text_encoder.py); it never shares the GPU with the denoiser
    1. encode      frames → VAE latent z₀ of the whole clip (in slices of frames)
    2. invert      inversion of z₀ with the source prompt along the sampler's own ODE
                   (DDIM for ZeroScope, flow-matching Euler for Wan), and the source SMM
                   features at the guided timesteps, per window — or both from the cache
    3. sample      low-frequency initial latent (or plain noise, `init`); for each of the
                   `steps` timesteps: guided steps optimise x_t with Adam on the pairwise
                   SMM loss (target prompt, model truncated after its feature taps); then
                   a CFG step; then restart: re-noise back to t and step again
    4. decode      VAE decode (in slices)
    5. upscale     with settings.upscale "xl": a second engine, of a second model of the
                   same backbone (its upscaler, Backbone.check_upscaler), re-noises the
                   resized result part of the way and denoises it (video-to-video); then
                   retime if asked

With regions (`masks`, backend/method/regions.py): guidance reads each region's masked
SMM; under subject motion every latent the sampler reaches at a timestep is blended with
the source's inverted latent there outside the grown region, and 6. composite puts the
decoded frames back into the source frames, at the source's size, through the feathered
region (outside the grown region the source's pixels, exactly).

Everything model-specific is the backbone's (backend/backbones/base.py): the engine
sees a Backbone (encode, decode, embed, predict, taps, geometry, defaults) and its
Schedule (timesteps, inversion, step, restart). Settings left None ("the model's") are
filled from the backbone's defaults before anything else.

Clips longer than the model's window (24 frames for ZeroScope, 81 for Wan) keep one
latent for all their frames; every model use runs per window of LATENT frames and
blends (backend/method/windows.py), and guidance sums the windows' losses. A clip that
fits one window runs exactly as it would without windows.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backend.backbones.base import Backbone, Conditioning, Timestep
from backend.errors import BadClipError, BadSettingsError, OutOfMemoryError
from backend.masks import MaskTally, check_region_masks_shape, region_name
from backend.memory.savers import (
    MemoryDecision,
    out_of_memory_sentence,
    savers_applied,
    with_savers,
)
from backend.memory.text_encoder import text_encoder_placed
from backend.method.cost import edit_cost
from backend.method.embeddings import EmbeddingCache, PromptEmbeddings, embedding_key
from backend.method.framing import Framing, choose_framing, frames_for_model
from backend.method.guidance import lowfreq_init, pairwise_smm_loss
from backend.method.inversion import DEFAULT_CACHE_MAX_BYTES, InversionCache, SourceState, cache_key
from backend.method.quality import PREVIEW, sampling_route
from backend.method.regions import (
    EditRegions,
    blend_latents,
    composite_into_frames,
    generation_mask,
    masked_smm,
    plate_alpha_frames,
    prepare_regions,
    present_frames,
    regions_loss,
    weights_at,
)
from backend.method.windows import Window, blend_windowed, place_windows, window_slice
from backend.references import check_references, fingerprint
from backend.results import (
    CancelCheck,
    ProgressCallback,
    RegionMasks,
    Reporter,
    Take,
    TakeCallback,
    TransferResult,
)
from backend.video import frames_to_edit, resize_frames, retime_frames, sample_indices
from shared.settings import TransferSettings
from shared.sidecar import Sidecar

OUT_OF_MEMORY = (
    "The GPU ran out of memory; try --gradient-checkpointing, fewer --frames, a smaller "
    "--vae-slice or a smaller --width/--height, --upscale none, or stop other programs "
    "using the GPU."
)


@dataclass
class Procedure:
    """How much work an edit may skip. Understudy's defaults; the reference's in `bench`."""

    use_cache: bool = True  # reuse inversion + source features for the same clip, and embeddings
    truncate_guidance: bool = True  # stop the model after its feature taps while guiding
    cache_source_features: bool = True  # compute source features once, at inversion time


SourceFeatures = list[list[torch.Tensor]]
"""Per window, per tap (the backbone's tap_names order): the source SMM, (window frames, D);
with regions, each region's masked SMM, (R, window frames, D)."""


class Engine:
    """A loaded backbone plus the on-disk inversion and embedding caches (one folder).

    `model_passes` counts model work per (phase, kind) in batch elements of one window,
    kind being "full", "truncated" or "truncated_backward"; the benchmark turns it into
    forward-equivalents. `upscaler`, when loaded, is a second Engine (the backbone's
    upscaling model) that runs the upscaling stage; it counts its own passes.
    """

    def __init__(self, backbone: Backbone, cache_dir: Path | None = None,
                 cache_max_bytes: int | None = None, upscaler: Engine | None = None) -> None:
        self.backbone = backbone
        self.cache = InversionCache(cache_dir, cache_max_bytes or DEFAULT_CACHE_MAX_BYTES)
        self.embedding_cache = EmbeddingCache(cache_dir)
        self.model_passes: Counter[tuple[str, str]] = Counter()
        self.upscaler = upscaler
        # Sums the latent's gradient over a gang's ranks in place before each Adam step
        # (backend/gang.py GangMember.reduce_gradient); one process: nothing to sum.
        self.gradient_reducer: Callable[[torch.Tensor], None] = _own_gradient

    def describe(self) -> dict[str, Any]:
        """What the server reports in its hello: model id, device, dtype, the backbone
        (name, native size, pixel budget, window, frame rate, side multiple, the
        settings it decides) and the upscaler's model id (None: this engine cannot run
        upscale 'xl')."""
        b = self.backbone
        return {"model": b.model_id, "device": str(b.device), "dtype": str(b.dtype).removeprefix("torch."),
                "backbone": b.facts.to_dict(),
                "upscaler": self.upscaler.backbone.model_id if self.upscaler else None}

    def resolve(self, settings: TransferSettings) -> TransferSettings:
        """The settings with every "the model's" (None) filled from the backbone."""
        return settings.resolved(self.backbone.facts.defaults)

    # ------------------------------------------------------------------ the edit

    def transfer(
        self,
        clip_frames: np.ndarray,
        settings: TransferSettings,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        procedure: Procedure | None = None,
        masks: RegionMasks | None = None,
        savers: MemoryDecision | None = None,
        references: list[np.ndarray] | None = None,
    ) -> TransferResult:
        """Edit a clip.

        clip_frames: (N, H, W, 3) uint8, the whole clip (or anything with len() and
        [index array], like the server's lazily decoded clip); frames are sampled from
        it by settings.num_frames / settings.start and framed by settings.framing.
        Returns frames of the framing's result size covering its crop box of the source.

        masks: the edit's regions (backend/results.py RegionMasks, at the clip's size), or
        None. With regions and motion "subject", each region's own motion guides it,
        the latent outside the grown region follows the source's inverted latent, and
        the frames returned are whole source frames (the source's size, whatever the
        framing) composited through the feathered region (backend/method/regions.py).
        With motion "camera", the motion outside every region guides a whole new frame.

        savers: the memory savers decided for this edit before it (`--memory auto`, by
        whoever plans it: backend/memory/planner.py MemoryPlanner.decide), turned on here
        and recorded in the sidecar's `memory`; None turns none on. The engine never plans.

        references: reference images, (H, W, 3) uint8 each, for a backbone that takes
        them (facts.max_references; Wan VACE): the new subject's look, conditioned on
        with the strength settings.reference_strength (docs/method.md, "Reference images").
        Raises BadClipError (BadMaskError), BadReferenceError, BadSettingsError,
        OutOfMemoryError, JobCancelled.
        """
        seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
        take = Take(settings.prompt, seed)
        return self.transfer_takes(clip_frames, settings, [take], progress, cancelled, procedure,
                                   masks, savers, references=references)[0]

    def transfer_takes(
        self,
        clip_frames: np.ndarray,
        settings: TransferSettings,
        takes: list[Take],
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
        procedure: Procedure | None = None,
        masks: RegionMasks | None = None,
        savers: MemoryDecision | None = None,
        batch_size: int | None = None,
        on_take: TakeCallback | None = None,
        references: list[np.ndarray] | None = None,
    ) -> list[TransferResult]:
        """Several takes of one clip (backend/results.py Take: a prompt and a seed), from one
        inversion and one set of source features: one TransferResult per take, in order,
        each equal to `transfer` with settings.prompt = take.prompt and settings.seed =
        take.seed (to float precision: the model's batched arithmetic may round apart
        from its single one; on a CPU the tests find them within 1e-5 of the latent's
        scale, tests/test_takes.py).

        Takes run together as one batch of up to `batch_size` (None: all of them;
        the memory plan's `largest_batch` decides it for a GPU), the next batch after:
        the latent is (B, C, F', h, w), take b's noise is drawn from its own generator
        Generator("cpu").manual_seed(seed_b) in the single edit's order (the initial
        noise, then each restart's), its prompt's embedding is row b of the target
        (B, L, E). Guidance minimises the sum of the takes' losses,

            L(x) = Σ_b L_b(x_b),   so   ∂L/∂x_b = ∂L_b/∂x_b,

        since take b's loss reads only its own latent (the model mixes nothing across
        the batch); Adam's update is elementwise (m, v, the step, per element), so each
        take follows the very path its single edit's Adam takes. (On CUDA in half
        precision the loss scaler is shared: a step one take overflows is skipped for
        the whole batch, where its single edit would skip it alone.)

        Progress names the takes: the shared phases ("encode", "invert", "features")
        once, the others as "sample take 2" or "sample takes 1-4" when there is more
        than one take. The sidecars are each take's own; one inversion serves all.

        Each take is finished as soon as its batch is decoded, and `on_take(index,
        result)` is told at once (index into `takes`), so a caller can store or show it
        while the next batch samples (the server's take_ready); cancellation is checked
        before each take is finished, so a cancel stops the takes not yet handed out.
        """
        if not takes:
            raise BadSettingsError("Ask for at least one take.")
        # 0. Check everything, choose the frames and frame them, before any model work.
        procedure = procedure or Procedure()
        report = Reporter(progress, cancelled)
        settings = self.resolve(settings)
        requested_upscale = settings.upscale  # the sidecar keeps the request (--from-take)
        if settings.quality == "preview" and not PREVIEW.upscale:
            settings = dataclasses.replace(settings, upscale="none")
        self.check_settings(settings, len(clip_frames))
        b = self.backbone
        references = check_references(references or [], b.facts.max_references, b.facts.name)
        self.backbone.use_settings(settings)
        passes_before = Counter(self.model_passes)
        indices = sample_indices(len(clip_frames), frames_to_edit(settings, len(clip_frames)),
                                 settings.start)
        chosen = np.asarray(clip_frames[indices])
        frame_size = (chosen.shape[2], chosen.shape[1])
        if masks is not None:  # the shapes now, from headers; the values as they are read
            masks = masks if hasattr(masks, "shape") else np.asarray(masks)  # (a list of arrays)
            check_region_masks_shape(masks.shape, len(clip_frames), frame_size)
        framing = self.framing_for(settings, frame_size)
        settings = with_savers(settings, savers.savers) if savers else settings
        frames = self._padded(frames_for_model(chosen, framing))
        windows = self.windows_for(len(frames), settings)
        regions = self._regions_for(masks, indices, settings, framing, len(frames))
        if regions is None or not regions.keeps_plate():
            del chosen  # the composite needs the source frames; nothing else does
        batch_size = max(1, batch_size or len(takes))
        groups = [list(range(first, min(first + batch_size, len(takes))))
                  for first in range(0, len(takes), batch_size)]
        shared: dict[str, float] = {}
        timings: list[dict[str, float]] = []  # per take: its share of the run's seconds
        passes: list[Counter] = []  # per take: its share of the run's model passes
        decoded: list[np.ndarray] = []  # per take, (F, h, w, 3) uint8
        results: list[TransferResult] = []
        keeps_plate = regions is not None and regions.keeps_plate()
        try:
            with _timed(shared, "embed"):
                embeddings = self.embed_prompts(
                    settings, takes, procedure,
                    on_cpu="text_encoder_offload" in (savers.savers if savers else ()),
                    fp8="text_encoder_fp8" in (savers.savers if savers else ()))
            with savers_applied(self.backbone, savers.savers if savers else ()):
                with _timed(shared, "encode_invert"):
                    source, from_cache = self._source_state(frames, windows, settings, procedure,
                                                            report, embeddings.source)
                    conditioning = self.conditioning_for(frames, regions, references, settings)
                shared_passes = self.model_passes - passes_before
                for group in groups:
                    group_timings: dict[str, float] = {}
                    group_before = Counter(self.model_passes)
                    with _timed(group_timings, "sample"):
                        latents = self._sample(source, windows, settings,
                                               [takes[k] for k in group], procedure,
                                               _TakeReporter(report, group, len(takes)),
                                               embeddings.of_takes(group), regions, conditioning)
                    with _timed(group_timings, "decode"):
                        for k, latent in zip(group, latents.split(1), strict=True):
                            decoded.append(self.decode(
                                latent, settings.vae_slice,
                                _TakeReporter(report, [k], len(takes)))[: len(indices)])
                    # Each take's cost is its share: the shared phases' over every take,
                    # its batch's over the batch (one take: the edit's whole cost).
                    timings += [{**{name: value / len(takes) for name, value in shared.items()},
                                 **{name: value / len(group)
                                    for name, value in group_timings.items()}} for _ in group]
                    group_passes = self.model_passes - group_before
                    passes += [Counter({key: count / len(takes)
                                        for key, count in shared_passes.items()})
                               + Counter({key: count / len(group)
                                          for key, count in group_passes.items()})
                               for _ in group]
                    for k in group:  # finished now, told now: the next batch is still to come
                        report.check()
                        take = takes[k]
                        take_settings = dataclasses.replace(  # a request without a seed records none
                            settings, prompt=take.prompt,
                            seed=None if settings.seed is None else take.seed)
                        results.append(self._finish(
                            decoded[k], take_settings, take.seed, framing, indices, windows,
                            from_cache, timings[k], passes[k], requested_upscale, regions,
                            chosen if keeps_plate else None, frame_size, savers,
                            _TakeReporter(report, [k], len(takes)), last=k == len(takes) - 1,
                            references=[fingerprint(image) for image in references] or None))
                        decoded[k] = None  # type: ignore[call-overload]  # held once: in its result
                        if on_take is not None:
                            on_take(k, results[k])
        except torch.cuda.OutOfMemoryError as error:
            raise OutOfMemoryError(out_of_memory_sentence(savers, OUT_OF_MEMORY)) from error
        finally:
            if self.backbone.device.type == "cuda":
                torch.cuda.empty_cache()
        return results

    def _finish(self, out: np.ndarray, settings: TransferSettings, seed: int, framing: Framing,
                indices: np.ndarray, windows: list[Window], from_cache: bool,
                timings: dict[str, float], passes: Counter, requested_upscale: str,
                regions: EditRegions | None,
                chosen: np.ndarray | None, frame_size: tuple[int, int],
                savers: MemoryDecision | None, report: Reporter, last: bool,
                references: list[dict[str, Any]] | None = None) -> TransferResult:
        """One take's decoded frames → its result: upscaled, composited through its
        regions (over the engine's copy of the source frames, in place only for the
        last take: the others still need them), retimed, with its sidecar (its cost:
        `passes` and `timings`, its share of the run, plus its own upscale and composite)."""
        if framing.upscale_size is not None:
            with _timed(timings, "upscale"):
                out = self.upscaler.video_to_video(out, framing.upscale_size, settings, seed,
                                                   report)
        alpha = None
        if chosen is not None and regions is not None:
            with _timed(timings, "composite"):
                # Over the engine's own copy of the frames (one that owns its data: not
                # a view of the caller's clip), which nothing reads after.
                out = composite_into_frames(chosen, out, regions.plate, _box(framing),
                                            in_place=last and chosen.flags.owndata
                                            and chosen.flags.writeable)
                alpha = plate_alpha_frames(regions.plate, _box(framing), frame_size)
        out = retime_frames(out, settings.output_frames or len(out))
        sidecar = self._sidecar(settings, seed, framing, indices, windows, from_cache, timings,
                                regions)
        sidecar = dataclasses.replace(
            sidecar, settings={**sidecar.settings, "upscale": requested_upscale},
            cost=edit_cost(passes, self.backbone.truncated_pass_share, timings),
            references=references)
        if savers:
            sidecar = dataclasses.replace(sidecar, memory=savers.to_dict())
        return TransferResult(out, sidecar,
                              None if alpha is None else retime_frames(alpha, len(out)))

    def conditioning_for(self, frames: np.ndarray, regions: EditRegions | None,
                         references: list[np.ndarray],
                         settings: TransferSettings) -> Conditioning | None:
        """The backbone's conditioning of this edit beyond its prompts (None: it has
        none): the frames as the model gets them, where it generates (the plate's grown
        region at the model's size, backend/method/regions.py generation_mask; None,
        the whole frame, without a kept plate), the reference images and their strength."""
        generate = None
        if regions is not None and regions.keeps_plate():
            generate = generation_mask(regions.plate, (frames.shape[2], frames.shape[1]),
                                       len(frames))
        return self.backbone.conditioning(frames, generate, references,
                                          settings.reference_strength)

    def _regions_for(self, masks: RegionMasks | None, indices: np.ndarray,
                     settings: TransferSettings, framing: Framing,
                     model_frames: int) -> EditRegions | None:
        """The edit's regions, framed as its frames. None without a region: the edit as
        it always was (camera motion without a region guides by the whole frame's SMM,
        which is today's guidance).

        Only the frames the edit uses are read, one frame of every region at a time, and
        each once: `MaskTally` checks its values as `prepare_regions` takes its pixels
        (the shapes were checked before, from headers), so a mask is never decoded for
        a check alone, nor held whole. A bad mask is refused here, before any model work."""
        if masks is None:
            return None
        tallies = [MaskTally(region_name(index)) for index in range(len(masks))]

        def checked_frames() -> Iterator[np.ndarray]:
            for index in indices:
                decoded = np.asarray(masks[:, [index]])  # (R, 1, H, W): this frame, every region
                yield np.concatenate([tally.add(region) for tally, region in
                                      zip(tallies, decoded, strict=True)])

        regions = self.edit_regions(checked_frames(), len(indices), len(masks), settings,
                                    _box(framing), framing.model_size, model_frames)
        for tally in tallies:
            tally.finish()
        return regions

    def edit_regions(self, mask_frames: Iterator[np.ndarray | torch.Tensor], frame_count: int,
                     region_count: int, settings: TransferSettings,
                     box: tuple[int, int, int, int], model_size: tuple[int, int],
                     model_frames: int) -> EditRegions:
        """The edit's regions prepared from `mask_frames`, one frame of every region at a
        time ((R, H, W) at the source's size, `frame_count` of them), framed by `box`
        (left, top, right, bottom) of the source, for a model of model_size (width,
        height) editing `model_frames` frames (backend/method/regions.py prepare_regions:
        the plate m, the guiding masks and the latent-size masks)."""
        b = self.backbone
        width, height = model_size
        return prepare_regions(
            mask_frames, frame_count, region_count, settings.motion, settings.region_grow,
            settings.region_feather, box, model_frames, b.latent_frames(model_frames),
            (width // b.latent_cell, height // b.latent_cell), b.device)

    def _sidecar(self, settings: TransferSettings, seed: int, framing: Framing,
                 indices: np.ndarray, windows: list[Window], from_cache: bool,
                 timings: dict[str, float], regions: EditRegions | None = None) -> Sidecar:
        """The record of how this edit was made (shared/sidecar.py): the counts it used,
        not only the request (an automatic guided count is None in `settings`; the
        settings the model decides are recorded with the values it gave them)."""
        route = sampling_route(settings)
        return Sidecar(
            settings=settings.to_dict(),
            seed=seed,
            model=self.backbone.model_id,
            steps=len(route.indices),
            guided_steps=route.guided_steps,
            device=str(self.backbone.device),
            dtype=str(self.backbone.dtype).removeprefix("torch."),
            input_frame_indices=indices.tolist(),
            windows=[list(window) for window in windows],
            inversion_from_cache=from_cache,
            timings_s={name: round(value, 3) for name, value in timings.items()},
            framing=framing.to_dict(),
            upscaler=None if framing.upscale_size is None else {
                "model": self.upscaler.backbone.model_id, "steps": settings.upscale_step_count()},
            backbone=self.backbone.facts.name,
            regions=None if regions is None and settings.motion == "subject" else {
                "count": 0 if regions is None else regions.count, "grow": settings.region_grow,
                "feather": settings.region_feather, "motion": settings.motion,
                "composited": regions is not None and regions.keeps_plate()},
        )

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        """Refuse, before any work, settings this model or this clip cannot run.

        frame_size: the clip's (width, height) when known; the framing is checked too.
        Settings left to the model (None) are checked as the backbone fills them.
        Raises BadSettingsError or BadClipError with one sentence.
        """
        settings = self.resolve(settings)
        b = self.backbone
        side = b.facts.side_multiple
        if settings.width % side or settings.height % side:
            raise BadSettingsError(f"Width and height must be multiples of {side} for this model.")
        if min(settings.width, settings.height) // b.latent_cell < settings.lowfreq_factor:
            raise BadSettingsError("The frame is too small for the low-frequency factor; lower it.")
        if settings.upscale != "none":
            b.check_upscaler(None if self.upscaler is None else self.upscaler.backbone)
        if settings.guidance_block is not None and "guidance_block" not in b.facts.defaults:
            raise BadSettingsError(
                f"The {b.facts.name} backbone's feature taps are fixed; leave --guidance-block unset.")
        b.check_settings(settings)
        window, overlap = b.latent_frames(settings.window_frames), b.latent_frames(settings.window_overlap)
        if settings.window_overlap > 0 and overlap >= window:
            raise BadSettingsError(
                f"A window of {settings.window_frames} frames is {window} latent frames for this "
                f"model, no more than the overlap of {settings.window_overlap} frames; lower "
                f"--window-overlap or raise --window-frames.")
        b.schedule.check_grids(settings.steps, settings.inversion_steps)
        sample_indices(clip_length, frames_to_edit(settings, clip_length), settings.start)
        edited = b.model_frames(frames_to_edit(settings, clip_length))
        self.check_window_count(edited, settings)
        if frame_size is not None:
            self.framing_for(settings, frame_size)

    def check_window_count(self, frames: int, settings: TransferSettings) -> None:
        """A backbone conditioned on the whole clip (Wan VACE) edits one window: more
        `frames` (the model's) are refused with one sentence (BadSettingsError)."""
        b = self.backbone
        if b.conditions_whole_clip and len(self.windows_for(frames, settings)) > 1:
            raise BadSettingsError(
                f"The {b.facts.name} backbone edits at most {settings.window_frames} frames at "
                f"once; give fewer --frames (or a shorter --start range).")

    def framing_for(self, settings: TransferSettings, frame_size: tuple[int, int]) -> Framing:
        """Where and at which sizes frames of frame_size (width, height) are edited
        (backend/method/framing.py). BadClipError with one sentence for a frame too elongated
        for fit; BadSettingsError for a model size too small for the low-pass factor."""
        settings = self.resolve(settings)
        upscale = None if settings.upscale == "none" else (settings.upscale_width, settings.upscale_height)
        try:
            framing = choose_framing(settings.framing, frame_size, (settings.width, settings.height),
                                   self.backbone.facts.side_multiple, upscale)
        except ValueError as error:
            raise BadClipError(str(error)) from None
        if min(framing.model_size) // self.backbone.latent_cell < settings.lowfreq_factor:
            raise BadSettingsError(
                f"The model would run at {framing.model_size[0]}x{framing.model_size[1]}, too small "
                f"for the low-frequency factor {settings.lowfreq_factor}; lower --lowfreq-factor.")
        return framing

    def windows_for(self, frames: int, settings: TransferSettings) -> list[Window]:
        """The temporal windows, in latent frames: a window of `window_frames` pixel frames
        is latent_frames(window_frames) latent frames, the overlap likewise (0 stays 0)."""
        b = self.backbone
        overlap = b.latent_frames(settings.window_overlap) if settings.window_overlap else 0
        return place_windows(b.latent_frames(frames), b.latent_frames(settings.window_frames), overlap)

    def _padded(self, frames: np.ndarray) -> np.ndarray:
        """The frames with their last repeated up to the length the VAE takes whole
        (backbone.model_frames; the same frames for ZeroScope)."""
        wanted = self.backbone.model_frames(len(frames))
        if wanted == len(frames):
            return frames
        return np.concatenate([frames, np.repeat(frames[-1:], wanted - len(frames), axis=0)])

    # ------------------------------------------------------------------ step 0b

    def embed_prompts(self, settings: TransferSettings, takes: list[Take] | None = None,
                      procedure: Procedure | None = None, on_cpu: bool = False,
                      fp8: bool = False) -> PromptEmbeddings:
        """The edit's prompt embeddings in one phase before the denoiser is used: the
        source's and the negative's (1, L, E), and the target's (K, L, E), row k take k's
        prompt (takes: None means the settings' prompt alone). Each (source, target,
        negative) triple comes from the embedding cache (keyed by the model, its dtype and
        the three prompts as applied), or is embedded with the text encoder placed on the
        GPU alone (`on_cpu`: on the CPU, the text_encoder_offload saver; `fp8`: its layers
        stored in float8, the text_encoder_fp8 saver), once for every triple missing, and
        cached. A hit never moves or runs the text encoder."""
        procedure = procedure or Procedure()
        settings = self.resolve(settings)
        b = self.backbone
        source, negative = settings.full_prompt(settings.source_prompt), settings.negative_prompt
        take_targets = [settings.full_prompt(take.prompt)
                        for take in (takes or [Take(settings.prompt, settings.seed or 0)])]
        targets = list(dict.fromkeys(take_targets))  # each distinct prompt once, in order
        keys = {target: embedding_key(b.model_id, b.dtype, source, target, negative, fp8)
                for target in targets}
        found: dict[str, PromptEmbeddings] = {}
        if procedure.use_cache:
            for target in targets:
                cached = self.embedding_cache.load(keys[target], b.device)
                if cached is not None:
                    found[target] = cached
        missing = [target for target in targets if target not in found]
        if missing:
            with text_encoder_placed(b, on_cpu, fp8=fp8):
                source_embedding, negative_embedding = self.embed([source]), self.embed([negative])
                for target in missing:
                    found[target] = PromptEmbeddings(source_embedding, self.embed([target]),
                                                     negative_embedding)
            if procedure.use_cache:
                for target in missing:
                    self.embedding_cache.save(keys[target], found[target])
        first = found[targets[0]]
        return PromptEmbeddings(first.source, torch.cat([found[target].target
                                                         for target in take_targets]), first.negative)

    # ------------------------------------------------------------------ steps 1–2

    def _source_state(
        self, frames: np.ndarray, windows: list[Window], settings: TransferSettings,
        procedure: Procedure, report: Reporter, source_embedding: torch.Tensor,
    ) -> tuple[SourceState, bool]:
        """Inverted latents and source features of the whole clip (source_embedding: the
        source prompt's, (1, L, E)): from the cache, or computed and cached."""
        settings = self.resolve(settings)
        self.backbone.use_settings(settings)
        b = self.backbone
        sampling = b.schedule.timesteps(settings.steps)
        guided = sampling[: settings.guided_step_count()]
        key = cache_key(frames, {
            "model": b.model_id, "dtype": str(b.dtype), "source_prompt": settings.full_prompt(settings.source_prompt),
            "inversion_steps": settings.inversion_steps, "steps": settings.steps,
            "guided_steps": len(guided), "windows": windows,
        })
        if procedure.use_cache:
            cached = self.cache.load(key, b.device)
            if cached is not None:
                return cached, True
        report("encode", 0, 1)
        source_latent = self.encode(frames, settings.vae_slice)
        report("encode", 1, 1)
        state = self.invert(source_latent, source_embedding, windows, settings, report)
        if procedure.cache_source_features:
            with torch.no_grad():
                for index, timestep in enumerate(guided):
                    state.features[timestep] = []
                    for k, window in enumerate(windows):
                        state.features[timestep].append(
                            self.source_features(state, timestep, source_embedding, window, report))
                        report("features", index * len(windows) + k + 1, len(guided) * len(windows))
        if procedure.use_cache:
            self.cache.save(key, state)
        return state, False

    @torch.no_grad()
    def invert(
        self, source_latent: torch.Tensor, source_embedding: torch.Tensor, windows: list[Window],
        settings: TransferSettings, report: Reporter,
        window_output: Callable[[torch.Tensor, Timestep], torch.Tensor] | None = None,
    ) -> SourceState:
        """Invert z₀ (1, C, F', h, w) along the schedule's own ODE with the source prompt's
        embedding (1, L, E), each model call per window of `windows` and blended; returns
        the SourceState (the inverted latents at the sampling timesteps, the noisiest
        one, in host memory on a GPU: Backbone.to_host) with no features yet. Reports ("invert", windows done, timesteps × windows).

        window_output(piece, timestep): the model output of one window's latent piece
        (default: the model's, counted in model_passes; the memory plan passes one that
        runs the model on the first window only, the others' being alike)."""
        b = self.backbone
        inversion = b.schedule.inversion_timesteps(settings.steps, settings.inversion_steps)
        step_of = {timestep: index for index, timestep in enumerate(inversion)}

        def model_output(piece: torch.Tensor, timestep: Timestep) -> torch.Tensor:
            report.check()
            return self.predict(piece, timestep, source_embedding, "invert")

        window_output = window_output or model_output

        def inversion_output(latent: torch.Tensor, timestep: Timestep) -> torch.Tensor:
            def window_done(k: int) -> None:
                report("invert", step_of[timestep] * len(windows) + k + 1,
                       len(inversion) * len(windows))

            return blend_windowed(lambda piece, _window: window_output(piece, timestep), latent,
                                  windows, after_window=window_done)

        # Each kept latent goes to host memory as the walk reaches it (on a GPU; on a CPU
        # it stays): a long clip's keep of every sampling timestep never piles up there.
        inverted, noisiest_timestep, noisiest = b.schedule.invert(
            inversion_output, source_latent, settings.steps, settings.inversion_steps,
            store=b.to_host)
        # Contiguous, as a cache load gives them back: the model computes a strided latent
        # to different low bits, and a re-edit from the cache must equal the first edit.
        return SourceState(
            source_latent=source_latent.contiguous(),
            inverted={timestep: latent.contiguous() for timestep, latent in inverted.items()},
            noisiest_timestep=noisiest_timestep,
            noisiest=noisiest.contiguous(),
            features={},
        )

    def source_features(
        self, state: SourceState, timestep: Timestep, source_embedding: torch.Tensor, window: Window,
        report: Reporter, regions: EditRegions | None = None,
    ) -> list[torch.Tensor]:
        """Source SMM features of one window: the backbone's taps on the inverted x_t at t,
        source prompt. (window frames, D) per tap; with regions, each guiding region's
        masked SMM, (R, window frames, D)."""
        report.check()
        self.model_passes["features", "truncated"] += 1
        if regions is not None:
            taps = self.backbone.taps(self._inverted_window(state, timestep, window), timestep,
                                      source_embedding, truncated=True, spatial=True)
            return [_region_smms(tap[0], regions, window) for tap in taps]
        taps = self.backbone.taps(self._inverted_window(state, timestep, window), timestep,
                                  source_embedding, truncated=True)
        return [tap[0] for tap in taps]

    def _inverted_window(self, state: SourceState, timestep: Timestep, window: Window) -> torch.Tensor:
        """One window's slice of the inverted latent at `timestep`, on the model's device
        (the whole clip's stays in host memory on a GPU)."""
        return window_slice(state.inverted[timestep], window).to(self.backbone.device)

    # ------------------------------------------------------------------ step 3

    def _sample(
        self, source: SourceState, windows: list[Window], settings: TransferSettings,
        takes: list[Take], procedure: Procedure, report: Reporter, embeddings: PromptEmbeddings,
        regions: EditRegions | None = None, conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        """The guided, restarted sampling loop of a batch of takes (the prompts'
        `embeddings` made before it, one target row per take); returns their final
        latents z₀, (B, C, F', h, w), row b take b's (transfer_takes says why each row
        equals its single edit).

        With regions, guidance reads each region's masked SMM (the source's computed here
        from the cached inverted latents, which do not depend on the region), and where
        the plate is kept every latent the sampler reaches at a timestep is blended with
        the source's inverted latent there: z = m_lat·z + (1 − m_lat)·z_src(t).

        With a `conditioning` (the backbone's: Wan VACE's references), every guided and
        sampling pass runs conditioned, on a latent whose first `leading_frames` frames
        (the references' slots) come before the clip's: drawn with the clip's noise from
        each take's generator (one draw of the whole shape, as WanVACEPipeline draws it),
        stepped and restarted with it, never guided, kept or returned."""
        settings = self.resolve(settings)
        self.backbone.use_settings(settings)
        b = self.backbone
        schedule = b.schedule
        steps = settings.steps
        grid = schedule.timesteps(steps)  # the final's grid; the route walks all or a subset
        route = sampling_route(settings)
        generators = [torch.Generator("cpu").manual_seed(take.seed) for take in takes]

        # Embedded before sampling (embed_prompts): (B, L, E) target rows, row b take b's.
        target, source_embedding = embeddings.target, embeddings.source
        negative = embeddings.negative.expand(len(takes), -1, -1)

        # 3a. The initial latent: low frequencies of z₀ re-noised to t₀, high ones fresh
        # (Eq. 4); or, with init "noise", the fresh noise alone. Drawn first from each
        # take's generator, as torch.randn(shape, generator=Generator("cpu").manual_seed(seed)).
        lead = 0 if conditioning is None else conditioning.leading_frames
        shape = list(source.source_latent.shape)
        shape[2] += lead
        fresh_noise = torch.cat([torch.randn(shape, generator=generator)
                                 for generator in generators]).to(b.device)
        leading, fresh_noise = fresh_noise[:, :, :lead], fresh_noise[:, :, lead:]
        if settings.init == "noise":
            latent = fresh_noise
        else:
            noisiest = source.noisiest.to(source.source_latent.device)  # from host memory on a GPU
            start = schedule.start_latent(source.source_latent.float(), noisiest.float(),
                                          source.noisiest_timestep, grid[route.indices[0]])
            latent = lowfreq_init(start, fresh_noise, settings.lowfreq_factor)
        latent = self.keep_plate(latent, source, grid[route.indices[0]], regions)
        if lead:
            latent = torch.cat([leading, latent], dim=2)

        def kept(latent: torch.Tensor, timestep: Timestep | None) -> torch.Tensor:
            """The plate kept on the clip's frames (the leading frames as they are)."""
            if not lead:
                return self.keep_plate(latent, source, timestep, regions)
            return torch.cat([latent[:, :, :lead],
                              self.keep_plate(latent[:, :, lead:], source, timestep, regions)],
                             dim=2)

        total = len(route.indices) * len(windows)
        report("sample", 0, total)
        with self.step_cache_switch() as step_cache:
            for position, (index, span) in enumerate(zip(route.indices, route.spans, strict=True)):
                guided = position < route.guided_steps
                # The step cache only on a step without guidance (a preview's later
                # steps), one window at a time being one cache context.
                step_cache(route.step_cache and not guided and len(windows) == 1)
                is_last = position == len(route.indices) - 1
                restarts = route.restart and not is_last
                timestep = grid[index]

                # Progress counts windows: the step's last model sweep reports each one.
                def step_done(k: int, position: int = position) -> None:
                    report("sample", position * len(windows) + k + 1, total)

                # 3b. Guidance: Adam on x_t towards the source's SMM-difference pattern.
                if guided:
                    if regions is not None:
                        with torch.no_grad():
                            source_features = [self.source_features(
                                source, timestep, source_embedding, window, report, regions)
                                for window in windows]
                    elif procedure.cache_source_features:
                        source_features = source.features[timestep]
                    else:
                        with torch.no_grad():
                            source_features = [self.source_features(
                                source, timestep, source_embedding, window, report)
                                for window in windows]
                    latent = self.guide(latent, timestep, target, source_features, windows,
                                        route.learning_rates[position], settings, report, regions,
                                        procedure, route.guidance_iterations, conditioning)
                # 3c. One CFG step, t → t_next (then, with a kept plate, the blend at t_next).
                next_timestep = None if is_last else grid[index + span]
                latent = self.denoise(latent, steps, index, target, negative, settings.cfg_scale,
                                      windows, report, None if restarts else step_done, span,
                                      conditioning)
                latent = kept(latent, next_timestep)
                # 3d. Restart: re-noise t_next → t (the schedule's forward process), each
                # take with its own generator's noise; then step again.
                if restarts:
                    latent = torch.cat([schedule.restart(row, steps, index, generator)
                                        for row, generator in zip(latent.split(1), generators,
                                                                  strict=True)])
                    latent = self.denoise(latent, steps, index, target, negative, settings.cfg_scale,
                                          windows, report, step_done, conditioning=conditioning)
                    latent = kept(latent, next_timestep)
        return latent[:, :, lead:]

    @contextmanager
    def step_cache_switch(self) -> Iterator[Callable[[bool], None]]:
        """switch(on): the backbone's step cache (Backbone.step_cache) turned on or off
        for what follows; kept on across consecutive unguided steps (the cache compares
        a step with the one before), off before anything else, and off at the end."""
        stack = ExitStack()

        def switch(on: bool) -> None:
            if on and not self.backbone.step_cache_on():
                stack.enter_context(self.backbone.step_cache(True))
            elif not on:
                stack.close()

        with stack:
            yield switch

    @staticmethod
    def keep_plate(latent: torch.Tensor, source: SourceState, timestep: Timestep | None,
                   regions: EditRegions | None) -> torch.Tensor:
        """z = m_lat·z + (1 − m_lat)·z_src(t) with z_src(t) the source's inverted latent at
        `timestep` (None: the clean end, z₀); the latent itself without a kept plate."""
        if regions is None or regions.latent is None:
            return latent
        reference = source.source_latent if timestep is None else source.inverted.get(timestep)
        if reference is None:  # a timestep the inversion did not keep: nothing to follow
            return latent
        return blend_latents(latent, reference.to(latent.device), regions.latent)

    def guide(
        self, latent: torch.Tensor, timestep: int, target: torch.Tensor,
        source_features: SourceFeatures, windows: list[Window], learning_rate: float,
        settings: TransferSettings, report: Reporter, regions: EditRegions | None = None,
        procedure: Procedure | None = None, iterations: int | None = None,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        """Adam on a copy of x_t so its SMM-difference pattern matches the source's:
        x_t (B, C, F', h, w) → the guided x_t, float32, same shape; B takes with target
        (B, L, E) each minimise their own loss (their sum's gradient in row b is take b's).

        Each iteration sums the windows' losses, L = Σ_k L_k, backpropagating one
        window at a time (memory holds one window's activations), then takes one Adam
        step on the whole latent; on a gang of ranks that each backpropagated only their
        own tokens' share, `gradient_reducer` first sums the shares (every rank then
        takes the same step). On CUDA in half precision the latent stays float32,
        the model runs under autocast and the loss is scaled before backward (a fresh
        GradScaler per guided step), as the reference does. `iterations`: Adam
        iterations (default settings.guidance_iterations; a preview's route runs fewer).

        conditioning: the model runs conditioned (Backbone.conditioned), and `latent`
        starts with its leading frames, which every pass reads and Adam leaves as they
        are (only the clip's frames are guided); returned with them.
        """
        procedure = procedure or Procedure()
        iterations = settings.guidance_iterations if iterations is None else iterations
        lead = 0 if conditioning is None else conditioning.leading_frames
        leading, latent = latent[:, :, :lead].detach().float(), latent[:, :, lead:]
        x = latent.detach().float().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([x], lr=learning_rate)
        scaler = torch.amp.GradScaler(self.backbone.device.type, enabled=self._scales_loss())
        kind = "truncated" if procedure.truncate_guidance else "full"
        with (self.backbone.checkpointing(settings.gradient_checkpointing), torch.enable_grad(),
              self.backbone.conditioned(conditioning)):
            for _ in range(iterations):
                optimizer.zero_grad(set_to_none=True)
                for window, window_source in zip(windows, source_features, strict=True):
                    report.check()
                    loss = self._window_loss(window_slice(x, window), timestep, target, window_source,
                                             settings.loss, procedure, regions, window, leading)
                    scaler.scale(loss).backward()
                    self.model_passes["guide", kind] += x.shape[0]
                    self.model_passes["guide", f"{kind}_backward"] += x.shape[0]
                self.gradient_reducer(x.grad)
                scaler.step(optimizer)
                scaler.update()
        return torch.cat([leading, x.detach()], dim=2) if lead else x.detach()

    def guidance_loss(
        self, latent: torch.Tensor, timestep: int, target: torch.Tensor,
        source_features: SourceFeatures, windows: list[Window], loss_kind: str = "cosine",
        procedure: Procedure | None = None, regions: EditRegions | None = None,
    ) -> float:
        """L = Σ_k L_k at `latent`: the quantity `guide` lowers (no gradients kept)."""
        procedure = procedure or Procedure()
        with torch.no_grad():
            return sum(self._window_loss(window_slice(latent.float(), window), timestep, target,
                                         window_source, loss_kind, procedure, regions,
                                         window).item()
                       for window, window_source in zip(windows, source_features, strict=True))

    def _window_loss(
        self, x: torch.Tensor, timestep: int, target: torch.Tensor, source: list[torch.Tensor],
        loss_kind: str, procedure: Procedure, regions: EditRegions | None = None,
        window: Window | None = None, leading: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One window's loss: the pairwise SMM loss summed over the backbone's taps (the
        model truncated after them, or, for the reference procedure, run whole); with
        regions, summed over the regions too, each read from its own cells only. With a
        batch of takes x (B, C, F_k, h, w), target (B, L, E): summed over the takes,
        Σ_b L(x_b), each read from its own row. `leading`: the conditioning's leading
        frames, put before x for the pass, their features dropped."""
        if regions is not None:
            taps = self._led_taps(x, timestep, target, procedure, True, leading)
            total = x.new_zeros(())
            for tap_source, tap in zip(source, taps, strict=True):
                weights = _window_weights(regions, window, tap.shape[-2:])
                for row in tap:  # each take's own loss, summed
                    total = total + regions_loss(tap_source, masked_smm(row, weights),
                                                 present_frames(weights), loss_kind)
            return total
        taps = self._led_taps(x, timestep, target, procedure, False, leading)
        return sum(pairwise_smm_loss(tap_source, row, loss_kind)
                   for tap_source, tap in zip(source, taps, strict=True) for row in tap)

    def _led_taps(self, x: torch.Tensor, timestep: Timestep, target: torch.Tensor,
                  procedure: Procedure, spatial: bool,
                  leading: torch.Tensor | None) -> list[torch.Tensor]:
        """The backbone's taps of x, preceded by the `leading` frames when there are any
        (dropped from the taps again: frames are their dimension 1)."""
        if leading is None or not leading.shape[2]:
            return self.backbone.taps(x, timestep, target, truncated=procedure.truncate_guidance,
                                      spatial=spatial)
        lead = leading.shape[2]
        taps = self.backbone.taps(torch.cat([leading.to(x.dtype), x], dim=2), timestep, target,
                                  truncated=procedure.truncate_guidance, spatial=spatial)
        return [tap[:, lead:] for tap in taps]

    @torch.no_grad()
    def denoise(
        self, latent: torch.Tensor, steps: int, index: int, target: torch.Tensor,
        negative: torch.Tensor, cfg_scale: float, windows: list[Window], report: Reporter,
        after_window: Callable[[int], None] | None = None, span: int = 1,
        conditioning: Conditioning | None = None,
    ) -> torch.Tensor:
        """One sampler step from timestep `index` of `steps` (to `span` steps on) with
        classifier-free guidance, o = o_neg + s·(o_text − o_neg) (o: ε or velocity),
        blended over the windows.

        conditioning: the passes run conditioned, on the whole latent at once, its
        leading frames and the clip's (one window: Backbone.conditions_whole_clip), and
        all of it is stepped."""
        timestep = self.backbone.schedule.timesteps(steps)[index]
        if conditioning is not None:
            windows = [(0, latent.shape[2])]

        def cfg_output(piece: torch.Tensor, _window: int) -> torch.Tensor:
            report.check()
            self.model_passes["sample", "full"] += 2 * piece.shape[0]
            out_negative, out_text = self.backbone.predict_pair(piece, timestep, negative, target)
            return out_negative + cfg_scale * (out_text - out_negative)

        with self.backbone.conditioned(conditioning):
            output = blend_windowed(cfg_output, latent, windows, after_window=after_window)
        return self.backbone.schedule.step(output, steps, index, latent, span)

    # ------------------------------------------------------------------ model calls

    def _scales_loss(self) -> bool:
        """fp16 gradients can underflow; the reference scales the loss on CUDA."""
        return self.backbone.scales_loss()

    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
                phase: str) -> torch.Tensor:
        """The model's output (ε or velocity) for a latent piece (B, C, F', h, w) at
        `timestep` with one embedding (B, L, E): the piece's shape. Counted in
        model_passes under (phase, "full")."""
        self.model_passes[phase, "full"] += latent.shape[0]
        return self.backbone.predict(latent, timestep, embedding)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Prompts (already prefixed: TransferSettings.full_prompt) → (len(prompts), L, E)."""
        return self.backbone.embed(prompts)

    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(F, H, W, 3) uint8 → z₀ (1, C, F', h, w) (the backbone's VAE, deterministic)."""
        return self.backbone.encode(frames, frames_per_slice)

    def decode(self, latent: torch.Tensor, frames_per_slice: int, report: Reporter,
               phase: str = "decode", done: int = 0, total: int | None = None) -> np.ndarray:
        """z₀ (1, C, F', h, w) → (F, H, W, 3) uint8; reports (phase, done + slices decoded,
        total or the slice count)."""
        slices = self.backbone.decode_slices(latent, frames_per_slice)
        images = []
        for index, decode in enumerate(slices):
            report.check()
            images.append(decode())
            report(phase, done + index + 1, total or len(slices))
        return np.concatenate(images)

    # ------------------------------------------------------------------ step 5 (the upscaler's)

    @torch.no_grad()
    def video_to_video(
        self, frames: np.ndarray, size: tuple[int, int], settings: TransferSettings, seed: int,
        report: Reporter,
    ) -> np.ndarray:
        """The upscaling stage, run by the upscaler's engine: video-to-video from the first
        stage's frames (SDEdit; ZeroScope XL's documented workflow).

        (F, h, w, 3) uint8 → (F, H, W, 3) at size = (W, H):
            5a. resize the frames to W×H (bicubic) and encode them: z₀
            5b. of the `steps` sampler timesteps keep the last k = ⌊steps·upscale_strength⌋,
                re-noise z₀ to the first of them, t₀, by the schedule's forward process
                (DDIM: x = √ᾱ_t₀·z₀ + √(1 − ᾱ_t₀)·ε; ε from a CPU generator seeded with
                the edit's seed)
            5c. k CFG sampler steps with the same prompt, negative prompt and CFG scale,
                blended over temporal windows placed as the first stage's; no guidance,
                no restart
            5d. decode
        """
        b = self.backbone
        settings = self.resolve(settings)
        steps = settings.steps
        first = steps - settings.upscale_step_count()
        timesteps = b.schedule.timesteps(steps)[first:]
        windows = self.windows_for(len(frames), settings)
        slices = math.ceil(len(frames) / settings.vae_slice)
        total = 1 + len(timesteps) * len(windows) + slices
        report("upscale", 0, total)

        # 5a.
        latent = self.encode(resize_frames(frames, *size), settings.vae_slice).float()
        report("upscale", 1, total)
        # 5b.
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(latent.shape, generator=generator).to(b.device)
        latent = b.schedule.add_noise(latent, noise, timesteps[0])
        # 5c. (the prompts embedded as the first stage's: Engine.embed_prompts)
        embeddings = self.embed_prompts(settings)
        target, negative = embeddings.target, embeddings.negative
        for index in range(len(timesteps)):
            def step_done(k: int, index: int = index) -> None:
                report("upscale", 1 + index * len(windows) + k + 1, total)

            latent = self.denoise(latent, steps, first + index, target, negative, settings.cfg_scale,
                                  windows, report, step_done)
        # 5d.
        return self.decode(latent, settings.vae_slice, report, "upscale",
                            1 + len(timesteps) * len(windows), total)


def _own_gradient(gradient: torch.Tensor) -> None:
    """One process holds the whole gradient already."""


def _box(framing: Framing) -> tuple[int, int, int, int]:
    box = framing.box
    return box.left, box.top, box.right, box.bottom


def _window_weights(regions: EditRegions, window: Window, size: tuple[int, int]) -> torch.Tensor:
    """w: the guiding masks of one window's latent frames at a tap's (h, w), (R, F_k, h, w)."""
    return weights_at(window_slice(regions.guidance, window, frame_dim=1), tuple(size))


def _region_smms(features: torch.Tensor, regions: EditRegions, window: Window) -> torch.Tensor:
    """Each guiding region's masked SMM of one window's features (F_k, D, h, w): (R, F_k, D)."""
    return masked_smm(features, _window_weights(regions, window, features.shape[-2:]))


class _TakeReporter(Reporter):
    """The edit's reporter, its phases naming the takes they run when there are several
    ("sample take 2", "decode takes 1-4"); with one take, the phases as they were."""

    def __init__(self, report: Reporter, group: list[int], take_count: int) -> None:
        super().__init__(report.progress, report.cancelled)
        first, last = group[0] + 1, group[-1] + 1
        self.suffix = "" if take_count == 1 else (
            f" take {first}" if first == last else f" takes {first}-{last}")

    def __call__(self, phase: str, step: int, total: int) -> None:
        super().__call__(phase + self.suffix, step, total)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - started


