"""Submitted frames: cheap checks at submit, and decoding only what a job uses.

A PNG of a few hundred bytes can hold a 4096×4096 picture, so the server never
trusts the wire size: submit reads headers only and checks the job's pixel budget
(frames used × width × height ≤ max_job_pixels), and the worker decodes only the
frames the settings choose.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from shared.protocol import ErrorCode, ProtocolError, is_png


def check_png_frames(frames: list[bytes], max_side: int) -> tuple[int, int]:
    """Check every payload frame is a PNG of one size within max_side; return (w, h).

    Reads headers and verifies chunk checksums without decoding pixels.
    """
    from PIL import Image

    size = None
    for index, frame in enumerate(frames):
        if not is_png(frame):
            raise ProtocolError(ErrorCode.BAD_FRAMES,
                                f"Frame {index} is not a PNG; send PNG-encoded frames.")
        try:
            with Image.open(io.BytesIO(frame)) as image:
                image.verify()
                frame_size = image.size
        except Exception as error:  # Pillow raises many types for broken images
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"Frame {index} is a damaged PNG "
                f"({type(error).__name__}); send it again.") from None
        if max(frame_size) > max_side:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"Frame {index} is {frame_size[0]}×{frame_size[1]}; the "
                f"server accepts at most {max_side} pixels a side, so scale the clip down.")
        if size is not None and frame_size != size:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES, f"Frame {index} is {frame_size[0]}×{frame_size[1]} but "
                f"frame 0 is {size[0]}×{size[1]}; send frames of one size.")
        size = frame_size
    return size or (0, 0)


def check_pixel_budget(frames_used: int, size: tuple[int, int], max_job_pixels: int) -> None:
    """Refuse a job whose used frames would decode to more than max_job_pixels."""
    pixels = frames_used * size[0] * size[1]
    if pixels > max_job_pixels:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"The job would decode {frames_used} frames of "
            f"{size[0]}×{size[1]} ({pixels / 1e6:.0f} megapixels); the server decodes at most "
            f"{max_job_pixels / 1e6:.0f} megapixels a job, so send smaller frames or use "
            "fewer frames (num_frames).")


class PngClip:
    """A clip of PNG frames that decodes a frame only when the engine picks it.

    `images` holds each frame's PNG bytes, or the path of a file holding them (the
    job store's inputs), read only when picked. The engine needs `len(clip)` and
    `clip[indices]` (an index array → (n, H, W, 3) uint8); nothing else is decoded,
    so memory follows the frames used, not the frames sent.
    """

    def __init__(self, images: list[Path] | list[bytes], source: str) -> None:
        self.images = images
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def png_bytes(self) -> list[bytes]:
        """Every frame's PNG bytes, undecoded (to hand the clip on, e.g. to a Ray worker)."""
        return [image.read_bytes() if isinstance(image, Path) else image for image in self.images]

    def __getitem__(self, indices) -> np.ndarray:
        from backend.video import check_frames, decode_pngs

        chosen = np.atleast_1d(np.arange(len(self.images))[indices])
        picked = PngClip([self.images[index] for index in chosen], self.source).png_bytes()
        return check_frames(decode_pngs(picked, self.source), self.source)
