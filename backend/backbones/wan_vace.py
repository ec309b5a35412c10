"""Wan 2.1 VACE behind the backbone seam: Wan with a context branch that reads reference
images and where to generate (docs/method.md, "Reference images: Wan VACE").

Components, as the hub's Wan-AI/Wan2.1-VACE-1.3B-diffusers ships them (the 14B loads the
same way): WanVACETransformer3DModel (Wan 2.1 T2V's blocks plus context blocks whose
outputs, times the conditioning scale, are added after blocks `vace_layers`), and Wan
2.1's VAE, UMT5 text encoder, tokenizer and schedule, used exactly as the Wan backbone
uses them (this class is a Wan: the same encode, decode, embed, flow-matching schedule,
inversion, feature tap and truncated pass).

The context, as WanVACEPipeline builds it (video, mask, reference_images), for an edit
of N model frames at H×W (F' = (N − 1)/4 + 1 latent frames, R references):

    mask m       (N, H, W) 1 where the model generates: the whole frame without a region,
                 the grown region with one (`generate`)
    video v      no control video without a region (zeros: mid-grey, diffusers'
                 video=None); with a region the clip itself with the region mid-grey
                 (VACE's inpainting input), so the old subject's look never enters
    inactive     E(v·(1 − m)),  reactive  E(v·m)              (16 channels each, F')
    references   each fitted into an H×W white canvas and encoded alone, E(r) (16, 1),
                 paired with zeros; each put before the frames already there (so the
                 last reference given comes first)
    mask cells   m as its 8×8 pixels per latent cell (64 channels), nearest-exact to F'
                 latent frames, R zero frames first
    context      (1, 96, R + F', h, w) = [inactive | reactive, mask cells]

A conditioned pass's latent is (B, 16, R + F', h, w): the R leading frames are the
references' slots, sampled from the same seeded noise as the clip and dropped at the
end (the engine: backend/method/engine.py). Unconditioned passes (the inversion and the
source's features) give the context blocks zeros at conditioning scale 0, so their hints
add exactly nothing: the pass is Wan 2.1 T2V's own, whatever the references.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from backend.backbones.base import Conditioning, checkpointed_blocks
from backend.backbones.wan import Wan, load_wan_family, wan_facts

WAN_VACE_1_3B = "Wan-AI/Wan2.1-VACE-1.3B-diffusers"
WAN_VACE_14B = "Wan-AI/Wan2.1-VACE-14B-diffusers"
WAN_VACE_TINY = "wan-vace-tiny"
WAN_VACE_RANDOM = "wan-vace-random"  # Wan2.1-VACE-1.3B's architecture, random weights
WAN_VACE_ARCHITECTURES = {WAN_VACE_RANDOM: "Wan2.1-VACE-1.3B", WAN_VACE_1_3B: "Wan2.1-VACE-1.3B",
                          WAN_VACE_14B: "Wan2.1-VACE-14B"}
# VACE's pipeline takes a list of references with no fixed length; each one is one more
# latent frame in every pass (and one more frame of attention). Understudy takes up to
# three: a subject, a second view of it, a background (VACE's own examples give one or two).
MAX_REFERENCES = 3


def wan_vace_facts(layers: int) -> Any:
    """Wan 2.1's facts and guidance defaults (backend/backbones/wan.py wan_facts), named
    "wan-vace", taking up to MAX_REFERENCES reference images."""
    return dataclasses.replace(wan_facts(layers, ti2v=False), name="wan-vace",
                               max_references=MAX_REFERENCES)


WAN_VACE_1_3B_FACTS = wan_vace_facts(30)


class WanVace(Wan):
    """Wan 2.1 VACE (1.3B, 14B): see the module docstring."""

    tiny, random, architectures = WAN_VACE_TINY, WAN_VACE_RANDOM, WAN_VACE_ARCHITECTURES
    transformer_class = "WanVACETransformer3DModel"
    conditions_whole_clip = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.facts = wan_vace_facts(len(self.transformer.blocks))
        self._conditioning: Conditioning | None = None

    @classmethod
    def built(cls, model: str, device: str | torch.device, dtype: torch.dtype) -> dict:
        from backend.backbones.wan_tiny import build_tiny_wan, build_wan_random

        if model == cls.tiny:
            return build_tiny_wan(vace=True)
        return build_wan_random(cls.architectures[model], device, dtype)

    @property
    def _context_layers(self) -> int:
        return len(self.transformer.config.vace_layers)

    # ---------------------------------------------------------------- the context

    @torch.no_grad()
    def conditioning(self, frames: np.ndarray, generate: torch.Tensor | None,
                     references: list[np.ndarray], strength: float) -> Conditioning:
        """The edit's VACE context (module docstring) and its conditioning scale."""
        count, height, width = frames.shape[:3]
        vae_dtype = next(self.vae.parameters()).dtype
        device = self.device
        if generate is None:
            mask = torch.ones((1, 1, count, height, width), device=device)
            video = torch.zeros((1, 3, count, height, width), device=device)
        else:
            mask = generate.to(device, torch.float32)[None, None]
            pixels = torch.from_numpy(np.asarray(frames)).to(device).permute(3, 0, 1, 2)[None]
            video = (2.0 * (pixels.float() / 255.0) - 1.0) * (1 - mask)  # the region mid-grey
        video, mask = video.to(vae_dtype), mask.to(vae_dtype)
        latent = torch.cat([self._encoded(video * (1 - mask)), self._encoded(video * mask)], dim=1)
        for reference in references:
            encoded = self._encoded(self._on_canvas(reference, height, width).to(vae_dtype)[None, :, None])
            latent = torch.cat([torch.cat([encoded, torch.zeros_like(encoded)], dim=1), latent], dim=2)
        cells = self._mask_cells(mask[0, 0].float(), latent.shape[2] - len(references))
        cells = torch.cat([cells.new_zeros((cells.shape[0], len(references), *cells.shape[2:])),
                           cells], dim=1)
        context = torch.cat([latent, cells[None].to(latent.dtype)], dim=1).to(self.dtype)
        scale = torch.full((self._context_layers,), float(strength), device=device, dtype=self.dtype)
        return Conditioning(len(references), {"context": context, "scale": scale})

    def _encoded(self, pixels: torch.Tensor) -> torch.Tensor:
        """E(pixels): the posterior's mode, normalised, in the VAE's dtype (as WanVACEPipeline)."""
        latent = self.vae.encode(pixels).latent_dist.mode()
        mean, inverse_std = self._latent_stats(latent.float())
        return ((latent.float() - mean) * inverse_std).to(pixels.dtype)

    def _on_canvas(self, image: np.ndarray, height: int, width: int) -> torch.Tensor:
        """A reference (h, w, 3) uint8 fitted (bilinear) into a white H×W canvas, centred,
        in [−1, 1]: (3, H, W) float32."""
        pixels = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)
        pixels = (2.0 * pixels - 1.0).permute(2, 0, 1)[None].to(self.device)
        scale = min(height / pixels.shape[-2], width / pixels.shape[-1])
        fitted = (int(pixels.shape[-2] * scale), int(pixels.shape[-1] * scale))
        resized = functional.interpolate(pixels, size=fitted, mode="bilinear",
                                         align_corners=False)[0]
        canvas = torch.ones((3, height, width), device=self.device)
        top, left = (height - fitted[0]) // 2, (width - fitted[1]) // 2
        canvas[:, top:top + fitted[0], left:left + fitted[1]] = resized
        return canvas

    def _mask_cells(self, mask: torch.Tensor, latent_frames: int) -> torch.Tensor:
        """(N, H, W) → (c², F', H/c, W/c): each latent cell's c×c pixels as channels,
        nearest-exact in time to the latent frames."""
        cell = self.latent_cell
        count, height, width = mask.shape
        cells = mask.view(count, height // cell, cell, width // cell, cell)
        cells = cells.permute(2, 4, 0, 1, 3).flatten(0, 1)
        return functional.interpolate(cells[None], size=(latent_frames, height // cell, width // cell),
                                      mode="nearest-exact")[0]

    @contextlib.contextmanager
    def _conditioned(self, conditioning: Conditioning | None) -> Iterator[None]:
        previous, self._conditioning = self._conditioning, conditioning
        try:
            yield
        finally:
            self._conditioning = previous

    def conditioned(self, conditioning: Conditioning | None) -> AbstractContextManager:
        return self._conditioned(conditioning)

    def _transformer_inputs(self, latent: torch.Tensor) -> dict[str, Any]:
        """The context and its scale: the edit's while conditioned; else zeros at scale 0
        (the context blocks' hints then add nothing: Wan 2.1 T2V's own pass)."""
        batch, _, frames, height, width = latent.shape
        if self._conditioning is None:
            channels = self.transformer.config.vace_in_channels
            return {"control_hidden_states": latent.new_zeros((batch, channels, frames, height, width),
                                                              dtype=self.dtype),
                    "control_hidden_states_scale": latent.new_zeros(self._context_layers,
                                                                    dtype=self.dtype)}
        context = self._conditioning.tensors["context"]
        if context.shape[2] != frames:
            raise ValueError(f"a conditioned pass takes {context.shape[2]} latent frames "
                             f"(the references' and the clip's), not {frames}")
        return {"control_hidden_states": context.expand(batch, -1, -1, -1, -1),
                "control_hidden_states_scale": self._conditioning.tensors["scale"]}

    def taps(self, latent: torch.Tensor, timestep: Any, embedding: torch.Tensor,
             truncated: bool, block: int | None = None, spatial: bool = False) -> list[torch.Tensor]:
        """Wan's tap of blocks[k]; a truncated pass runs only the context blocks whose
        hints reach blocks 0 … k (all of them run before the first block, each feeding
        the next, so the first m of them, m the number of vace_layers ≤ k)."""
        if not truncated:
            return super().taps(latent, timestep, embedding, truncated, block, spatial)
        index = self.guidance_block if block is None else block
        with self._context_blocks_up_to(index):
            return super().taps(latent, timestep, embedding, truncated, block, spatial)

    @contextlib.contextmanager
    def _context_blocks_up_to(self, block: int) -> Iterator[None]:
        every = self.transformer.vace_blocks
        used = sum(1 for layer in self.transformer.config.vace_layers if layer <= block)
        self.transformer.vace_blocks = torch.nn.ModuleList(list(every)[:used])
        try:
            yield
        finally:
            self.transformer.vace_blocks = every

    def checkpointing(self, enabled: bool) -> AbstractContextManager:
        """The blocks before the tapped one, and the context blocks (which all run first)."""
        return checkpointed_blocks([*self.transformer.vace_blocks,
                                    *self.transformer.blocks[: self.guidance_block]], enabled)


def build_tiny_wan_vace(seed: int = 0) -> dict:
    """The components of a tiny random WanVACEPipeline (backend/backbones/wan_tiny.py)."""
    from backend.backbones.wan_tiny import build_tiny_wan

    return build_tiny_wan(seed, vace=True)


def build_wan_vace_random(device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0, text_encoder: bool = True) -> dict:
    """Wan2.1-VACE-1.3B's architecture with random weights (benches, the memory plan)."""
    from backend.backbones.wan_tiny import build_wan_random

    return build_wan_random(WAN_VACE_ARCHITECTURES[WAN_VACE_RANDOM], device, dtype, seed,
                            text_encoder)


def load_wan_vace(model: str, device: torch.device, dtype: str | None,
                  flag: str = "--model") -> WanVace:
    """Load a Wan VACE model: "wan-vace-tiny" (random, tiny), "wan-vace-random"
    (Wan2.1-VACE-1.3B's architecture, random weights) or a diffusers folder / hub id
    whose model_index.json names WanVACEPipeline (the 1.3B, or the 14B when given), in
    `dtype` (None: bf16 on CUDA, fp32 on a CPU)."""
    loaded = load_wan_family(WanVace, model, device, dtype, flag)
    assert isinstance(loaded, WanVace)
    return loaded
