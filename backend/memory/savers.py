"""The memory savers, applied: what `--memory auto` decided for an edit, turned on in it.

    decision = planner.decide(...)          # by whoever plans (backend/memory/planner.py)
    result = engine.transfer(clip, settings, savers=decision)   # which, inside, does
        settings = with_savers(settings, decision.savers)
        with savers_applied(backbone, decision.savers):
            ...the edit...

The savers (shared/settings.py MEMORY_SAVERS). `--memory auto` takes the cheapest
combination of them that fits, by their counted costs (backend/memory/planner.py
saver_cost, docs/memory.md):

    gradient_checkpointing   the setting: guidance recomputes activations in backward,
                             one part of the pass before the taps at a time
    vae_slice_1              the setting vae_slice = 1: the VAE takes one frame at a time
    vae_tiling               the VAE decodes in overlapping spatial tiles, blended over
                             the overlap (Backbone.vae_tiling: diffusers' own tiling of
                             the backbone's VAE); the encode stays whole
    text_encoder_offload     the text encoder embeds on the CPU and never visits the GPU
                             (backend/memory/text_encoder.py; read by the engine's embed phase)
    vae_offload              the VAE lives in host memory, on the GPU only to encode and
                             to decode each slice
    sequential_offload       accelerate's cpu_offload: the denoiser's and the VAE's weights in host
                             memory, each module's brought to the GPU for its own forward

The first two are settings; vae_tiling is a switch of the VAE that acts on any device;
the offloads move modules. On a CPU the device is the host, so the offloads are
accepted and move nothing. Without any saver the text encoder lives in host memory
and visits the GPU alone, in the edit's embed phase, before the offloads here act
(backend/memory/text_encoder.py): they move the denoiser and the VAE.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from backend.backbones.base import Backbone
from shared.settings import MEMORY_SAVERS, TransferSettings

SETTING_SAVERS = {"gradient_checkpointing": {"gradient_checkpointing": True},
                  "vae_slice_1": {"vae_slice": 1}}
OFFLOAD_SAVERS = ("vae_offload", "sequential_offload")

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
def savers_applied(backbone: Backbone, savers: tuple[str, ...], *,
                   host: torch.device | None = None, move: Move | None = None,
                   active: bool | None = None) -> Iterator[list[str]]:
    """While the block runs, the savers among `savers` that act on the networks act on
    `backbone`'s (vae_tiling and the offloads); after it every network is back where it
    was, whole frames again, and every hook is gone.

    Yields the ones installed. vae_tiling acts on any device; the offloads when the
    model runs on another device than the host (`active`, default: the backbone's device
    is not the host's); on a CPU they are accepted and install nothing.
    `move(module, device)` moves a network (default module.to; tests pass a recorder)."""
    check_saver_names(savers)
    host = host or torch.device("cpu")
    move = move or (lambda module, device: module.to(device))
    active = backbone.device.type != host.type if active is None else active
    wanted = [saver for saver in OFFLOAD_SAVERS if saver in savers] if active else []
    tiling = "vae_tiling" in savers
    with _offloads(backbone, wanted, host, move), \
            _decoded_in_tiles(backbone) if tiling else contextlib.nullcontext():
        yield (["vae_tiling"] if tiling else []) + wanted


@contextlib.contextmanager
def _decoded_in_tiles(backbone: Backbone) -> Iterator[None]:
    """Each decode slice runs in the VAE's tiles (Backbone.vae_tiling) while the block
    runs; the encode stays whole (the decode is the VAE's peak: docs/memory.md). Wraps
    whatever decode_slices is now (the VAE offload's, or the backbone's own)."""
    own = backbone.__dict__.get("decode_slices")  # the VAE offload's, or none
    inner = backbone.decode_slices

    def in_tiles(call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with backbone.vae_tiling():
                return call()
        return run

    def decode_slices(latent: torch.Tensor, frames_per_slice: int) -> list:
        return [in_tiles(one) for one in inner(latent, frames_per_slice)]

    backbone.decode_slices = decode_slices  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            backbone.__dict__.pop("decode_slices", None)
        else:
            backbone.decode_slices = own  # type: ignore[method-assign]


@contextlib.contextmanager
def _offloads(backbone: Backbone, wanted: list[str], host: torch.device, move: Move) -> Iterator[None]:
    """The offloads in `wanted` on the backbone's networks while the block runs."""
    if not wanted:
        yield
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

            for module in (denoiser, vae):  # the text encoder embedded before (the embed phase)
                move(module, host)
                cpu_offload(module, execution_device=device)
        else:
            if "vae_offload" in wanted:
                move(vae, host)
                original_decode_slices = backbone.decode_slices

                def decode_slices(latent: torch.Tensor, frames_per_slice: int) -> list:
                    return [visiting(vae, one) for one in original_decode_slices(latent, frames_per_slice)]

                patched["encode"] = visiting(vae, backbone.encode)
                patched["decode_slices"] = decode_slices
        for name, value in patched.items():
            setattr(backbone, name, value)
        yield
    finally:
        for name in patched:
            backbone.__dict__.pop(name, None)
        if "sequential_offload" in wanted:
            from accelerate.hooks import remove_hook_from_module

            for network in (denoiser, vae):
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
    """What `--memory auto` chose for one edit: the savers (the cheapest combination that
    fits, in MEMORY_SAVERS' order), the peak the plan predicts with them, and the GPU
    memory it was fitted into."""

    savers: tuple[str, ...]
    predicted_peak_bytes: int
    budget_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's `memory` record."""
        return {"savers": list(self.savers), "predicted_peak_bytes": self.predicted_peak_bytes,
                "budget_bytes": self.budget_bytes}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> MemoryDecision:
        """The decision back from its record (as a Ray worker receives it)."""
        return cls(tuple(record["savers"]), int(record["predicted_peak_bytes"]),
                   int(record["budget_bytes"]))


def out_of_memory_sentence(decision: MemoryDecision | None, base: str) -> str:
    """The out-of-memory sentence with the plan's figure, so the estimate can be corrected."""
    if decision is None:
        return base
    savers = ", ".join(decision.savers) or "no saver"
    return (base.removesuffix(".") + f" (the memory plan predicted {readable(decision.predicted_peak_bytes)} "
            f"with {savers} on, against {readable(decision.budget_bytes)}; please report both "
            f"figures so the plan can be corrected).")


def readable(nbytes: int) -> str:
    """11811160064 → "11.0 GiB"; under a GiB in MiB."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
