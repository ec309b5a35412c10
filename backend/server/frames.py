"""Submitted frames: cheap checks at submit, and decoding only what a job uses.

A PNG of a few hundred bytes can hold a 4096×4096 picture, so the server never
trusts the wire size: submit reads headers only and checks the job's pixel budget
(frames used × (1 + regions) × width × height ≤ max_job_pixels), and the worker
decodes only the frames the settings choose. A region's mask frames (white = subject)
are read at submit one at a time, to refuse an empty or all-white region before the
job is queued; the worker decodes them again lazily, like the clip (PngMasks).
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


def check_mask_frames(masks: list[list[bytes]], frame_count: int, size: tuple[int, int]
                      ) -> None:
    """Check each region's mask frames: one PNG per clip frame, of the clip's size, and
    neither empty (black in every frame) nor all white (in every frame); ProtocolError
    ("bad_mask") in one sentence otherwise. Decodes one frame at a time."""
    for region_index, region in enumerate(masks):
        name = f"Region {region_index + 1}"
        if len(region) != frame_count:
            raise ProtocolError(
                ErrorCode.BAD_MASK, f"{name} has {len(region)} mask frames but the clip has "
                f"{frame_count}; send one mask frame per clip frame.")
        any_subject = any_plate = False
        for frame_index, frame in enumerate(region):
            mask = decode_mask(frame, f"mask frame {frame_index} of {name.lower()}", size)
            any_subject = any_subject or bool(mask.max() > 0)
            any_plate = any_plate or bool(mask.min() < 255)
        if not any_subject:
            raise ProtocolError(
                ErrorCode.BAD_MASK, f"{name}'s mask is black in every frame, so there is no "
                "subject to change; paint the subject white in its mask.")
        if not any_plate:
            raise ProtocolError(
                ErrorCode.BAD_MASK, f"{name}'s mask is white in every frame, so no plate is "
                "kept; paint only the subject white, or send no region to change the whole "
                "frame.")


def decode_mask(frame: bytes, what: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One mask PNG → (H, W) uint8 grey (white = subject); ProtocolError("bad_mask")
    when it is not a readable PNG, or (given `size`, (w, h)) not of that size, which is
    read from its header before anything is decoded."""
    from PIL import Image

    try:
        if not is_png(frame):
            raise ValueError("not a PNG")
        with Image.open(io.BytesIO(frame)) as image:
            if size is not None and image.size != tuple(size):
                raise ProtocolError(
                    ErrorCode.BAD_MASK, f"The {what} is {image.size[0]}×{image.size[1]} but "
                    f"the clip's frames are {size[0]}×{size[1]}; render the mask at the "
                    "clip's size.")
            return np.asarray(image.convert("L"))
    except ProtocolError:
        raise
    except Exception as error:  # Pillow raises many types for broken images
        raise ProtocolError(
            ErrorCode.BAD_MASK, f"The {what} is not a readable PNG ({type(error).__name__}); "
            "send masks as greyscale PNGs.") from None


def check_pixel_budget(frames_used: int, size: tuple[int, int], max_job_pixels: int,
                       regions: int = 0) -> None:
    """Refuse a job whose used frames (and each region's mask frames for them) would
    decode to more than max_job_pixels."""
    pixels = frames_used * (1 + regions) * size[0] * size[1]
    if pixels > max_job_pixels:
        owner = "region's" if regions == 1 else "regions'"
        masks = f" and {regions} {owner} masks" if regions else ""
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"The job would decode {frames_used} frames{masks} of "
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


class PngMasks:
    """A job's regions as mask PNGs, decoded only for the frames the engine picks.

    `regions[r][f]` is region r's mask of clip frame f: PNG bytes or the path of a
    stored file. `len(masks)` is the clip's frame count and `masks[indices]` is
    (R, n, H, W) float32 in [0, 1] (white = subject, 1), at the clip's resolution.
    """

    def __init__(self, regions: list[list[Path]] | list[list[bytes]], source: str) -> None:
        self.regions = regions
        self.source = source

    @property
    def region_count(self) -> int:
        return len(self.regions)

    def __len__(self) -> int:
        return len(self.regions[0]) if self.regions else 0

    def png_bytes(self) -> list[list[bytes]]:
        """Every region's mask PNGs, undecoded (to hand them on, e.g. to a Ray worker)."""
        return [[image.read_bytes() if isinstance(image, Path) else image for image in region]
                for region in self.regions]

    def __getitem__(self, indices) -> np.ndarray:
        chosen = np.atleast_1d(np.arange(len(self))[indices])
        decoded = []
        for number, region in enumerate(self.regions):
            frames = []
            for index in chosen:
                image = region[index]
                data = image.read_bytes() if isinstance(image, Path) else image
                frames.append(decode_mask(data, f"mask of frame {index} of region "
                                                f"{number + 1} of {self.source}"))
            decoded.append(np.stack(frames))
        return np.stack(decoded).astype(np.float32) / 255.0
