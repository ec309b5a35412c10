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
    text_encoder_fp8         the text encoder's layers stored in float8 while it embeds
                             (both read by the embed phase: backend/memory/text_encoder.py)
    vae_offload              the VAE lives in host memory, on the GPU only to encode and
                             to decode each slice
    denoiser_fp8             diffusers' layerwise casting of the denoiser: weights stored
                             in float8_e4m3fn, each layer cast to the model's dtype for
                             its own forward (the output moves by fp8's rounding)
    group_offload            diffusers' block-level group offloading of the denoiser: its
                             weights in host memory, one block at a time on the GPU (the
                             next one copied on a CUDA stream while this one computes)

The first two are settings; vae_tiling is a switch of the VAE that acts on any device;
the others act when the model runs on another device than the host: on a CPU they are
accepted and do nothing (tests turn them on with `active=True`). Without any saver the
text encoder lives in host memory and visits the GPU alone, in the edit's embed phase,
before the savers here act (backend/memory/text_encoder.py): they act on the denoiser
and the VAE.

Under backward. Both diffusers hooks change a layer's weights under its Parameter once
the layer's forward ends (group offloading points `param.data` back at the host copy;
casting stores the layer in float8 again), while autograd saved the Parameter itself for
the backward: the guided step would backpropagate through host (or float8) weights. So
while the savers act, module conversions make new Parameters (torch.__future__'s
overwrite_module_params_on_conversion: a cast layer's compute-dtype weights stay with
autograd until backward), and under group offload autograd saves a Parameter as a
detached alias of the storage it had in forward (`_saved_as_used`). Checkpointing's
recompute in backward runs outside group offloading's schedule (a ZeroScope part inside
a block runs no group hook; checkpoint keeps frozen weights as the Parameters
themselves and stops the recompute before the hook offloads), so the plan never
combines group_offload with gradient_checkpointing (planner.py EXCLUSIVE; docs/memory.md).
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
MODULE_SAVERS = ("vae_offload", "denoiser_fp8", "group_offload")
FP8 = torch.float8_e4m3fn
# Layers layerwise casting leaves in the model's dtype: diffusers' defaults (norms,
# embeddings of positions and patches, the outer projections) and T5's feed-forward
# output `wo`, whose input T5 casts to that layer's weight dtype before the cast hook runs.
CAST_SKIPS = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$", r"\.wo$")

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


# --------------------------------------------------------------------------- what they keep resident


def is_cast(name: str, module: torch.nn.Module, skips: tuple[str, ...]) -> bool:
    """Whether layerwise casting stores this layer in float8 (diffusers' own test)."""
    import re

    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    return (isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS)
            and not any(re.search(pattern, name) for pattern in skips))


def cast_bytes(network: torch.nn.Module) -> tuple[int, int]:
    """(the network's weight bytes under layerwise casting, the largest cast layer's
    bytes in the compute dtype): cast layers' own parameters at 1 byte each, the rest
    as they are. Reads sizes only (a plan's meta network will do)."""
    stored, largest = 0, 0
    skips = cast_skips(network)
    for name, module in network.named_modules():
        own = list(module.parameters(recurse=False))
        full = sum(p.numel() * p.element_size() for p in own)
        if is_cast(name, module, skips):
            stored += sum(p.numel() for p in own)
            largest = max(largest, full)
        else:
            stored += full
    return stored, largest


def group_bytes(network: torch.nn.Module) -> tuple[int, int]:
    """(the bytes block-level group offloading keeps on the GPU throughout a forward: the
    parameters outside every ModuleList/Sequential child, the largest one block's bytes):
    the groups diffusers' block-level offloading makes, one block each."""
    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    blocks = [block for child in network.children()
              if isinstance(child, torch.nn.ModuleList | torch.nn.Sequential) for block in child]
    return size(network) - sum(map(size, blocks)), max(map(size, blocks), default=0)


# --------------------------------------------------------------------------- applied


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
    wanted = [saver for saver in MODULE_SAVERS if saver in savers] if active else []
    tiling = "vae_tiling" in savers
    with _module_savers(backbone, wanted, host, move), \
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
def _module_savers(backbone: Backbone, wanted: list[str], host: torch.device,
                   move: Move) -> Iterator[None]:
    """The module savers in `wanted` on the backbone's denoiser and VAE while the block
    runs; after it each network is home, in its own dtype with its own weights, unhooked."""
    if not wanted:
        yield
        return
    device = backbone.device
    denoiser, vae, text_encoder = backbone.modules()
    homes = {id(module): _device_of(module) for module in (denoiser, vae, text_encoder)}
    patched: dict[str, Any] = {}  # instance attributes set here, removed on the way out
    originals: dict[str, torch.Tensor] | None = None
    saving: contextlib.AbstractContextManager = contextlib.nullcontext()

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

    with _overwriting_parameters():
        try:
            if "denoiser_fp8" in wanted:
                originals = _cast_to_fp8(denoiser, backbone.dtype)
            if "group_offload" in wanted:
                from diffusers.hooks import apply_group_offloading

                move(denoiser, host)
                apply_group_offloading(denoiser, onload_device=device, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=device.type == "cuda")
                saving = torch.autograd.graph.saved_tensors_hooks(_saved_as_used, _as_saved)
            if "vae_offload" in wanted:
                move(vae, host)
                original_decode_slices = backbone.decode_slices

                def decode_slices(latent: torch.Tensor, frames_per_slice: int) -> list:
                    return [visiting(vae, one) for one in original_decode_slices(latent, frames_per_slice)]

                patched["encode"] = visiting(vae, backbone.encode)
                patched["decode_slices"] = decode_slices
            for name, value in patched.items():
                setattr(backbone, name, value)
            with saving:
                yield
        finally:
            for name in patched:
                backbone.__dict__.pop(name, None)
            _remove_diffusers_hooks(denoiser)
            if originals is not None:
                _restore(denoiser, originals)
            for module in (denoiser, vae, text_encoder):
                move(module, homes[id(module)])
            if device.type == "cuda":
                torch.cuda.empty_cache()


@contextlib.contextmanager
def fp8_cast(network: torch.nn.Module, compute: torch.dtype) -> Iterator[None]:
    """While the block runs, `network` is under diffusers' layerwise casting (storage
    float8_e4m3fn, compute `compute`; CAST_SKIPS and the model's own skips stay as they
    are); after it, its own weights again, bit for bit, and no hook."""
    with _overwriting_parameters():
        originals = _cast_to_fp8(network, compute)
        try:
            yield
        finally:
            _remove_diffusers_hooks(network)
            _restore(network, originals)


def _saved_as_used(tensor: torch.Tensor) -> torch.Tensor:
    """What autograd saves of a Parameter: an alias of the storage it has now (the GPU
    copy group offloading will swap out from under the Parameter after the forward)."""
    return tensor.detach() if isinstance(tensor, torch.nn.Parameter) else tensor


def _as_saved(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def cast_skips(network: torch.nn.Module) -> tuple[str, ...]:
    """The layers casting leaves alone: CAST_SKIPS and the model's own list (a diffusers
    model's _skip_layerwise_casting_patterns: Wan's condition embedder, whose input it
    casts to its weights' dtype)."""
    return CAST_SKIPS + tuple(getattr(network, "_skip_layerwise_casting_patterns", None) or ())


def _cast_to_fp8(network: torch.nn.Module, compute: torch.dtype) -> dict[str, torch.Tensor]:
    """diffusers' layerwise casting on `network`; returns its weights as they were, in host
    memory (the same tensors on a CPU), for _restore. Called under _overwriting_parameters,
    so the conversions make new Parameters and the originals are untouched."""
    from diffusers.hooks import apply_layerwise_casting

    in_host: dict[int, torch.Tensor] = {}  # one copy of a tied weight, under each name
    weights = {name: in_host.setdefault(id(tensor), tensor.detach().to("cpu"))
               for name, tensor in [*network.named_parameters(remove_duplicate=False),
                                    *network.named_buffers(remove_duplicate=False)]}
    apply_layerwise_casting(network, storage_dtype=FP8, compute_dtype=compute,
                            skip_modules_pattern=cast_skips(network))
    return weights


@contextlib.contextmanager
def _overwriting_parameters() -> Iterator[None]:
    """Module conversions (.to) make new Parameters while the block runs (see the module
    docstring: under backward)."""
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)


def _restore(network: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """The network's own weights back (as _cast_to_fp8 kept them), on its device."""
    device = _device_of(network)
    restored: dict[int, torch.nn.Parameter] = {}  # a tied weight is one Parameter again
    for name, tensor in weights.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = network.get_submodule(owner_name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = restored.setdefault(
                id(tensor), torch.nn.Parameter(tensor.to(device), requires_grad=False))
        else:
            owner._buffers[leaf] = tensor.to(device)


def _remove_diffusers_hooks(network: torch.nn.Module) -> None:
    """Every diffusers hook on the network gone, each module's forward its class's again.
    The registry's own removal refuses layerwise casting (it cannot undo the rounding);
    the weights come back by _restore, so the hooks are dropped as they stand: the
    registry and the forward it set on the module (the group's weights, left in host
    memory, go home with the network)."""
    for module in network.modules():
        if module.__dict__.pop("_diffusers_hook", None) is not None:
            module.__dict__.pop("forward", None)


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
