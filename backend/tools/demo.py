"""`python build.py demo`: the main job on a clip the project generates itself.

ZeroScope runs when its weights are on this machine and a CUDA GPU is present; else
the tiny random model runs with fewer steps, and the demo says that its output is
not a quality result.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from backend.backbones.zeroscope import TINY, ZEROSCOPE
from backend.errors import UnderstudyError

DEMO_PROMPT = "a red locomotive driving through a green valley"
# The tiny model's output is noise whatever its size: a small, short edit keeps the demo
# around a minute on a CPU. ZeroScope runs with the reference defaults.
TINY_DEMO_SETTINGS = {"num_frames": 8, "width": 256, "height": 144, "steps": 10,
                      "inversion_steps": 10, "guided_steps": 4, "guidance_iterations": 3}


def demo_clip_frames(count: int = 24, width: int = 576, height: int = 320) -> np.ndarray:
    """A ball rolling left to right over a sky-and-ground backdrop: (count, H, W, 3) uint8."""
    ys, xs = np.mgrid[0:height, 0:width]
    sky = np.stack([90 + 60 * ys / height, 140 + 50 * ys / height, 220 - 40 * ys / height], -1)
    ground = np.stack([60 + 0 * ys, 120 + 40 * np.sin(xs / 17.0), 50 + 0 * ys], -1)
    backdrop = np.where((ys > height * 0.65)[..., None], ground, sky)
    frames = []
    radius = height // 8
    for index in range(count):
        cx = radius + (width - 2 * radius) * index / max(1, count - 1)
        cy = height * 0.65 - radius - 12 * abs(np.sin(index / 3.0))
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 < radius**2
        frame = np.where(inside[..., None], np.array([200.0, 60.0, 40.0]), backdrop)
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def choose_demo_model() -> tuple[str, str]:
    """(model, why): ZeroScope if its weights are here and a GPU is present, else tiny."""
    import torch

    if not torch.cuda.is_available():
        return TINY, "no CUDA GPU on this machine"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(ZEROSCOPE, local_files_only=True)
    except Exception:
        return TINY, f"the {ZEROSCOPE} weights are not on this machine"
    return ZEROSCOPE, "weights found and a CUDA GPU present"


def run_demo(output_dir: Path) -> int:
    """Write demo_output/source.mp4, result.mp4 and result.json; print where."""
    from backend.edit import Local, edit_clip
    from backend.video import write_video

    output_dir.mkdir(parents=True, exist_ok=True)
    source = output_dir / "source.mp4"
    write_video(demo_clip_frames(), source, fps=8)
    model, why = choose_demo_model()
    if model == TINY:
        print(f"Demo with the tiny random model ({why}): its output is noise, not a quality "
              f"result; it shows the whole pipeline running.")
    else:
        print(f"Demo with {model} ({why}).")
    settings = {"prompt": DEMO_PROMPT, "source_prompt": "a red ball rolling on grass", "seed": 1,
                **(TINY_DEMO_SETTINGS if model == TINY else {})}
    try:
        outcome = edit_clip(source, settings, output_dir / "result.mp4", Local(model=model))
    except UnderstudyError as error:  # e.g. weights vanished between the check and the load
        print(f"error: {error}")
        return 1
    print(f"Demo written to {output_dir}/: source.mp4, result.mp4, result.json "
          f"(model {outcome.metadata['model']}, seed {outcome.metadata['seed']}).")
    return 0
