"""Synthetic clips with known motion, for tracker and evaluate tests."""

from __future__ import annotations

import numpy as np


def textured_clip(shift: tuple[int, int], frames: int = 8, size: tuple[int, int] = (96, 128),
                  seed: int = 0) -> np.ndarray:
    """A smooth random texture whose content moves by `shift` (dx, dy) pixels per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    height, width = size
    pad = 4 + frames * max(abs(shift[0]), abs(shift[1]))
    big = rng.integers(0, 256, size=(height + 2 * pad, width + 2 * pad, 3), dtype=np.uint8)
    big = cv2.GaussianBlur(big, (0, 0), 1.5)
    dx, dy = shift
    # The window moves by −shift, so the content seen through it moves by +shift.
    return np.stack([big[pad - k * dy:pad - k * dy + height, pad - k * dx:pad - k * dx + width]
                     for k in range(frames)])
