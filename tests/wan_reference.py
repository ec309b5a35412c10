"""Diffusers' own WanPipeline as the equality reference for the Wan backbone.

With `--iterations 0 --no-restart --init noise --prompt-prefix ""` an edit is plain
text-to-video sampling; it must equal what this returns for the same weights, prompts,
guidance, steps, size, frames and initial latent. The pipeline's scheduler is replaced by
FlowMatchEulerDiscreteScheduler(shift): the hub's Wan repos ship UniPC, but the backbone
samples with Euler steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def wan_initial_latents(seed: int, width: int, height: int, frames: int, channels: int = 16,
                        temporal_factor: int = 4, spatial_factor: int = 8) -> torch.Tensor:
    """The initial latent both sides start from:
    torch.randn((1, C, (N − 1)//4 + 1, H/8, W/8), generator=torch.Generator("cpu").manual_seed(seed)).

    Wan 2.1: C = 16, spatial factor 8; Wan 2.2 TI2V: C = 48, spatial factor 16.
    """
    shape = (1, channels, (frames - 1) // temporal_factor + 1, height // spatial_factor,
             width // spatial_factor)
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def wan_pipeline_video(folder: Path | str, prompt: str, negative_prompt: str, steps: int,
                       shift: float, guidance: float, width: int, height: int, frames: int,
                       latents: torch.Tensor, output_type: str = "np",
                       max_sequence_length: int = 512, device: str = "cpu") -> np.ndarray:
    """Run diffusers' WanPipeline from `folder` with FlowMatchEulerDiscreteScheduler(shift).

    Returns the first (only) video of the batch as float32 numpy:
        "np"      (F, H, W, 3) in [0, 1]
        "pt"      (F, 3, H, W) in [0, 1]
        "latent"  (C, F_latent, H/8, W/8), the final latent before the VAE (normalised)
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder)).to(device)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    video = pipe(
        prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
        guidance_scale=guidance, width=width, height=height, num_frames=frames,
        latents=latents.to(device), output_type=output_type,
        max_sequence_length=max_sequence_length,
    ).frames
    first = video[0]
    if isinstance(first, torch.Tensor):
        first = first.detach().float().cpu().numpy()
    return np.asarray(first, dtype=np.float32)
