"""The motion-transfer engine: one loaded model, many edits.

    engine = load_engine("tiny", device="cpu", cache_dir=Path("cache"))
    result = engine.transfer(clip_frames, TransferSettings(prompt="a train"),
                             progress=print_progress, cancelled=lambda: False)
    result.frames      # (F_out, H, W, 3) uint8 at model resolution
    result.metadata    # the JSON sidecar: settings, seed, model, cache hit, timings

INTERFACE STUB: the real pipeline replaces `Engine.transfer`'s body (engine issue);
the signatures here are what the server, CLI and extension rely on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend.errors import JobCancelled
from backend.settings import TransferSettings

ProgressCallback = Callable[[str, int, int], None]
"""progress(phase, step, total); phases: "load", "invert", "guide", "denoise", "decode"."""

CancelCheck = Callable[[], bool]
"""Returns True when the caller wants the edit stopped; checked between steps."""


@dataclass
class TransferResult:
    frames: np.ndarray  # (F_out, H, W, 3) uint8
    metadata: dict[str, Any] = field(default_factory=dict)


class Engine:
    """A loaded model plus the on-disk inversion cache."""

    def __init__(self, model_id: str, device: str, cache_dir: Path | None) -> None:
        self.model_id = model_id
        self.device = device
        self.cache_dir = cache_dir

    def describe(self) -> dict[str, Any]:
        """What the server reports in its hello: model id, device, dtype."""
        return {"model": self.model_id, "device": self.device}

    def transfer(
        self,
        clip_frames: np.ndarray,
        settings: TransferSettings,
        progress: ProgressCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> TransferResult:
        """Edit a clip.

        clip_frames: (N, H, W, 3) uint8, the whole clip; frames are sampled from it
        by settings.num_frames / settings.start and resized to settings.width×height.
        Raises BadClipError, OutOfMemoryError, JobCancelled (all UnderstudyError).
        """
        started = time.perf_counter()
        from backend.video import resize_frames, retime_frames, sample_indices

        indices = sample_indices(len(clip_frames), settings.num_frames, settings.start)
        frames = resize_frames(clip_frames[indices], settings.width, settings.height)
        total = settings.steps
        for step in range(total):
            if cancelled is not None and cancelled():
                raise JobCancelled("The edit was cancelled.")
            if progress is not None:
                progress("denoise", step + 1, total)
        out = retime_frames(frames, settings.output_frames or len(frames))
        seed = settings.seed if settings.seed is not None else 0
        metadata = {
            "settings": settings.to_dict(),
            "seed": seed,
            "model": self.model_id,
            "inversion_from_cache": False,
            "timings_s": {"total": time.perf_counter() - started},
        }
        return TransferResult(frames=out, metadata=metadata)


def load_engine(
    model: str, device: str | None = None, dtype: str | None = None, cache_dir: Path | None = None
) -> Engine:
    """Load a model ("tiny", a hub id, or a local diffusers folder) once."""
    return Engine(model, device or "cpu", cache_dir)
