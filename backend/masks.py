"""Reading and checking a region's masks, without torch (docs/method.md, "Regions").

The one place a mask is refused. The command line (`read_masks`), the server's submit
(backend/server/frames.py, which must not pull in torch: a Ray gateway does no GPU work)
and the engine (`MaskTally`, one frame at a time as it prepares the regions) all use
these, so each failure is the same one sentence.

A mask frame is grey levels, either uint8 0…255 (the smallest exact form: what a PNG
holds) or float in [0, 1]. A pixel belongs to its region where it is at least ½ of
white (`inside`: v ≥ 128 for uint8, v ≥ ½ for floats; k/255 ≥ ½ exactly when k ≥ 128),
so compression noise in a black mask is no region.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.errors import BadClipError, BadMaskError

REGION_THRESHOLD = 0.5  # a mask pixel at least this bright (of white) is inside its region
UINT8_THRESHOLD = 128  # the same for 0…255 levels: k/255 ≥ ½ ⇔ k ≥ 128


def inside(masks: np.ndarray) -> np.ndarray:
    """M = [mask ≥ ½ of white] as bool, any shape; uint8 levels or floats in [0, 1]."""
    masks = np.asarray(masks)
    if masks.dtype == np.uint8:
        return masks >= UINT8_THRESHOLD
    return masks >= REGION_THRESHOLD


def as_levels(masks: np.ndarray) -> np.ndarray:
    """Grey levels as uint8: uint8 as they are, floats m in [0, 1] as round(255·m) (on the
    same side of ½ as m: the PNG a server is sent)."""
    masks = np.asarray(masks)
    if masks.dtype == np.uint8:
        return masks
    return np.rint(masks * 255).astype(np.uint8)


def read_mask_levels(path: str | Path, frame_count: int, size: tuple[int, int]) -> np.ndarray:
    """One region's mask for a clip of `frame_count` frames of `size` = (width, height),
    as uint8 grey levels (F, H, W): a pixel's value is its brightest channel.

    `path`: a video file, a folder of numbered PNG/JPG frames, or one image used for
    every frame (then a read-only view of that one frame: no memory per frame).
    Checked by `check_masks`; raises BadMaskError with one sentence.
    """
    from backend.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, _read_frame_folder, _read_video_file

    path = Path(path)
    if not path.exists():
        raise BadMaskError(f"There is no mask at {path}; check the --mask path.")
    try:
        if path.is_dir():
            levels = _read_frame_folder(path).max(axis=-1)
        elif path.suffix.lower() in VIDEO_SUFFIXES:
            frames, _fps = _read_video_file(path)
            levels = frames.max(axis=-1)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as image:
                one = np.asarray(image.convert("RGB")).max(axis=-1)
            levels = np.broadcast_to(one, (frame_count, *one.shape))
        else:
            raise BadMaskError(f"The mask {path.name} is not a video, an image or a folder of "
                               "numbered PNG frames; give one of those.")
    except BadClipError as error:
        if isinstance(error, BadMaskError):
            raise
        raise BadMaskError(f"Could not read the mask {path.name}: {error}") from None
    except OSError as error:
        raise BadMaskError(f"Could not read the mask {path.name} ({type(error).__name__}); "
                           "check that it is a complete image, video or folder of PNGs.") from None
    check_masks(levels, frame_count, size, path.name)
    return levels


def read_masks(path: str | Path, frame_count: int, size: tuple[int, int]) -> np.ndarray:
    """`read_mask_levels` as float32 in [0, 1] (level / 255): (F, H, W)."""
    return read_mask_levels(path, frame_count, size).astype(np.float32) / 255.0


def check_mask_shape(shape: tuple[int, ...], frame_count: int, size: tuple[int, int],
                     name: str = "the mask") -> None:
    """Refuse, from its shape alone (nothing decoded), a region's masks (F, H, W) of the
    wrong frame count or size; `size` is the clip's (width, height)."""
    width, height = size
    if len(shape) != 3:
        raise BadMaskError(f"The mask {name} is not a sequence of grey frames (shape "
                           f"{tuple(shape)}); give one frame per clip frame.")
    if shape[0] != frame_count:
        raise BadMaskError(f"The mask {name} has {shape[0]} frames but the clip has "
                           f"{frame_count}; give one mask frame per clip frame, or one image "
                           "for all of them.")
    if tuple(shape[1:]) != (height, width):
        raise BadMaskError(f"The mask {name} is {shape[2]}x{shape[1]} but the clip "
                           f"is {width}x{height}; render the mask at the clip's size.")


class MaskTally:
    """The checks on a region's mask values, fed one frame (or a few) at a time, so a
    clip's masks are checked as they are read, never held whole for the check:

        add(frames)   frames (n, H, W) of one region: grey levels in range, else refused;
                      returns `inside(frames)`, the region's pixels (bool)
        finish()      refuses a region black in every frame fed (no subject) or white
                      over every pixel of every frame (no plate to keep)
    """

    def __init__(self, name: str = "the mask") -> None:
        self.name = name
        self.any_inside = False
        self.all_inside = True

    def add(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 and (not np.issubdtype(frames.dtype, np.floating) or not (
                np.isfinite(frames).all() and (frames.size == 0 or (
                    frames.min() >= 0 and frames.max() <= 1)))):
            raise BadMaskError(f"The mask {self.name} holds values outside 0 to 1; send grey "
                               "levels scaled to 0 (plate) to 1 (subject).")
        pixels = inside(frames)
        self.any_inside = self.any_inside or bool(pixels.any())
        self.all_inside = self.all_inside and bool(pixels.all())
        return pixels

    def finish(self) -> None:
        if not self.any_inside:
            raise BadMaskError(f"The mask {self.name} is black in every frame, so it marks no "
                               "subject; paint the subject white.")
        if self.all_inside:
            raise BadMaskError(f"The mask {self.name} is white over every pixel of every frame, "
                               "so no plate would be kept; mark only the subject.")


def check_masks(masks: np.ndarray, frame_count: int, size: tuple[int, int],
                name: str = "the mask") -> None:
    """Refuse a region's masks (F, H, W) the edit cannot use, with one sentence: the
    wrong frame count or size, not grey levels (uint8, or floats in [0, 1]), black
    everywhere (no subject) or white everywhere (no plate to keep). `size` is the clip's
    (width, height). Checked a frame at a time (no copy of the whole mask is made)."""
    masks = np.asarray(masks)
    check_mask_shape(masks.shape, frame_count, size, name)
    tally = MaskTally(name)
    for frame in masks:
        tally.add(frame)
    tally.finish()


def check_region_masks_shape(shape: tuple[int, ...], frame_count: int,
                             size: tuple[int, int]) -> None:
    """`check_mask_shape` for each region of an edit's RegionMasks of `shape` (R, F, H, W)."""
    if len(shape) != 4 or shape[0] == 0:
        raise BadMaskError(f"The masks of an edit must be regions × frames × height × width, "
                           f"not shape {tuple(shape)}; give at least one mask per region.")
    for index in range(shape[0]):
        check_mask_shape(shape[1:], frame_count, size, region_name(index))


def region_name(index: int) -> str:
    """How a sentence names region `index` of an edit (from 0): "1", "2", …"""
    return f"{index + 1}"


def check_region_masks(masks: np.ndarray, frame_count: int, size: tuple[int, int]) -> None:
    """`check_masks` for each region of an edit's RegionMasks (R, F, H, W)."""
    masks = np.asarray(masks)
    check_region_masks_shape(masks.shape, frame_count, size)
    for index, region in enumerate(masks):
        check_masks(region, frame_count, size, region_name(index))
