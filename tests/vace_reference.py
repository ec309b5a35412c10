"""Diffusers' own WanVACEPipeline as the equality reference for the Wan VACE backbone.

With `--iterations 0 --no-restart --init noise --prompt-prefix ""` an edit is plain VACE
sampling; it must equal what this returns for the same weights, prompts, guidance,
steps, size, frames, references, mask, control video, conditioning scale and initial
latent (the references' leading frames included). As in tests/wan_reference.py the
scheduler is FlowMatchEulerDiscreteScheduler(shift). `after_step(index, latents)` may
change the latent after each step (the regions' kept plate), as a step-end callback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def vace_pipeline_latent(folder: Path | str, prompt: str, negative_prompt: str, steps: int,
                         shift: float, guidance: float, width: int, height: int, frames: int,
                         latents: torch.Tensor, references: list[np.ndarray],
                         conditioning_scale: float = 1.0, video: torch.Tensor | None = None,
                         mask: torch.Tensor | None = None,
                         after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                         ) -> torch.Tensor:
    """The pipeline's final latent, (C, R + F', h, w), the references' frames first.

    video: (N, H, W, 3) in [−1, 1] (a tensor, so the pipeline takes it as it is); mask:
    (N, H, W) 0/1. None: the pipeline's defaults (no control video, the whole frame)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(str(folder))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    pipe.set_progress_bar_config(disable=True)

    def callback(_pipe, index, _timestep, values):
        return {"latents": after_step(index, values["latents"])}

    def as_video(tensor: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) → (1, N, C, H, W), the pipeline's 5-D video tensor."""
        return tensor.permute(0, 3, 1, 2)[None]

    output = pipe(
        prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
        guidance_scale=guidance, width=width, height=height, num_frames=frames,
        latents=latents, output_type="latent", conditioning_scale=conditioning_scale,
        reference_images=[Image.fromarray(image) for image in references] or None,
        video=None if video is None else as_video(video),
        mask=None if mask is None else as_video(mask.float()[..., None].expand(-1, -1, -1, 3)),
        callback_on_step_end=None if after_step is None else callback,
    ).frames
    return output[0]
