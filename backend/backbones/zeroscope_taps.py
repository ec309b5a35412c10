"""Space-time features from ZeroScope's UNet, and the truncated pass that yields them.

Three taps in `up_blocks[1]` (the first cross-attention up block; 1280 channels in
ZeroScope), as the reference uses them:

    "upsampler"      up_blocks[1].upsamplers[0] output
    "resnet_conv2"   up_blocks[1].resnets[1].conv2 output (before the residual add)
    "temporal_conv"  up_blocks[1].temp_convs[1] output

UNet3DConditionModel folds frames into the batch inside its blocks, so each tap
arrives as (B·F, D, h, w). `truncated_smm` runs the UNet only as far as these taps:
a forward hook on up_blocks[1] raises once the block is done, so nothing after it
is computed, and gradients still flow back through what was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from backend.backbones.base import smm

TAP_NAMES = ("upsampler", "resnet_conv2", "temporal_conv")


class _FeaturesReady(Exception):
    """Raised from the hook on up_blocks[1] to stop the UNet after the taps."""


def tap_modules(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    block = unet.up_blocks[1]
    return {
        "upsampler": block.upsamplers[0],
        "resnet_conv2": block.resnets[1].conv2,
        "temporal_conv": block.temp_convs[1],
    }


@contextlib.contextmanager
def capture_taps(unet: torch.nn.Module, stop_after: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that store each tap's output in the yielded dict (and may stop the UNet)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in tap_modules(unet).items():
        def store(_module, _inputs, output, name=name):
            captured[name] = output
        handles.append(module.register_forward_hook(store))
    if stop_after:
        def stop(_module, _inputs, _output):
            raise _FeaturesReady
        handles.append(unet.up_blocks[1].register_forward_hook(stop))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def truncated_smm(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor,
    spatial: bool = False,
) -> list[torch.Tensor]:
    """SMM of each tap for a UNet pass that stops after up_blocks[1].

    latents (B, C, F, h, w), text_embeddings (B, L, E) → one (B, F, D) tensor per tap,
    in TAP_NAMES order, in float32; spatial: the features themselves, (B, F, D, h', w'),
    for a masked SMM (backend/method/regions.py).
    """
    batch, _, frames = latents.shape[:3]
    with capture_taps(unet, stop_after=True) as captured:
        try:
            unet(latents, timestep, encoder_hidden_states=text_embeddings)
        except _FeaturesReady:
            pass
    out = []
    for name in TAP_NAMES:
        feature = captured[name]  # (B·F, D, h, w)
        feature = feature.reshape(batch, frames, *feature.shape[1:]).float()
        out.append(feature if spatial else smm(feature))
    return out


def full_pass_smm(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: int, text_embeddings: torch.Tensor,
    spatial: bool = False,
) -> list[torch.Tensor]:
    """The reference's guidance pass: the whole UNet runs, the taps are read on the way.
    Same shapes as truncated_smm."""
    batch, _, frames = latents.shape[:3]
    with capture_taps(unet, stop_after=False) as captured:
        unet(latents, timestep, encoder_hidden_states=text_embeddings)
    features = [captured[n].reshape(batch, frames, *captured[n].shape[1:]).float() for n in TAP_NAMES]
    return features if spatial else [smm(feature) for feature in features]
