"""What the server needs of an engine: the three calls it makes, typed.

`backend.engine.Engine` is one; tests and a future remote runner can be others.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from shared.settings import TransferSettings


class TransferOutcome(Protocol):
    frames: np.ndarray  # (F_out, H, W, 3) uint8
    metadata: dict[str, Any]  # the JSON sidecar


class TransferEngine(Protocol):
    def describe(self) -> dict[str, Any]:
        """model, device, dtype, upscaler (None: none loaded): what `welcome` reports."""

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        """Raise UnderstudyError (one sentence) for settings this engine cannot run on a
        clip of clip_length frames of frame_size (width, height)."""

    def transfer(self, clip_frames: Any, settings: TransferSettings,
                 progress: Callable[[str, int, int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> TransferOutcome:
        """Edit a clip; clip_frames needs len() and [index array] (see PngClip)."""
