"""The memory plan of an edit: the peak GPU memory of each phase, before anything is loaded.

    plan = plan_edit(engine_phases, "zeroscope-random", frames=24, size=(576, 320),
                     device="cuda")   # engine_phases: backend/edit.py, the Engine's phases
    plan.peak_bytes          # the highest phase
    plan.phases              # {"weights": …, "embed": …, "encode": …, "invert": …, …}
    plan.savers              # each saver alone: the peak it reaches and its cost
    plan.combinations        # every combination of savers: its peak and cost, cheapest first

The backbone is built on the meta device (no weights) and given fake storage
(backend/memory/counter.py); then the edit's own calls (the engine's public phases,
backend/memory/phases.py EditPhases, made by the `phases_of` its caller hands in) run
on it, once per phase, while LiveBytes counts what is alive:

    embed      EditPhases.embed of the source, target and negative prompts
    encode     EditPhases.encode of the whole clip (the VAE, `vae_slice` frames at a time)
    invert     EditPhases.invert over the whole clip, its model calls windowed (one
               window's model pass is run; later calls reuse its output's shape, the
               memory of every call being the same)
    features   EditPhases.source_features of the first window at each guided timestep
    guide      EditPhases.guide, one Adam iteration over the first window (forward,
               truncated at the taps, and backward; each window's backward frees its
               activations before the next, so one window is the peak)
    cfg        EditPhases.denoise: one sampling step with both prompts, first window
    decode     the backbone's first decode slice (the largest)

With a batch of B takes (`batch=B`, Engine.transfer_takes), the B target embeddings stay
alive and guide and cfg run on a (B, C, F', h, w) latent; `MemoryPlanner.largest_batch`
finds the largest B that fits a GPU's budget, and the takes run in batches of it.

With regions (`regions=K`, `_measure_regions`), EditPhases.edit_regions runs too:

    regions    prepare_regions over the edit's frames, one frame of K masks at a time at
               the source's size (what the engine reads), to the plate m (kept as whole
               counts) and the masks at latent size
    features   also the K regions' masked SMMs of every window (computed at each guided
               step from the inverted latents)
    guide      with the regions' loss (spatial taps, masked SMM of each region)
    cfg        also the blend with the source's latent outside the region (EditPhases.keep_plate)

The plate lives in host memory (only the composite reads it): a CUDA plan counts it
in `host_bytes`, not on the GPU; a CPU plan, where host and device are one, in the phases.

Everything the engine keeps between phases (embeddings, the source latent, the inverted
latents of every sampling step, the source features) stays alive, so a long clip's
growth beyond one window is counted. On a GPU the inverted latents are kept in host
memory (Backbone.to_host, each as the inversion reaches it): a CUDA plan counts them
in `host_bytes["inverted"]`, not in the phases; so are the pixels Wan's VAE gathers
there as it decodes (Backbone.host_buffer), in `host_bytes["decode"]`. Each network's
weights count in every phase it is resident. On a GPU the text encoder never shares it with the denoiser
(backend/memory/text_encoder.py): the embed phase is the encoder alone (its weights and
its activations; the denoiser and the VAE are in host memory then), and no other phase
counts it. The savers move the networks further:

    gradient_checkpointing   guide re-measured with the backbone's checkpointing on
    vae_slice_1              encode and decode re-measured one frame per slice
    vae_tiling               decode re-measured with the VAE's tiling, on two short
                             latents, extended in a straight line to the edit's length
                             (`_measure_tiled`); with vae_slice_1 too, the smaller of the
                             two savers' figures (a bound: each only shrinks the VAE's pass)
    text_encoder_offload     the text encoder embeds on the CPU: the embed phase is the
                             denoiser's and the VAE's weights and the embeddings
    vae_offload              the VAE on the GPU only while encoding and decoding
    text_encoder_fp8         the encoder's cast layers at 1 byte a parameter while it
                             embeds, and its largest cast layer in the compute dtype
    denoiser_fp8             the same for the denoiser; in guide also the compute-dtype
                             weights autograd keeps: two blocks' with checkpointing, all
                             of them without (a bound)
    group_offload            the denoiser on the GPU only while it runs, and then only its
                             weights outside the blocks and two blocks (one computing, the
                             next arriving); in guide all of them (autograd keeps what it
                             used for backward, a bound)

Each figure is measured once, each re-measure as what its phase adds to what was alive
when the phase first ran; a combination of savers is then arithmetic on those figures
(`_plan`: each phase takes the figure its savers give it, less the networks they take
off the GPU), so pricing all 63 combinations costs nothing beyond the figures. Each
saver's cost is counted (`saver_cost`: recomputed FE, bytes moved, what it does to the
output) and `--memory auto` takes the cheapest combination that fits (`choose_savers`).

A plan for CUDA runs on fake CPU tensors with CUDA's autocast rules (CudaAutocast) in
place of the backbone's torch.autocast("cuda"), and the allocator's 512-byte blocks.

While it plans, Tensor.numpy and the `checkpoint` name of backend/backbones/base.py
(which every backbone's `checkpointed_blocks` calls) are swapped for the planner's (_no_numpy,
_recompute_as_on_cuda); the swaps act only in the planning thread (PyTorch's modes are
per thread too), so a server can plan a job on its main thread while its job thread
runs a real edit. The backbone is the plan's own: a meta copy of a loaded one
(Backbone.meta_copy), or a model by name built on meta (the backbone's meta_shell).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import backend.backbones.base as backbones_base
from backend.backbones.base import Backbone
from backend.backbones.registry import backbone_to_plan, plannable_models
from backend.errors import ModelNotFoundError, TooBigForGpuError
from backend.memory.counter import (
    CUDA_BLOCK_BYTES,
    CudaAutocast,
    LiveBytes,
    fake_world,
    measure,
    rounded,
)
from backend.memory.cpu_terms import CpuConvolutionScratch, host_frames
from backend.memory.phases import EditPhases, PhasesOf
from backend.memory.savers import MemoryDecision, cast_bytes, group_bytes, readable
from backend.results import Reporter
from backend.video import frames_to_edit
from shared.settings import MEMORY_SAVERS, TransferSettings

log = logging.getLogger("understudy.memory")

PHASES = ("weights", "embed", "encode", "invert", "features", "guide", "cfg", "decode")
SAVERS = MEMORY_SAVERS  # shared/settings.py: the names (their costs: saver_cost)
# Settings that change no memory figure: left out of the plan cache's key.
NOT_PLANNED = ("prompt", "source_prompt", "negative_prompt", "prompt_prefix", "seed", "lr_start",
               "lr_end", "cfg_scale", "loss", "init", "restart", "memory", "output_frames",
               "upscale_strength", "frame_limit", "num_frames", "start")  # frames: keyed apart


@dataclass
class MemoryPlan:
    """Predicted peak bytes per phase (each includes the weights resident then), the
    weights per module, each saver with the peak it reaches alone and its cost, and
    every combination of savers with its peak and cost, cheapest first (cost_key)."""

    model: str
    device: str
    dtype: str
    frames: int
    size: tuple[int, int]
    windows: int
    phases: dict[str, int]
    modules: dict[str, int]
    savers: list[dict[str, Any]] = field(default_factory=list)
    combinations: list[dict[str, Any]] = field(default_factory=list)
    regions: int = 0
    batch: int = 1  # takes sampled together (Engine.transfer_takes)
    # What a GPU edit holds in host memory: region work (`_measure_regions`), the
    # inverted latents and the decode's pixels (`_host_memory_counted`).
    host_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "phases": dict(self.phases), "savers": list(self.savers),
                "combinations": list(self.combinations), "modules": dict(self.modules),
                "model": self.model, "device": self.device,
                "dtype": self.dtype, "frames": self.frames, "size": list(self.size),
                "windows": self.windows, "regions": self.regions, "batch": self.batch,
                "host_bytes": dict(self.host_bytes)}


def plan_edit(phases_of: PhasesOf, model: str | Backbone, frames: int | None = None,
              size: tuple[int, int] | None = None,
              device: str = "cuda", dtype: str | None = None,
              settings: TransferSettings | None = None,
              source_size: tuple[int, int] | None = None, regions: int = 0,
              host_terms: bool = True, batch: int = 1) -> MemoryPlan:
    """The memory plan of editing `frames` frames (default: the model's window) at `size` =
    (width, height) (default: the model's; or, given a clip's `source_size`, the size its
    framing gives the model) with `model` on `device` (present or not) in `dtype`
    (default: the backbone's for that device). `model` is a name (plannable_models()) or a loaded
    backbone, whose architecture is planned in its own dtype (`dtype` is not read).
    `regions`: the edit's region count (masks of the clip's `source_size`, else `size`).
    A CPU plan adds the memory no tensor holds (backend/memory/cpu_terms.py) unless
    `host_terms` is False: tensors only, to set against a counter of tensors.
    `batch`: how many takes sample together (Engine.transfer_takes): their target
    embeddings are kept, and guide and cfg run on a (batch, C, F', h, w) latent; the
    inversion, the features and each take's decode are the single edit's.

    phases_of(backbone): the edit's phases on a backbone (backend/memory/phases.py; the
    engine's, backend/edit.py engine_phases), run on the plan's own fake backbone."""
    torch_device = torch.device(device)
    settings = settings or TransferSettings(prompt="a plan", source_prompt="a plan")
    shell = shell_backbone(model, torch_device, dtype) if isinstance(model, str) else model.meta_copy()
    model = model if isinstance(model, str) else model.model_id
    engine = phases_of(shell)
    resolved = engine.resolve(settings)
    frames = frames or resolved.window_frames
    engine.check_window_count(shell.model_frames(frames), resolved)
    if size is None:
        size = (engine.framing_for(resolved, source_size).model_size if source_size
                else (resolved.width, resolved.height))
    gpu = torch_device.type == "cuda"
    box = _region_box(engine, resolved, source_size, size) if regions else None
    cpu_terms = host_terms and not gpu
    with fake_world(CUDA_BLOCK_BYTES if gpu else 1) as (_fake, tracker), _no_numpy(), \
            CpuConvolutionScratch(tracker) if cpu_terms else contextlib.nullcontext(), \
            _recompute_as_on_cuda(shell.dtype if gpu else None), \
            warnings.catch_warnings():
        # The planned clip is a read-only broadcast view; torch warns on wrapping it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        modules = _materialise(shell, tracker)
        host: dict[str, int] = {}  # what the engine keeps in host memory (Backbone.to_host)
        if gpu:
            _as_on_cuda(shell)
            _host_memory_counted(shell, tracker, host)
        # The framed size can be under the settings' least side (a wide clip 64 px high
        # under fit): set as the engine's framing sets it, without checking it again.
        resolved = _unchecked(engine.resolve(settings), width=size[0], height=size[1])
        to_plan = None if not regions else _RegionsToPlan(regions, source_size or size, box, gpu)
        measured, kept, bases = _measure_phases(engine, resolved, frames, size, tracker,
                                                sum(modules.values()), to_plan, batch)
        # The savers' re-measures below decode again (tiled: short clips): the host
        # memory reported is the edit's own, at the clip's length, as it stands now.
        host_of_edit = dict(host)
        saving = _unchecked(resolved, gradient_checkpointing=True, vae_slice=1)
        all_windows = engine.windows_for(shell.model_frames(frames), resolved)
        with_savers = _measure_guide_decode(engine, saving, kept, tracker, ("encode", "guide", "decode"),
                                            all_windows, bases)
        # how many decode slices (VAE calls) each slicing makes: the VAE offload's visits
        slices = {frames_per_slice: len(shell.decode_slices(kept.source_latent, frames_per_slice))
                  for frames_per_slice in (resolved.vae_slice, 1)}
        with shell.vae_tiling():  # the decode only: the saver leaves the encode whole
            tiled = {"encode": measured["encode"],
                     "decode": _measure_tiled(engine, resolved, kept, tracker, bases)}
    if cpu_terms:
        measured, with_savers, tiled = host_frames(shell.model_frames(frames), size, measured,
                                                   with_savers, tiled)
    # Tiles of one frame a slice hold no more than either saver alone (each only shrinks
    # the VAE's pass): the smaller of the two, a bound, saves a third tiled measure.
    both = {"encode": with_savers["encode"], "decode": min(tiled["decode"], with_savers["decode"])}
    vae_figures = {(False, False): measured, (True, False): with_savers, (False, True): tiled,
                   (True, True): both}  # by (vae_slice_1, vae_tiling)
    plan = _plan(model, torch_device, shell, frames, size, len(all_windows), measured, with_savers,
                 vae_figures, modules, kept.embedding_bytes,
                 _counts(shell, resolved, frames, len(all_windows), modules, slices))
    plan.regions, plan.host_bytes, plan.batch = regions, {**kept.host_bytes, **host_of_edit}, batch
    return plan


# --------------------------------------------------------------------------- the backbone shell


def shell_backbone(model: str, device: torch.device, dtype: str | None) -> Backbone:
    """The backbone of `model` (a name its registry entry plans, BackboneEntry.shell)
    built on the meta device in the dtype it would run in on `device`."""
    entry = backbone_to_plan(model)
    if entry is None:
        raise ModelNotFoundError(
            f"The memory plan knows the architectures of {', '.join(plannable_models())}, not "
            f"{model!r}; plan the one with the same architecture.")
    return entry.shell(model, device, dtype)


def _unchecked(settings: TransferSettings, **changes: Any) -> TransferSettings:
    """A copy of the settings with `changes`, not validated again (see plan_edit)."""
    import copy

    changed = copy.copy(settings)
    for name, value in changes.items():
        setattr(changed, name, value)
    return changed


def _materialise(backbone: Backbone, tracker: LiveBytes) -> dict[str, int]:
    """Give each network fake storage; returns its weight bytes by role. A weight two
    modules share (UMT5's token embedding, `shared` and `encoder.embed_tokens`) stays
    one weight, as loaded: to_empty alone would give each module a copy."""
    roles = ("denoiser", "vae", "text_encoder")
    sizes = {}
    for role, module in zip(roles, backbone.modules(), strict=True):
        before = tracker.current
        owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        for owner in module.modules():
            for name, parameter in owner.named_parameters(recurse=False):
                owners.setdefault(id(parameter), []).append((owner, name))
        module.to_empty(device="cpu")
        for (first, name), *others in owners.values():
            for owner, other_name in others:
                setattr(owner, other_name, getattr(first, name))
        tracker.track_module(module)
        sizes[role] = tracker.current - before
    return sizes


def _as_on_cuda(backbone: Backbone) -> None:
    """The backbone runs on fake CPU tensors as it would on CUDA: under CUDA's autocast
    rules, the float32 latent handed in as it is, and no loss scaling (a scalar's worth)."""
    backbone.precision = lambda: CudaAutocast(backbone.dtype)  # type: ignore[method-assign]
    backbone.model_input = lambda latent: latent  # type: ignore[method-assign]
    backbone.scales_loss = lambda: False  # type: ignore[method-assign]


def _host_memory_counted(backbone: Backbone, tracker: LiveBytes, host: dict[str, int]) -> None:
    """What the engine puts in host memory leaves the GPU's count for `host`:
    `host["inverted"]`, each inverted latent (Backbone.to_host, as the inversion reaches
    it: a fresh tensor of the same shape stands for the host copy; the GPU one lives on
    while the engine holds it, as on a GPU), and `host["decode"]`, the most the buffers a
    decode gathers its pixels in (Backbone.host_buffer) hold at once. Both uncounted on
    the GPU from the start."""
    def to_host(tensor: torch.Tensor) -> torch.Tensor:
        copy = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        tracker.untrack(copy)
        host["inverted"] = host.get("inverted", 0) + copy.untyped_storage().nbytes()
        return copy

    buffers = LiveBytes()  # the host buffers alive (counted until freed), and their peak

    def host_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        tracker.untrack(buffer)
        buffers.track(buffer)
        host["decode"] = buffers.peak
        return buffer

    backbone.to_host = to_host  # type: ignore[method-assign]
    backbone.host_buffer = host_buffer  # type: ignore[method-assign]


_PLANNING = threading.local()  # .autocast_dtype, .numpy: what this thread's plan swaps in
_SWAP_LOCK = threading.Lock()
_SWAPS: dict[tuple[int, str], list[Any]] = {}  # (id(owner), name) → [planners using it, original]


@contextlib.contextmanager
def _swapped(owner: Any, name: str, planners: Callable[[Any], Any]) -> Iterator[None]:
    """owner.name replaced by planners(original) while any thread plans (installed
    once, however many threads plan; the original back when the last one ends). The
    replacement acts as the planner's in a planning thread, as the original elsewhere."""
    key = (id(owner), name)
    with _SWAP_LOCK:
        if key not in _SWAPS:
            original = getattr(owner, name)
            _SWAPS[key] = [0, original]
            setattr(owner, name, planners(original))
        _SWAPS[key][0] += 1
    try:
        yield
    finally:
        with _SWAP_LOCK:
            _SWAPS[key][0] -= 1
            if _SWAPS[key][0] == 0:
                setattr(owner, name, _SWAPS.pop(key)[1])


def _planners_numpy(original: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    def numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
        if not getattr(_PLANNING, "numpy", False):
            return original(self, *args, **kwargs)
        dtype = np.dtype(str(self.dtype).removeprefix("torch."))
        return np.broadcast_to(np.zeros((), dtype), tuple(self.shape))
    return numpy


def _planners_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    def checkpoint(*args: Any, **kwargs: Any) -> Any:
        dtype = getattr(_PLANNING, "autocast_dtype", None)
        if dtype is not None:
            kwargs["context_fn"] = lambda: (contextlib.nullcontext(), CudaAutocast(dtype))
        return original(*args, **kwargs)
    return checkpoint


@contextlib.contextmanager
def _recompute_as_on_cuda(dtype: torch.dtype | None) -> Iterator[None]:
    """Gradient checkpointing recomputes during backward, outside the backbone's
    precision(): checkpoint restores torch.autocast there by itself, CudaAutocast it must
    be given (context_fn) in the backbones' checkpoint calls: the `checkpoint` that
    backend/backbones/base.py's `checkpointed_blocks` calls (this thread's only)."""
    _PLANNING.autocast_dtype = dtype
    try:
        with _swapped(backbones_base, "checkpoint", _planners_checkpoint):
            yield
    finally:
        _PLANNING.autocast_dtype = None


@contextlib.contextmanager
def _no_numpy() -> Iterator[None]:
    """Fake tensors have no data: .numpy() gives zeros of the shape (a broadcast view, no
    memory), in this thread only."""
    _PLANNING.numpy = True
    try:
        with _swapped(torch.Tensor, "numpy", _planners_numpy):
            yield
    finally:
        _PLANNING.numpy = False


# --------------------------------------------------------------------------- the phases


@dataclass
class _Kept:
    """What the engine keeps alive between phases (so later phases count it)."""

    clip: np.ndarray
    embeddings: list[torch.Tensor]  # source, target (one row per take), negative
    source_latent: torch.Tensor
    embedding_bytes: int = 0  # what the embeddings hold, all three
    state: Any = None
    guided: list = field(default_factory=list)
    regions: Any = None  # EditRegions (its latent-size masks; the plate on a CPU only)
    region_features: list = field(default_factory=list)  # per window, per tap: (K, F_k, D)
    host_bytes: dict[str, int] = field(default_factory=dict)
    conditioning: Any = None  # the backbone's Conditioning (Wan VACE's context), or None


def _measure_phases(engine: EditPhases, settings: TransferSettings, frames: int, size: tuple[int, int],
                    tracker: LiveBytes, weights: int,
                    to_plan: _RegionsToPlan | None = None,
                    batch: int = 1) -> tuple[dict[str, int], _Kept, dict[str, int]]:
    """Peak live bytes of each phase, run through the engine's calls in its order, and
    the bytes alive as each phase began (its base: a saver's re-measure adds to it)."""
    b = engine.backbone
    b.use_settings(settings)
    report = Reporter(None, None)
    windows = engine.windows_for(b.model_frames(frames), settings)
    first = windows[:1]
    peaks: dict[str, int] = {"weights": weights}
    bases: dict[str, int] = {}

    def phase(name: str, run: Any) -> Any:
        bases[name] = tracker.current
        peak, result = measure(run, tracker)
        peaks[name] = peak
        return result

    region_peaks, regions, host_bytes = _measure_regions(engine, settings, frames, to_plan, tracker)
    peaks.update(region_peaks)
    prompts = [settings.full_prompt(settings.source_prompt), settings.full_prompt(settings.prompt),
               settings.negative_prompt]

    def embed() -> list[torch.Tensor]:
        """The source, the takes' targets (one prompt at a time, as the engine), the negative."""
        source, target, negative = (engine.embed([p]) for p in prompts)
        return [source, torch.cat([target] * batch) if batch > 1 else target, negative]

    before_embed = tracker.current
    embeddings = phase("embed", embed)
    embedding_bytes = tracker.current - before_embed
    source_embedding = embeddings[0]
    clip = np.broadcast_to(np.zeros((), np.uint8), (b.model_frames(frames), size[1], size[0], 3))
    source_latent = phase("encode", lambda: engine.encode(clip, settings.vae_slice))
    kept = _Kept(clip, embeddings, source_latent, embedding_bytes, regions=regions,
                 host_bytes=host_bytes)

    steps = settings.steps
    sampling = b.schedule.timesteps(steps)
    kept.guided = sampling[: settings.guided_step_count()]
    outputs: list[torch.Tensor] = []

    def window_output(piece: torch.Tensor, timestep: Any) -> torch.Tensor:
        """The model runs on the first window; the others' outputs are alike."""
        if not outputs:
            outputs.append(engine.predict(piece, timestep, source_embedding, "invert"))
            return outputs[0]
        return torch.empty_like(outputs[0])

    with torch.no_grad():
        kept.state = phase("invert", lambda: engine.invert(source_latent, source_embedding, windows,
                                                           settings, report, window_output))
    outputs.clear()

    def features() -> None:
        """One truncated pass; the other guided steps' and windows' features are alike."""
        if not kept.guided:
            return
        with torch.no_grad():
            one = engine.source_features(kept.state, kept.guided[0], source_embedding, first[0], report)
            for timestep in kept.guided:
                kept.state.features[timestep] = [[t.clone() for t in one] for _ in windows]
            if kept.regions is not None:  # the sampler's, at each guided step, every window
                one = engine.source_features(kept.state, kept.guided[0], source_embedding, first[0],
                                             report, kept.regions)
                kept.region_features = [[t.clone() for t in one] for _ in windows]

    phase("features", features)
    # The backbone's conditioning (Wan VACE: its context, built with VAE encodes, the
    # encode phase's kind of work), after the inversion and with as many references as
    # it takes (the plan is the bound for any edit); held from here on, as the engine
    # holds it.
    references = [np.zeros((size[1], size[0], 3), np.uint8)] * b.facts.max_references
    condition_peak, kept.conditioning = measure(lambda: b.conditioning(
        clip, None, references, settings.reference_strength), tracker)
    peaks["encode"] = max(peaks["encode"], condition_peak)
    peaks.update(_measure_guide_decode(engine, settings, kept, tracker, ("guide", "cfg", "decode"),
                                       windows, bases))
    return peaks, kept, bases


def _measure_guide_decode(engine: EditPhases, settings: TransferSettings, kept: _Kept, tracker: LiveBytes,
                          names: tuple[str, ...], windows: list,
                          bases: dict[str, int]) -> dict[str, int]:
    """guide (EditPhases.guide, one Adam iteration, first window), cfg (EditPhases.denoise of
    the first window's frames), decode (the first, largest decode slice); encode too
    when named (the savers' re-measure). Each is what the phase adds to the bytes alive
    when it starts, on the phase's base (`bases`, recorded where it is first measured)."""
    b = engine.backbone
    report = Reporter(None, None)
    target, negative = kept.embeddings[1], kept.embeddings[2]
    batch = target.shape[0]  # the takes sampled together
    negative = negative.expand(batch, -1, -1)
    batched = (batch, *kept.source_latent.shape[1:])
    conditioning = kept.conditioning
    lead = 0 if conditioning is None else conditioning.leading_frames
    if lead:  # the references' latent frames come before the clip's in every pass
        batched = (*batched[:2], batched[2] + lead, *batched[3:])
    first = windows[:1]
    peaks: dict[str, int] = {}

    def on_base(name: str, run: Callable[[], Any]) -> None:
        before = tracker.current
        bases.setdefault(name, before)
        peak, _ = measure(run, tracker)
        peaks[name] = peak - before + bases[name]

    if "encode" in names:
        on_base("encode", lambda: engine.encode(kept.clip, settings.vae_slice))
    if "guide" in names and kept.guided:
        timestep = kept.guided[0]
        latent = kept.source_latent.new_empty(batched, dtype=torch.float32)
        one_iteration = _unchecked(settings, guidance_iterations=1)
        source = kept.region_features[:1] if kept.regions else kept.state.features[timestep][:1]
        on_base("guide", lambda: engine.guide(
            latent, timestep, target, source, first, 0.001, one_iteration, report, kept.regions,
            conditioning=conditioning))
    if "cfg" in names:
        latent = kept.source_latent.new_empty(batched, dtype=torch.float32)
        start, end = first[0]
        piece = latent if conditioning is not None else latent.narrow(2, start, end - start)
        on_base("cfg", lambda: engine.denoise(
            piece, settings.steps, 0, target, negative, settings.cfg_scale, [(0, end - start)],
            report, conditioning=conditioning))
        if kept.regions is not None:  # then the whole latent's blend with the source's
            blend, _ = measure(lambda: engine.keep_plate(latent[:, :, lead:], kept.state, None,
                                                         kept.regions), tracker)
            peaks["cfg"] = max(peaks["cfg"], blend)
    if "decode" in names:
        latent = torch.empty_like(kept.source_latent, dtype=torch.float32)
        with torch.no_grad():
            on_base("decode", lambda: b.decode_slices(latent, settings.vae_slice)[0]())
    return peaks


TILED_SHORT_CLIPS = (2, 3)
"""How many VAE slices each of `_measure_tiled`'s two short clips holds."""


def _measure_tiled(engine: EditPhases, settings: TransferSettings, kept: _Kept, tracker: LiveBytes,
                   bases: dict[str, int]) -> int:
    """The decode with the VAE tiled (run inside Backbone.vae_tiling, as the vae_tiling
    saver runs each decode slice), on the decode's base.

    A tiled pass runs the VAE once per tile (15 tiles a frame for Wan at 832x480), so
    the edit's whole latent is not decoded tiled: two short ones are, of two and three
    VAE slices' frames (the causal Wan VAE: 9 and 13 frames, three and four latent
    frames), and what the decode adds is extended in a straight line to the clip's F
    frames. Wan's decode gathers its pixels in host memory (backend/backbones/wan_vae.py)
    and its causal cache is full from the third decoder call of a tile on, so both
    clips hold the largest call and little grows but the host-side blend's small
    temporaries; the slope the two measure bounds it. What one tile's pass holds is the
    same at any length (ZeroScope decodes one slice, so its slope is nil)."""
    b = engine.backbone
    frames = kept.clip.shape[0]  # the model's frames
    slice_frames = max(settings.vae_slice, 2)
    lengths = sorted({min(frames, b.model_frames(slice_frames * k)) for k in TILED_SHORT_CLIPS})
    added = _tiled_decodes(b, settings, kept, tracker, lengths)
    grown = added[-1]
    if len(lengths) > 1 and lengths[-1] != frames:
        slope = max(0.0, (added[1] - added[0]) / (lengths[1] - lengths[0]))
        grown = added[0] + int(np.ceil(slope * (frames - lengths[0])))
    return bases["decode"] + grown


def _tiled_decodes(b: Backbone, settings: TransferSettings, kept: _Kept, tracker: LiveBytes,
                   lengths: list[int]) -> list[int]:
    """What the first decode slice adds, tiled, for a latent of each of `lengths` frames.
    The longest goes first: a tile's first calls are the same calls in a shorter latent,
    so the shorter ones replay them all (`_tiles_replayed`, sharing what it has seen)."""
    added: dict[int, int] = {}
    seen: dict[tuple, tuple[int, int, tuple[int, ...], torch.dtype]] = {}
    for length in sorted(lengths, reverse=True):
        # the short clip's latent, float32 as the edit hands it to decode
        latent = kept.source_latent.new_empty((*kept.source_latent.shape[:2], b.latent_frames(length),
                                               *kept.source_latent.shape[3:]), dtype=torch.float32)
        before = tracker.current
        with torch.no_grad(), _tiles_replayed(b.modules()[1], tracker, seen):
            peak, _ = measure(lambda latent=latent: b.decode_slices(latent, settings.vae_slice)[0](), tracker)
        added[length] = peak - before
        del latent
    return [added[length] for length in lengths]


@contextlib.contextmanager
def _tiles_replayed(vae: torch.nn.Module, tracker: LiveBytes,
                    seen: dict[tuple, tuple[int, int, tuple[int, ...], torch.dtype]]) -> Iterator[None]:
    """While the block runs, a tile like one decoded before (in `seen`: this decode's, or
    a longer latent's, whose tiles' first calls are this one's) is not run again on the
    fake tensors: each call of the VAE's decoder, keyed by its input's shape and
    its place in its tile (Wan decodes a tile one latent frame at a time, clear_cache()
    starting each tile), runs once; a later call with the same key gives an empty
    output of the shape it gave, and the peak it reached above its tile's start is
    counted again above this tile's start, and what it left in the tile's cache (Wan's
    causal convolutions keep their last frames) is held by a stand-in of as many bytes
    until the tile ends. Wan at 832x480 has 15 tiles a frame in 4 shapes (the last
    column and row are cut short), so 4 run. The memory is the same: what a tile holds
    depends on its shapes only, and the outputs kept are (fake) tensors of their shapes."""
    decoder = getattr(vae, "decoder", None)
    if decoder is None:  # a VAE of another make (a backbone from outside): run every tile
        yield
        return
    tile: dict[str, Any] = {"start": tracker.current, "calls": 0, "held": []}
    cached = hasattr(vae, "clear_cache")  # calls share a tile until the next clear_cache
    run_decoder = decoder.forward

    def starting_a_tile() -> None:
        tile["held"].clear()  # the cache stand-ins of the tile before
        tile["start"], tile["calls"] = tracker.current, 0

    def clear_cache() -> None:
        type(vae).clear_cache(vae)
        starting_a_tile()

    def forward(latent: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not cached:
            starting_a_tile()
        key = (tuple(latent.shape), tile["calls"])
        tile["calls"] += 1
        if key in seen:
            above, kept, shape, dtype = seen[key]
            tracker.peak = max(tracker.peak, tile["start"] + above)
            if kept > 0:  # what the call left in the tile's cache, held as long
                tile["held"].append(torch.empty(kept, dtype=torch.uint8))
            return latent.new_empty(shape, dtype=dtype)
        outer, before = tracker.peak, tracker.current
        tracker.reset_peak()
        out = run_decoder(latent, *args, **kwargs)
        kept = tracker.current - before - rounded(out.untyped_storage().nbytes(), tracker.block)
        seen[key] = (tracker.peak - tile["start"], kept, tuple(out.shape), out.dtype)
        tracker.peak = max(outer, tracker.peak)
        return out

    decoder.forward = forward
    if cached:
        vae.clear_cache = clear_cache
    try:
        yield
    finally:
        del decoder.forward
        vae.__dict__.pop("clear_cache", None)


# --------------------------------------------------------------------------- regions


@dataclass(frozen=True)
class _RegionsToPlan:
    """An edit's regions as the plan sees them: how many, the clip's frame size (the
    masks'), the framing's box of it, and whether the device is a GPU (then the plate
    is host memory)."""

    count: int
    source_size: tuple[int, int]
    box: tuple[int, int, int, int]
    gpu: bool


def _region_box(engine: EditPhases, settings: TransferSettings, source_size: tuple[int, int] | None,
                size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The source pixels the model sees: the framing's box of a clip of source_size, or
    the whole frame when the plan is for the model's size."""
    if source_size is None:
        return 0, 0, size[0], size[1]
    box = engine.framing_for(settings, source_size).box
    return box.left, box.top, box.right, box.bottom


def _measure_regions(engine: EditPhases, settings: TransferSettings, frames: int,
                     to_plan: _RegionsToPlan | None, tracker: LiveBytes
                     ) -> tuple[dict[str, int], Any, dict[str, int]]:
    """The "regions" phase: the engine's own preparation (EditPhases.edit_regions)
    over `frames` frames of `count` masks at the source's
    size, fed one frame at a time as the engine reads them. Returns the phase peak, the
    EditRegions (kept alive for the later phases) and the host-memory figures:

        regions   the preparation's own peak above what was alive before (one frame's
                  masks at the source's size, the plate's counts as they grow)
        plate     the plate m's counts, held until the composite

    On a GPU the preparation runs in host memory and only the latent-size masks reach
    the device: the phase is what is alive after it without the plate, which is
    dropped from what later phases count (it is not on the GPU)."""
    if to_plan is None:
        return {}, None, {}
    b = engine.backbone
    model_frames = b.model_frames(frames)
    mask_shape = (to_plan.count, to_plan.source_size[1], to_plan.source_size[0])

    def one_frame_at_a_time() -> Iterator[torch.Tensor]:
        for _ in range(frames):
            yield torch.zeros(mask_shape, dtype=torch.bool)  # a frame's K masks, as read

    before = tracker.current
    peak, regions = measure(lambda: engine.edit_regions(
        one_frame_at_a_time(), frames, to_plan.count, settings, to_plan.box,
        (settings.width, settings.height), model_frames), tracker)
    plate = 0 if regions.plate is None else rounded(
        regions.plate.counts.untyped_storage().nbytes(), tracker.block)
    host = {"regions": peak - before, "plate": plate}
    if to_plan.gpu:
        regions.plate = None
        peak = tracker.current
    return {"regions": peak}, regions, host


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class _Counts:
    """What the savers' costs and residencies are counted from: an edit's model passes and
    the bytes each saver moves or keeps (in the plan's dtype)."""

    model_frames: int
    windows: int
    decode_slices: int  # the VAE's decode calls at the edit's vae_slice
    decode_slices_one: int  # and at one frame a slice (Wan's causal VAE: one call either way)
    guided_iterations: int  # guided steps × guidance iterations, per window
    model_passes: int  # denoiser passes per window: inversion, features, guidance, sampling
    steps: int  # sampling steps
    vae_bytes: int
    denoiser_bytes: int
    denoiser_fp8_bytes: int  # cast layers at 1 byte a parameter (savers.cast_bytes)
    denoiser_largest_cast: int  # the largest cast layer in the compute dtype
    text_encoder_bytes: int
    text_encoder_fp8_bytes: int
    text_encoder_largest_cast: int
    denoiser_stays: int  # group offload's: outside every block (savers.group_bytes)
    denoiser_largest_block: int


def _counts(backbone: Backbone, settings: TransferSettings, frames: int, windows: int,
            modules: dict[str, int], slices: dict[int, int]) -> _Counts:
    denoiser, _vae, text_encoder = backbone.modules()
    guided = settings.guided_step_count()
    return _Counts(backbone.model_frames(frames), windows, slices[settings.vae_slice], slices[1],
                   guided * settings.guidance_iterations,
                   settings.inversion_steps + guided * (1 + settings.guidance_iterations)
                   + 2 * settings.steps, settings.steps, modules["vae"], modules["denoiser"],
                   *cast_bytes(denoiser), modules["text_encoder"], *cast_bytes(text_encoder),
                   *group_bytes(denoiser))


def saver_cost(saver: str, counts: _Counts, on: frozenset[str] = frozenset()) -> dict[str, Any]:
    """What one saver costs an edit, counted (docs/memory.md); `on`: the savers it is taken with.

        recomputed_fe     denoiser function evaluations run again: gradient checkpointing
                          recomputes the part of the truncated pass before the taps once
                          per guidance iteration and window, counted as a whole FE (a bound)
        bytes_moved       host ↔ GPU bytes per edit: group offload brings the denoiser's
                          weights at every model pass (CFG counts two; in float8 with
                          denoiser_fp8); the VAE offload brings the VAE to the GPU and back
                          for the encode and each decode slice (one frame a slice with
                          vae_slice_1)
        bytes_per_step    bytes_moved over the sampling steps: the offload's speed cost
        output            "identical", "tiles blended" (vae_tiling: the VAE's tiles are
                          blended over their overlap, a small change) or "fp8 weights" (the
                          fp8 savers: the output moves by float8's rounding; docs/memory.md)
        cpu_embedding     the prompts are embedded on the CPU (text_encoder_offload: seconds
                          per new prompt; none for a prompt in the embedding cache)
    """
    fe, moved, output = 0.0, 0, "identical"
    vae_calls = 1 + (counts.decode_slices_one if "vae_slice_1" in on else counts.decode_slices)  # encode, decodes
    if saver == "gradient_checkpointing":
        fe = float(counts.windows * counts.guided_iterations)
    elif saver == "vae_offload":
        moved = 2 * counts.vae_bytes * vae_calls
    elif saver == "group_offload":
        weights = counts.denoiser_fp8_bytes if "denoiser_fp8" in on else counts.denoiser_bytes
        moved = weights * counts.model_passes * counts.windows
    elif saver == "vae_tiling":
        output = "tiles blended"
    elif saver in FP8_SAVERS:
        output = "fp8 weights"
    return {"recomputed_fe": fe, "bytes_moved": moved,
            "bytes_per_step": moved // max(1, counts.steps), "output": output,
            "cpu_embedding": saver == "text_encoder_offload"}


STREAMING = ("group_offload",)
"""The savers whose bytes move at every model pass (the speed cost of offloading)."""
FP8_SAVERS = ("text_encoder_fp8", "denoiser_fp8")
"""The savers that move the output by more than a blend: float8 weights."""
EXCLUSIVE = (frozenset({"group_offload", "gradient_checkpointing"}),)
"""Savers the plan never combines. Checkpointing recomputes in backward, outside group
offloading's schedule: ZeroScope's parts (resnets, attentions) sit inside a block, so
their recompute runs no group hook and would read the block's weights after they went
back to host memory; a recomputed Wan block runs its hook, but checkpoint keeps a frozen
weight as the Parameter itself (not savers.py's `_saved_as_used` alias) and stops the
recompute early, before the hook offloads: the group stays on the GPU, out of step with
the prefetch order (docs/memory.md)."""


def cost_key(combination: dict[str, Any]) -> tuple:
    """How dear a combination of savers is, compared in this order: how many store weights
    in float8 (the output moves most), the bytes streamed at every model pass (group
    offload), the recomputed FE, whether the output changes (blended tiles), the bytes
    moved once a VAE call (the VAE offload: a fraction of a second an edit), whether the
    prompts are embedded on the CPU, and then the count of savers."""
    costs = combination["costs"]
    return (sum(saver in FP8_SAVERS for saver in costs),
            sum(cost["bytes_moved"] for saver, cost in costs.items() if saver in STREAMING),
            sum(cost["recomputed_fe"] for cost in costs.values()),
            any(cost["output"] != "identical" for cost in costs.values()),
            sum(cost["bytes_moved"] for saver, cost in costs.items() if saver not in STREAMING),
            any(cost["cpu_embedding"] for cost in costs.values()), len(combination["savers"]))


def _plan(model: str, device: torch.device, backbone: Backbone, frames: int, size: tuple[int, int],
          windows: int, measured: dict[str, int], saving: dict[str, int],
          vae_figures: dict[tuple[bool, bool], dict[str, int]], modules: dict[str, int],
          embedding_bytes: int, counts: _Counts) -> MemoryPlan:
    """Phase peaks with each module's weights counted only where it is resident, each
    saver alone with its cost, and every combination of savers, cheapest first.

    saving: guide re-measured with checkpointing; vae_figures: encode and decode by
    (vae_slice_1, vae_tiling). The embed phase runs before the offloads act
    (backend/method/engine.py transfer): on a GPU it is the text encoder alone (measured
    less the denoiser's and the VAE's weights), or with text_encoder_offload the
    denoiser's and the VAE's weights and the three embeddings. A CPU plan, where nothing
    moves, counts the networks everywhere but where a saver takes them out."""
    gpu = device.type == "cuda"
    others = modules["denoiser"] + modules["vae"]
    runs_denoiser = ("invert", "features", "guide", "cfg")

    def embed_phase(turned_on: frozenset[str]) -> int:
        if "text_encoder_offload" in turned_on:
            return others + embedding_bytes
        if not gpu:
            return measured["embed"]
        alone = measured["embed"] - others
        if "text_encoder_fp8" in turned_on:  # stored in float8, one layer in the compute dtype
            alone += (counts.text_encoder_fp8_bytes + counts.text_encoder_largest_cast
                      - counts.text_encoder_bytes)
        return alone

    def denoiser_resident(phase: str, turned_on: frozenset[str]) -> int:
        """The denoiser's weight bytes on the GPU during `phase` with the savers on."""
        full = counts.denoiser_bytes
        stored = counts.denoiser_fp8_bytes if "denoiser_fp8" in turned_on else full
        if "group_offload" in turned_on:
            if phase not in runs_denoiser:
                return 0
            if phase == "guide":  # autograd keeps every weight it used for backward (a bound)
                return full
            # the block computing and the next one arriving on the stream
            return int(stored / full * (counts.denoiser_stays + 2 * counts.denoiser_largest_block))
        if "denoiser_fp8" not in turned_on:
            return full
        if phase == "guide":  # the cast layers' compute-dtype weights autograd keeps
            return stored + (2 * counts.denoiser_largest_block
                             if "gradient_checkpointing" in turned_on else full)
        return stored + (counts.denoiser_largest_cast if phase in runs_denoiser else 0)

    def phases_with(turned_on: frozenset[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, peak in measured.items():
            if name == "embed":
                out[name] = embed_phase(turned_on)
                continue
            if name == "guide" and "gradient_checkpointing" in turned_on and "guide" in saving:
                peak = saving["guide"]
            if name in ("encode", "decode"):
                peak = vae_figures["vae_slice_1" in turned_on, "vae_tiling" in turned_on][name]
            absent = 0
            if gpu or "text_encoder_offload" in turned_on:
                absent += modules["text_encoder"]
            if name not in ("encode", "decode") and "vae_offload" in turned_on:
                absent += modules["vae"]
            if name == "weights":
                peak = sum(modules.values())
            out[name] = peak - absent - modules["denoiser"] + denoiser_resident(name, turned_on)
        return out

    phases = phases_with(frozenset())
    alone = {saver: phases_with(frozenset({saver})) for saver in SAVERS}
    savers = [{"name": saver, "peak_bytes": max(alone[saver].values()), "phases": alone[saver],
               **saver_cost(saver, counts)} for saver in SAVERS]
    combinations = []
    for count in range(1, len(SAVERS) + 1):
        for chosen in itertools.combinations(SAVERS, count):
            on = frozenset(chosen)
            if any(pair <= on for pair in EXCLUSIVE):
                continue
            peaks = phases_with(on)
            highest = max(peaks, key=peaks.__getitem__)
            combinations.append({"savers": list(chosen), "peak_bytes": peaks[highest], "peak_phase": highest,
                                 "costs": {saver: saver_cost(saver, counts, on) for saver in chosen}})
    combinations.sort(key=cost_key)
    return MemoryPlan(model=model, device=str(device), dtype=str(backbone.dtype).removeprefix("torch."),
                      frames=frames, size=size, windows=windows, phases=phases, modules=modules,
                      savers=savers, combinations=combinations)


def worth_taking(plan: MemoryPlan) -> list[dict[str, Any]]:
    """The combinations a budget can pick: cheapest first, each kept only when it brings
    the peak below every cheaper one's (and below no saver's)."""
    kept, lowest = [], plan.peak_bytes
    for combination in plan.combinations:
        if combination["peak_bytes"] < lowest:
            kept.append(combination)
            lowest = combination["peak_bytes"]
    return kept


def _cost_words(costs: list[dict[str, Any]]) -> str:
    """A combination's (or a saver's) cost in words: recomputed FE, bytes moved per edit and
    per sampling step, the output, the CPU embedding."""
    fe = sum(cost["recomputed_fe"] for cost in costs)
    moved = sum(cost["bytes_moved"] for cost in costs)
    words = [f"{fe:g} FE recomputed" if fe else "no FE",
             f"{readable(moved)} moved ({readable(sum(c['bytes_per_step'] for c in costs))} a step)"
             if moved else "nothing moved"]
    words += sorted({cost["output"] for cost in costs} - {"identical"})
    words += ["prompts embedded on the CPU"] if any(cost["cpu_embedding"] for cost in costs) else []
    return ", ".join(words)


def format_plan(plan: MemoryPlan, chosen: tuple[str, ...] | None = None) -> str:
    """The plan as a table: each phase's peak; each saver alone, its peak and its cost;
    the combinations worth taking, cheapest first (the chosen one marked *)."""
    unit, scale = ("GiB", 2**30) if plan.peak_bytes >= 2**30 else ("MiB", 2**20)
    lines = [f"Memory plan: {plan.model}, {plan.frames} frames at {plan.size[0]}x{plan.size[1]}, "
             f"{plan.windows} window(s), " + (f"{plan.regions} region(s), " if plan.regions else "")
             + f"{plan.device} {plan.dtype} (predicted, {unit})",
             f"  {'phase':<28}{'peak':>9}"]
    lines += [f"  {name:<28}{peak / scale:>9.2f}" for name, peak in plan.phases.items()]
    lines.append(f"  {'peak':<28}{plan.peak_bytes / scale:>9.2f}")
    lines.append(f"  {'each saver alone':<28}{'peak':>9}   cost")
    lines += [f"  + {saver['name']:<26}{saver['peak_bytes'] / scale:>9.2f}   {_cost_words([saver])}"
              for saver in plan.savers]
    lines.append("  combinations worth taking, cheapest first")
    for combination in worth_taking(plan):
        mark = "*" if chosen is not None and tuple(combination["savers"]) == tuple(chosen) else " "
        lines.append(f"  {mark} {', '.join(combination['savers']):<53}{combination['peak_bytes'] / scale:>7.2f}"
                     f"   {_cost_words(list(combination['costs'].values()))}")
    if plan.host_bytes and plan.device.startswith("cuda"):
        lines.append("  host memory, not on the GPU")
        lines += [f"  {name:<28}{nbytes / scale:>9.2f}" for name, nbytes in plan.host_bytes.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- --memory auto

APPLIED_SAVERS = SAVERS
"""The savers the engine turns on (backend/memory/savers.py): all of them."""


@dataclass(frozen=True)
class SaverChoice:
    """What `--memory auto` turns on for a plan and a GPU: the savers and the peak
    predicted with them."""

    savers: tuple[str, ...]
    peak_bytes: int


def choose_savers(plan: MemoryPlan, budget_bytes: int,
                  allowed: tuple[str, ...] = APPLIED_SAVERS) -> SaverChoice:
    """The cheapest combination of `allowed` savers (cost_key: the plan's combinations
    are in that order) that brings the plan's peak within `budget_bytes`; none when the
    plan fits as it is. TooBigForGpuError with one sentence when none does, naming the
    lowest it reaches."""
    if plan.peak_bytes <= budget_bytes:
        return SaverChoice((), plan.peak_bytes)
    usable = [c for c in plan.combinations if set(c["savers"]) <= set(allowed)]
    for combination in usable:
        if combination["peak_bytes"] <= budget_bytes:
            return SaverChoice(tuple(combination["savers"]), combination["peak_bytes"])
    lowest = lowest_combination(plan, allowed)
    raise TooBigForGpuError(
        f"This edit needs about {readable(lowest['peak_bytes'])} of GPU memory even with "
        f"{', '.join(lowest['savers']) or 'every saver'} on, and {readable(budget_bytes)} are free; "
        f"edit fewer frames per window (--window-frames), a smaller --width/--height, "
        f"or use a GPU with more memory.")


def lowest_combination(plan: MemoryPlan, allowed: tuple[str, ...] = APPLIED_SAVERS) -> dict[str, Any]:
    """The combination of `allowed` savers with the lowest peak (the cheapest of equals):
    {"savers", "peak_bytes"}; no saver when none lowers the plan's peak."""
    usable = [c for c in plan.combinations if set(c["savers"]) <= set(allowed)]
    lowest = min(usable, key=lambda c: c["peak_bytes"], default=None)
    if lowest is None or lowest["peak_bytes"] >= plan.peak_bytes:
        return {"savers": [], "peak_bytes": plan.peak_bytes}
    return lowest


# --------------------------------------------------------------------------- the planner


class MemoryPlanner:
    """Plans edits against one GPU's memory and keeps the plans (a plan runs the
    engine's calls on fake tensors: seconds for a tiny model, tens of seconds for a
    full one), keyed by the model, the frames, the clip's size and every setting that
    changes a figure; decides each edit's savers before it runs (`decide`, handed to
    Engine.transfer). Thread-safe: the server plans on its main thread and the job
    thread asks again (a cache hit) when the job runs.

        planner = MemoryPlanner(lambda: gpu_description("cuda", None), engine_phases)
        decision = planner.decide(backbone, settings, clip_length, (width, height))

    gpu: the GPU as it is now (gpu_description); its budget_bytes is the memory an edit
    may take (serve --assume-gpu-memory-gb, or the CUDA device's free memory plus what
    this process already holds). None: no GPU to fit, nothing is planned.
    phases_of: the edit's phases on a backbone (backend/edit.py engine_phases)."""

    def __init__(self, gpu: Callable[[], dict[str, Any] | None], phases_of: PhasesOf,
                 device: str | None = None) -> None:
        self.gpu = gpu
        self.phases_of = phases_of
        self.device = device  # the device planned for; None: the backbone's
        self._plans: dict[str, MemoryPlan] = {}
        self._lock = threading.Lock()

    def plan(self, model: Backbone | str, settings: TransferSettings, frames: int,
             frame_size: tuple[int, int] | None, device: str | None = None,
             dtype: str | None = None, regions: int = 0, batch: int = 1) -> MemoryPlan:
        """The plan of editing `frames` frames of a clip of frame_size (width, height) with
        a loaded backbone, or with a model not loaded yet (a name of plannable_models(), on `device`
        in `dtype`): the same plan either way, so the command line's check before
        loading is the engine's cache hit after.

        Planned for planned_frames(frames) frames (a bound from above: memory grows with
        the frames) at the size the framing gives the model, so clips of many lengths and
        sizes share a few plans. `regions`: how many regions (masks) the edit has;
        `batch`: how many takes sample together."""
        shell = model if isinstance(model, Backbone) else shell_backbone(
            model, torch.device(device or "cuda"), dtype)
        device = device or self.device or str(shell.device)
        settings = settings.resolved(shell.facts.defaults)
        size = (self.phases_of(shell).framing_for(settings, frame_size).model_size if frame_size
                else (settings.width, settings.height))
        frames = planned_frames(frames, settings.window_frames, settings.window_overlap)
        relevant = {name: value for name, value in settings.to_dict().items() if name not in NOT_PLANNED}
        key = json.dumps([shell.model_id, str(shell.dtype), device, frames, size, relevant,
                          regions, frame_size if regions else None, batch], sort_keys=True)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = plan_edit(self.phases_of, shell, frames, size, device, None, settings,
                                             frame_size if regions else None, regions=regions,
                                             batch=batch)
            return self._plans[key]

    def warm(self, backbone: Backbone) -> None:
        """Plan the model's own clip (its window at its native size, default settings)
        ahead of the first job, when there is a GPU to plan for (serve runs this in a
        thread at start, so the usual first submit finds its plan made)."""
        if self.gpu() is None:
            return
        settings = TransferSettings(prompt="a plan").resolved(backbone.facts.defaults)
        try:
            self.plan(backbone, settings, settings.window_frames, None)
        except Exception:  # a plan that fails here fails again, in one sentence, at submit
            log.exception("Planning the model's own clip ahead of the first job failed.")

    def decide(self, model: Backbone | str, settings: TransferSettings, clip_length: int,
               frame_size: tuple[int, int] | None, device: str | None = None,
               dtype: str | None = None, regions: int = 0, batch: int = 1,
               ) -> MemoryDecision | None:
        """The savers an edit of a clip of `clip_length` frames of frame_size with
        `regions` regions, `batch` takes sampled together, needs on this GPU; None with
        `memory` "off" or no GPU. TooBigForGpuError (one sentence) when even every saver
        leaves it too big."""
        gpu = self.gpu() if settings.memory == "auto" else None
        if gpu is None:
            return None
        frames = frames_to_edit(settings, clip_length)
        plan = self.plan(model, settings, frames, frame_size, device, dtype, regions, batch)
        choice = choose_savers(plan, gpu["budget_bytes"], MEMORY_SAVERS)
        return MemoryDecision(choice.savers, choice.peak_bytes, gpu["budget_bytes"])

    def largest_batch(self, model: Backbone | str, settings: TransferSettings, clip_length: int,
                      frame_size: tuple[int, int] | None, takes: int, device: str | None = None,
                      dtype: str | None = None, regions: int = 0) -> int:
        """How many of `takes` takes sample together on this GPU: the largest batch B ≤ takes
        whose plan fits its budget with the savers `--memory auto` may turn on
        (choose_savers), found by bisection (memory grows with B; log₂(takes) plans).
        All of them with `memory` "off" or no GPU to fit (a CPU without
        --assume-gpu-memory-gb); 1 when even one take needs every saver, so the single
        edit's own TooBigForGpuError is the one raised, by `decide`."""
        gpu = self.gpu() if settings.memory == "auto" else None
        if gpu is None or takes <= 1:
            return max(1, takes)
        frames = frames_to_edit(settings, clip_length)

        def fits(batch: int) -> bool:
            plan = self.plan(model, settings, frames, frame_size, device, dtype, regions, batch)
            try:
                choose_savers(plan, gpu["budget_bytes"], MEMORY_SAVERS)
            except TooBigForGpuError:
                return False
            return True

        low, high = 1, takes  # fits(low) is assumed (or the single edit refuses); find the top
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low


def planned_frames(frames: int, window: int, overlap: int) -> int:
    """The frame count a clip of `frames` is planned for: the next power of two up to
    one window (2, 4, 8, 16, …, window), then whole strides of windows, window + k·(window
    − overlap). Memory only grows with the frames, so the plan bounds the clip's from
    above; 24-frame ZeroScope windows give 2, 4, 8, 16, 24, 40, 56, …, 248."""
    if frames <= window:
        return min(window, 1 << max(1, (frames - 1).bit_length()))
    stride = max(1, window - overlap)
    return window + -(-(frames - window) // stride) * stride




def gibibytes(gib: float) -> int:
    """A memory size as every flag gives it, in GiB (2^30 bytes), in bytes: 10 → 10737418240."""
    return int(gib * 2**30)


def gpu_description(device: str | None, assume_gb: float | None) -> dict[str, Any] | None:
    """The GPU as the hello reports it: {"name", "total_bytes", "free_bytes", "budget_bytes",
    "assumed"}; with `assume_gb` (serve --assume-gpu-memory-gb) that many GiB (2^30
    bytes), whatever the device; on CUDA the real device's; None on a CPU."""
    if assume_gb is not None:
        total = gibibytes(assume_gb)
        return {"name": f"assumed {assume_gb:g} GiB", "total_bytes": total, "free_bytes": total,
                "budget_bytes": total, "assumed": True}
    if device is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    held = torch.cuda.memory_reserved(index)  # this process's own, reused by its edits
    return {"name": torch.cuda.get_device_name(index), "total_bytes": int(total),
            "free_bytes": int(free), "budget_bytes": int(free + held), "assumed": False}
