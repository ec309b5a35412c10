"""The memory savers, applied: `--memory auto` plans an edit and turns on what it needs.

    planner = MemoryPlanner(lambda: gpu_description("cuda", None))  # or assume_gb=16
    decision = planner.decide(backbone, settings, clip_length, (width, height))
    settings = with_savers(settings, decision.savers)
    with offloads_applied(backbone, decision.savers):
        ...the edit...

The savers, cheapest first (shared/settings.py MEMORY_SAVERS; each is taken only with
every one before it, as the plan predicts them, backend/memory/planner.py):

    gradient_checkpointing   the setting: guidance recomputes activations in backward
    vae_slice_1              the setting vae_slice = 1: the VAE takes one frame at a time
    text_encoder_offload     the text encoder lives in host memory, on the GPU only to embed
    vae_offload              the VAE lives in host memory, on the GPU only to encode and
                             to decode each slice
    sequential_offload       accelerate's cpu_offload: every network's weights in host
                             memory, each module's brought to the GPU for its own forward

The first two are settings; the offloads move modules. On a CPU the device is the host,
so the offloads are accepted and move nothing. A Wan model's text encoder already lives
in host memory on CUDA (backend/backbones/wan.py), so its plan never offers that saver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from backend.backbones.base import Backbone
from backend.memory.planner import MemoryPlan, choose_savers, plan_edit, readable, shell_backbone
from backend.method.engine import Engine
from shared.settings import MEMORY_SAVERS, TransferSettings

log = logging.getLogger("understudy.memory")

SETTING_SAVERS = {"gradient_checkpointing": {"gradient_checkpointing": True},
                  "vae_slice_1": {"vae_slice": 1}}
OFFLOAD_SAVERS = ("text_encoder_offload", "vae_offload", "sequential_offload")
# Settings that change no memory figure: left out of the plan cache's key.
NOT_PLANNED = ("prompt", "source_prompt", "negative_prompt", "prompt_prefix", "seed", "lr_start",
               "lr_end", "cfg_scale", "loss", "init", "restart", "memory", "output_frames",
               "upscale_strength", "frame_limit", "num_frames", "start")  # frames: keyed apart

Move = Callable[[torch.nn.Module, torch.device], Any]


def with_savers(settings: TransferSettings, savers: tuple[str, ...]) -> TransferSettings:
    """The settings with the setting savers among `savers` turned on."""
    changes: dict[str, Any] = {}
    for saver in savers:
        changes.update(SETTING_SAVERS.get(saver, {}))
    return dataclasses.replace(settings, **changes) if changes else settings


def check_saver_names(savers: tuple[str, ...]) -> None:
    unknown = [saver for saver in savers if saver not in MEMORY_SAVERS]
    if unknown:
        raise ValueError(f"Unknown memory saver {unknown[0]!r}; known: {', '.join(MEMORY_SAVERS)}.")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@contextlib.contextmanager
def offloads_applied(backbone: Backbone, savers: tuple[str, ...], *,
                     host: torch.device | None = None, move: Move | None = None,
                     active: bool | None = None) -> Iterator[list[str]]:
    """While the block runs, the offload savers among `savers` act on `backbone`'s
    networks; after it every network is back where it was and every hook is gone.

    Yields the offloads installed. They act when the model runs on another device than
    the host (`active`, default: the backbone's device is not the host's); on a CPU they
    are accepted and install nothing. `move(module, device)` moves a network (default
    module.to; tests pass a recorder)."""
    check_saver_names(savers)
    host = host or torch.device("cpu")
    move = move or (lambda module, device: module.to(device))
    active = backbone.device.type != host.type if active is None else active
    wanted = [saver for saver in OFFLOAD_SAVERS if saver in savers]
    if not active or not wanted:
        yield []
        return
    device = backbone.device
    denoiser, vae, text_encoder = backbone.modules()
    homes = {id(module): _device_of(module) for module in (denoiser, vae, text_encoder)}
    patched: dict[str, Any] = {}  # instance attributes set here, removed on the way out

    def visiting(module: torch.nn.Module, call: Callable[..., Any]) -> Callable[..., Any]:
        """`call`, with `module` on the GPU while it runs and in host memory after."""
        def run(*args: Any, **kwargs: Any) -> Any:
            move(module, device)
            try:
                return call(*args, **kwargs)
            finally:
                move(module, host)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return run

    try:
        if "sequential_offload" in wanted:
            from accelerate import cpu_offload

            for module in (denoiser, vae, text_encoder):
                move(module, host)
                cpu_offload(module, execution_device=device)
            if hasattr(backbone, "_text_encoder_on_device"):  # Wan's own visits: now per module
                patched["_text_encoder_on_device"] = contextlib.nullcontext
        else:
            if "text_encoder_offload" in wanted:
                move(text_encoder, host)
                patched["embed"] = visiting(text_encoder, backbone.embed)
            if "vae_offload" in wanted:
                move(vae, host)
                original_decode_slices = backbone.decode_slices

                def decode_slices(latent: torch.Tensor, frames_per_slice: int) -> list:
                    return [visiting(vae, one) for one in original_decode_slices(latent, frames_per_slice)]

                patched["encode"] = visiting(vae, backbone.encode)
                patched["decode_slices"] = decode_slices
        for name, value in patched.items():
            setattr(backbone, name, value)
        yield wanted
    finally:
        for name in patched:
            backbone.__dict__.pop(name, None)
        if "sequential_offload" in wanted:
            from accelerate.hooks import remove_hook_from_module

            for network in (denoiser, vae, text_encoder):
                remove_hook_from_module(network, recurse=True)
                for module in network.modules():  # accelerate leaves the class's forward bound
                    if module.__dict__.get("forward") == type(module).forward.__get__(module):
                        del module.forward
        for module in (denoiser, vae, text_encoder):
            move(module, homes[id(module)])
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class MemoryDecision:
    """What `--memory auto` chose for one edit: the savers (cheapest first), the peak
    the plan predicts with them, and the GPU memory it was fitted into."""

    savers: tuple[str, ...]
    predicted_peak_bytes: int
    budget_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's `memory` record."""
        return {"savers": list(self.savers), "predicted_peak_bytes": self.predicted_peak_bytes,
                "budget_bytes": self.budget_bytes}


class MemoryPlanner:
    """Plans edits against one GPU's memory and keeps the plans (a plan runs the
    engine's calls on fake tensors: seconds for a tiny model, tens of seconds for a
    full one), keyed by the model, the frames, the clip's size and every setting that
    changes a figure. Thread-safe: the server plans on its main thread and the job
    thread asks again (a cache hit) when the job runs.

    gpu: the GPU as it is now (gpu_description); its budget_bytes is the memory an edit
    may take (serve --assume-gpu-memory-gb, or the CUDA device's free memory plus what
    this process already holds). None: no GPU to fit, nothing is planned."""

    def __init__(self, gpu: Callable[[], dict[str, Any] | None], device: str | None = None) -> None:
        self.gpu = gpu
        self.device = device  # the device planned for; None: the backbone's
        self._plans: dict[str, MemoryPlan] = {}
        self._lock = threading.Lock()

    def plan(self, model: Backbone | str, settings: TransferSettings, frames: int,
             frame_size: tuple[int, int] | None, device: str | None = None,
             dtype: str | None = None, regions: int = 0) -> MemoryPlan:
        """The plan of editing `frames` frames of a clip of frame_size (width, height) with
        a loaded backbone, or with a model not loaded yet (a PLANNABLE name, on `device`
        in `dtype`): the same plan either way, so the command line's check before
        loading is the engine's cache hit after.

        Planned for planned_frames(frames) frames (a bound from above: memory grows with
        the frames) at the size the framing gives the model, so clips of many lengths and
        sizes share a few plans. `regions`: how many regions (masks) the edit has."""
        shell = model if isinstance(model, Backbone) else shell_backbone(
            model, torch.device(device or "cuda"), dtype)
        device = device or self.device or str(shell.device)
        settings = settings.resolved(shell.facts.defaults)
        size = (Engine(shell).framing_for(settings, frame_size).model_size if frame_size
                else (settings.width, settings.height))
        frames = planned_frames(frames, settings.window_frames, settings.window_overlap)
        relevant = {name: value for name, value in settings.to_dict().items() if name not in NOT_PLANNED}
        key = json.dumps([shell.model_id, str(shell.dtype), device, frames, size, relevant,
                          regions, frame_size if regions else None], sort_keys=True)
        with self._lock:
            if key not in self._plans:
                self._plans[key] = plan_edit(shell, frames, size, device, None, settings,
                                             frame_size if regions else None, regions=regions)
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
               dtype: str | None = None, regions: int = 0) -> MemoryDecision | None:
        """The savers an edit of a clip of `clip_length` frames of frame_size with
        `regions` regions needs on this GPU; None with `memory` "off" or no GPU.
        TooBigForGpuError (one sentence) when even every saver leaves it too big."""
        from backend.method.engine import frames_to_edit

        gpu = self.gpu() if settings.memory == "auto" else None
        if gpu is None:
            return None
        frames = frames_to_edit(settings, clip_length)
        plan = self.plan(model, settings, frames, frame_size, device, dtype, regions)
        choice = choose_savers(plan, gpu["budget_bytes"], MEMORY_SAVERS)
        return MemoryDecision(choice.savers, choice.peak_bytes, gpu["budget_bytes"])


def planned_frames(frames: int, window: int, overlap: int) -> int:
    """The frame count a clip of `frames` is planned for: the next power of two up to
    one window (2, 4, 8, 16, …, window), then whole strides of windows, window + k·(window
    − overlap). Memory only grows with the frames, so the plan bounds the clip's from
    above; 24-frame ZeroScope windows give 2, 4, 8, 16, 24, 40, 56, …, 248."""
    if frames <= window:
        return min(window, 1 << max(1, (frames - 1).bit_length()))
    stride = max(1, window - overlap)
    return window + -(-(frames - window) // stride) * stride


def out_of_memory_sentence(decision: MemoryDecision | None, base: str) -> str:
    """The out-of-memory sentence with the plan's figure, so the estimate can be corrected."""
    if decision is None:
        return base
    savers = ", ".join(decision.savers) or "no saver"
    return (base.removesuffix(".") + f" (the memory plan predicted {readable(decision.predicted_peak_bytes)} "
            f"with {savers} on, against {readable(decision.budget_bytes)}; please report both "
            f"figures so the plan can be corrected).")


def gpu_description(device: str | None, assume_gb: float | None) -> dict[str, Any] | None:
    """The GPU as the hello reports it: {"name", "total_bytes", "free_bytes", "budget_bytes",
    "assumed"}; with `assume_gb` (serve --assume-gpu-memory-gb) that many GB, whatever
    the device; on CUDA the real device's; None on a CPU."""
    if assume_gb is not None:
        total = int(assume_gb * 10**9)
        return {"name": f"assumed {assume_gb:g} GB", "total_bytes": total, "free_bytes": total,
                "budget_bytes": total, "assumed": True}
    if device is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    held = torch.cuda.memory_reserved(index)  # this process's own, reused by its edits
    return {"name": torch.cuda.get_device_name(index), "total_bytes": int(total),
            "free_bytes": int(free), "budget_bytes": int(free + held), "assumed": False}
