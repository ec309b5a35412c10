"""Submitted frames: cheap checks at submit, and decoding only what a job uses.

A PNG of a few hundred bytes can hold a 4096×4096 picture, so the server never
trusts the wire size: submit reads headers only and checks the job's pixel budget
((frames used + mask frames) × width × height ≤ max_job_pixels), and the engine
decodes only the frames the settings choose. A region's mask frames (white = subject)
are decoded at submit, one region at a time, to refuse an empty or all-white region
before the job is queued; they are read again as the engine asks (PngMasks). Reference
images (a few per job) are decoded at submit to refuse an unreadable or wrongly sized
one, and again as the engine reads them (PngReferences); their pixels count in the budget.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.errors import ErrorCode
from shared.protocol import ProtocolError, is_png


def png_size(frame: bytes) -> tuple[int, int]:
    """(width, height) of a PNG from its header."""
    from PIL import Image

    with Image.open(io.BytesIO(frame)) as image:
        return image.size


def check_png_frames(frames: list[bytes], max_side: int) -> tuple[int, int]:
    """Check every payload frame is a PNG of one size within max_side; return (w, h).

    Reads headers and verifies chunk checksums without decoding pixels.
    """
    from PIL import Image

    size = None
    for index, frame in enumerate(frames):
        if not is_png(frame):
            raise ProtocolError(f"Frame {index} is not a PNG; send PNG-encoded frames.",
                                ErrorCode.BAD_FRAMES)
        try:
            with Image.open(io.BytesIO(frame)) as image:
                image.verify()
                frame_size = image.size
        except Exception as error:  # Pillow raises many types for broken images
            raise ProtocolError(
                f"Frame {index} is a damaged PNG "
                f"({type(error).__name__}); send it again.", ErrorCode.BAD_FRAMES) from None
        if max(frame_size) > max_side:
            raise ProtocolError(
                f"Frame {index} is {frame_size[0]}×{frame_size[1]}; the "
                f"server accepts at most {max_side} pixels a side, so scale the clip down.",
                ErrorCode.BAD_FRAMES)
        if size is not None and frame_size != size:
            raise ProtocolError(
                f"Frame {index} is {frame_size[0]}×{frame_size[1]} but "
                f"frame 0 is {size[0]}×{size[1]}; send frames of one size.", ErrorCode.BAD_FRAMES)
        size = frame_size
    return size or (0, 0)


def check_mask_frames(masks: list[list[bytes]], frame_count: int, size: tuple[int, int]
                      ) -> None:
    """Check each region's mask frames as the engine will (backend/masks.py:
    one frame per clip frame, the clip's size, neither black nor white everywhere);
    ProtocolError (bad_mask) with its one sentence otherwise. Each frame's size is read
    from its header before it is decoded, and frames are decoded one at a time as uint8
    grey, so a long 1080p region costs one frame of memory, not the whole clip's."""
    from backend.errors import BadMaskError
    from backend.masks import MaskTally, check_mask_shape  # no torch

    width, height = size
    for number, region in enumerate(masks, start=1):
        name = f"of region {number}"
        try:
            check_mask_shape((len(region), height, width), frame_count, size, name)
            tally = MaskTally(name)
            for index, frame in enumerate(region):
                tally.add(decode_mask(frame, f"mask of frame {index} of region {number} of "
                                      "the job", size)[None])
            tally.finish()
        except BadMaskError as error:  # the engine's own sentence and code
            raise ProtocolError(str(error), error.code) from None


def decode_mask(frame: bytes, what: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """One mask PNG → (H, W) uint8 grey (white = subject); ProtocolError (bad_mask)
    when it is not a readable PNG, or (given `size`, (w, h)) not of that size, which is
    read from its header before anything is decoded."""
    from PIL import Image

    try:
        if not is_png(frame):
            raise ValueError("not a PNG")
        with Image.open(io.BytesIO(frame)) as image:
            if size is not None and image.size != tuple(size):
                raise ProtocolError(
                    f"The {what} is {image.size[0]}×{image.size[1]} but "
                    f"the clip's frames are {size[0]}×{size[1]}; render the mask at the "
                    "clip's size.", ErrorCode.BAD_MASK)
            return np.asarray(image.convert("L"))
    except ProtocolError:
        raise
    except Exception as error:  # Pillow raises many types for broken images
        raise ProtocolError(
            f"The {what} is not a readable PNG ({type(error).__name__}); "
            "send masks as greyscale PNGs.", ErrorCode.BAD_MASK) from None


def check_reference_images(references: list[bytes]) -> int:
    """Check each reference image is a readable PNG with sides in the range allowed
    (backend/references.py); ProtocolError (bad_reference) with one sentence, else the
    pixels they decode to. Each is decoded once here (a job has a few)."""
    pixels = 0
    for index, data in enumerate(references):
        decode_reference(data, f"reference image {index + 1}")
        width, height = png_size(data)
        pixels += width * height
    return pixels


def decode_reference(data: bytes, what: str) -> np.ndarray:
    """One reference PNG → (H, W, 3) uint8 RGB, its size checked from the header before
    the pixels are decoded; ProtocolError (bad_reference) with one sentence."""
    from PIL import Image

    from backend.references import side_problem

    try:
        if not is_png(data):
            raise ValueError("not a PNG")
        with Image.open(io.BytesIO(data)) as image:
            if problem := side_problem(*image.size, what):
                raise ProtocolError(problem, ErrorCode.BAD_REFERENCE)
            return np.asarray(image.convert("RGB"))
    except ProtocolError:
        raise
    except Exception as error:  # Pillow raises many types for broken images
        raise ProtocolError(
            f"The {what} is not a readable PNG ({type(error).__name__}); send reference "
            "images as PNGs.", ErrorCode.BAD_REFERENCE) from None


class PngReferences(Sequence):
    """A job's reference images as PNGs (bytes, or the paths of files holding them),
    decoded when read: item i is (H, W, 3) uint8, what Engine.transfer's `references`
    takes. `png_bytes` hands them on undecoded (to a Ray worker)."""

    def __init__(self, images: list[Path] | list[bytes], source: str) -> None:
        self.images = list(images)
        self.source = source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return decode_reference(self._bytes(index), f"reference image {index + 1} of {self.source}")

    def png_bytes(self) -> list[bytes]:
        return [self._bytes(index) for index in range(len(self))]

    def _bytes(self, index: int) -> bytes:
        image = self.images[index]
        return image if isinstance(image, bytes | bytearray) else Path(image).read_bytes()


def check_pixel_budget(frames_used: int, size: tuple[int, int], max_job_pixels: int,
                       mask_frames: int = 0, reference_pixels: int = 0) -> None:
    """Refuse a job whose used frames, mask frames (every region's, all of which are
    read) and reference images would decode to more than max_job_pixels."""
    pixels = (frames_used + mask_frames) * size[0] * size[1] + reference_pixels
    if pixels > max_job_pixels:
        masks = f" and {mask_frames} mask frames" if mask_frames else ""
        masks += " and its reference images" if reference_pixels else ""
        raise ProtocolError(
            f"The job would decode {frames_used} frames{masks} of "
            f"{size[0]}×{size[1]} ({pixels / 1e6:.0f} megapixels); the server decodes at most "
            f"{max_job_pixels / 1e6:.0f} megapixels a job, so send smaller frames or use "
            "fewer frames (num_frames).", ErrorCode.TOO_LARGE)


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

    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the clip's frames, from the first one's header (a stored
        clip's frames were checked to share one size at submit)."""
        return png_size(self.png_bytes_of(0))

    def png_bytes_of(self, index: int) -> bytes:
        image = self.images[index]
        return image.read_bytes() if isinstance(image, Path) else image

    def png_bytes(self) -> list[bytes]:
        """Every frame's PNG bytes, undecoded (to hand the clip on, e.g. to a Ray worker)."""
        return [self.png_bytes_of(index) for index in range(len(self.images))]

    def __getitem__(self, indices) -> np.ndarray:
        from backend.video import check_frames, decode_pngs

        chosen = np.atleast_1d(np.arange(len(self.images))[indices])
        picked = PngClip([self.images[index] for index in chosen], self.source).png_bytes()
        return check_frames(decode_pngs(picked, self.source), self.source)


class PngMasks:
    """A job's regions as mask PNGs, decoded only when read: the engine's RegionMasks
    (backend/results.py, (R, F, H, W) float32 in [0, 1], white = subject) in the shape
    of an array. `masks[:, indices]` decodes only those frames of every region;
    `np.asarray(masks)` decodes them all.

    `regions[r][f]` is region r's mask of clip frame f: PNG bytes, or the path of a
    stored file (the job store's masks), read only when decoded.
    """

    def __init__(self, regions: list[list[Path]] | list[list[bytes]], source: str) -> None:
        self.regions = regions
        self.source = source

    def __len__(self) -> int:
        return len(self.regions)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(R, F, H, W), H and W read from the first mask's PNG header."""
        from PIL import Image

        first = self._bytes(0, 0)
        with Image.open(io.BytesIO(first)) as image:
            width, height = image.size
        return len(self.regions), len(self.regions[0]), height, width

    def png_bytes(self) -> list[list[bytes]]:
        """Every region's mask PNGs, undecoded (to hand them on, e.g. to a Ray worker)."""
        return [[self._bytes(number, index) for index in range(len(region))]
                for number, region in enumerate(self.regions)]

    def region(self, number: int, size: tuple[int, int] | None = None,
               indices=slice(None)) -> np.ndarray:
        """Region `number`'s masks of the frames `indices`, (n, H, W) float32 in [0, 1];
        given `size` (w, h), a mask of another size is one sentence, before decoding."""
        chosen = np.atleast_1d(np.arange(len(self.regions[number]))[indices])
        frames = [decode_mask(self._bytes(number, index),
                              f"mask of frame {index} of region {number + 1} of {self.source}",
                              size) for index in chosen]
        return np.stack(frames).astype(np.float32) / 255.0

    def __getitem__(self, key) -> np.ndarray:
        """masks[r], masks[r_index, frame_index] as on the (R, F, H, W) array."""
        regions, frames = (key + (slice(None),))[:2] if isinstance(key, tuple) else (
            key, slice(None))
        numbers = np.arange(len(self.regions))[regions]
        if np.ndim(numbers) == 0:
            return self.region(int(numbers), indices=frames)
        return np.stack([self.region(int(number), indices=frames) for number in numbers])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        masks = self[:, :]
        return masks if dtype is None else masks.astype(dtype)

    def _bytes(self, number: int, index: int) -> bytes:
        image = self.regions[number][index]
        return image.read_bytes() if isinstance(image, Path) else image
