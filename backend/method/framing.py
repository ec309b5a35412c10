"""Framing: which size the model runs at for a clip of a given shape, and where.

Three modes (docs/method.md, "Framing and resolution"):

    fit      the clip's own aspect ratio within the model's pixel budget
             (576×320 = 184,320 pixels for ZeroScope): 16:9 stays 576×320, 9:16
             becomes 320×576, 4:3 becomes 496×368
    crop     a centred box of the model's native aspect ratio is cut from the clip,
             edited at the native size, and put back where it was
    stretch  the whole frame is squeezed to the native size, whatever its shape

`choose_framing` decides, once per edit, the box of the source the model sees and the
sizes each stage runs at; the sidecar records it (`Framing.to_dict`). The upscaling
stage keeps the box's aspect ratio within its own pixel budget (1024×576 = 589,824 for
ZeroScope XL), except under stretch, where it too runs at its native size.

Sizes are in pixels, (width, height). Every side is a whole number of latent cells
(8 px for ZeroScope's VAE). The UNet needs nothing coarser: where a side is not a
multiple of its total down-sampling (64 px), its up-samplers match the skip
connections' sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from backend.video import resize_frames
from shared.settings import FRAMINGS

Size = tuple[int, int]  # (width, height) in pixels
MAX_ASPECT = 4.0  # wider or taller than 4:1 leaves too few latent cells on the short side


@dataclass(frozen=True)
class Box:
    """A rectangle of a frame in pixels: columns [left, right), rows [top, bottom)."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top


def fit_size(width: int, height: int, budget: int, cell: int) -> tuple[int, int]:
    """The largest size whose sides are multiples of `cell`, whose area is at most
    `budget` pixels, and whose aspect ratio is that of width × height within one cell.

    "Within one cell": at each height h (a multiple of `cell`), the width w is the exact
    width h·width/height rounded down or up to a multiple of `cell` (so they differ by
    less than a cell, or not at all), and h differs from w·height/width by at most
    `cell`. Of such sizes the one with the largest area wins; on a tie, the one nearest
    the exact aspect ratio. (3:2 in 64×64 is therefore 72×48 exactly, not 80×48.)
    """
    aspect = width / height
    best: tuple[float, float, int, int] | None = None
    for rows in range(cell, math.isqrt(budget * 64) + cell, cell):
        exact_columns = rows * aspect
        for columns in {math.floor(exact_columns / cell) * cell, math.ceil(exact_columns / cell) * cell}:
            if columns < cell or columns * rows > budget:
                continue
            if abs(columns - exact_columns) > cell or abs(rows - columns / aspect) > cell:
                continue
            candidate = (columns * rows, -abs(columns / rows - aspect), columns, rows)
            if best is None or candidate > best:
                best = candidate
    if best is None:
        raise ValueError(f"no size of {cell}-pixel cells within {budget} pixels has aspect {aspect:.3f}")
    return best[2], best[3]


def centre_crop_box(width: int, height: int, aspect: float) -> Box:
    """The largest centred box of a width × height frame with the given aspect ratio."""
    if width / height > aspect:  # the frame is wider: cut its sides
        box_width = min(width, round(height * aspect))
        left = (width - box_width) // 2
        return Box(left, 0, left + box_width, height)
    box_height = min(height, round(width / aspect))
    top = (height - box_height) // 2
    return Box(0, top, width, top + box_height)


def check_aspect(width: int, height: int) -> None:
    """Raise ValueError with one sentence for a frame too elongated to fit."""
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT:
        raise ValueError(
            f"The clip is {width}x{height}, more than {MAX_ASPECT:g} times as wide as it is "
            f"high (or the reverse); use framing 'crop' (--framing crop) to edit its centre.")


@dataclass(frozen=True)
class Framing:
    """How one clip is framed: the box of the source the model sees, and the sizes.

    The result covers `box` of the source frame: the whole frame under fit and stretch,
    the centred crop under crop.
    """

    mode: str
    source_size: Size
    box: Box
    model_size: Size
    upscale_size: Size | None  # None: no upscaling stage

    @property
    def result_size(self) -> Size:
        """The size of the frames the edit returns: the last stage's."""
        return self.upscale_size or self.model_size

    def to_dict(self) -> dict:
        """The sidecar's `framing`: every size as [width, height], the box as
        [left, top, right, bottom] in source pixels."""
        return {
            "mode": self.mode,
            "source_size": list(self.source_size),
            "crop_box": [self.box.left, self.box.top, self.box.right, self.box.bottom],
            "model_size": list(self.model_size),
            "upscale_size": list(self.upscale_size) if self.upscale_size else None,
            "result_size": list(self.result_size),
        }


def choose_framing(mode: str, source_size: Size, native_size: Size, cell: int,
                 upscale_native: Size | None = None) -> Framing:
    """Where and at which sizes a source_size clip is edited.

    native_size: the first stage's native size (its area is fit's pixel budget);
    upscale_native: the upscaling stage's, or None for no upscaling.
    Raises ValueError with one sentence for a frame too elongated to fit.
    """
    if mode not in FRAMINGS:
        raise ValueError(f"Framing {mode!r} is not one of {', '.join(FRAMINGS)}.")
    width, height = source_size
    whole = Box(0, 0, width, height)
    if mode == "fit":
        check_aspect(width, height)
        box, model_size = whole, fit_size(width, height, _area(native_size), cell)
    elif mode == "crop":
        box, model_size = centre_crop_box(width, height, native_size[0] / native_size[1]), native_size
    else:
        box, model_size = whole, native_size
    upscale_size = None
    if upscale_native is not None:
        upscale_size = (upscale_native if mode == "stretch"
                        else fit_size(box.width, box.height, _area(upscale_native), cell))
    return Framing(mode, (width, height), box, tuple(model_size), upscale_size)


def frames_for_model(frames: np.ndarray, framing: Framing) -> np.ndarray:
    """(F, H, W, 3) source frames → (F, h, w, 3) at the model's size: the box, resized."""
    box = framing.box
    inside = np.ascontiguousarray(frames[:, box.top:box.bottom, box.left:box.right])
    return resize_frames(inside, *framing.model_size)


def paste_into_box(background: np.ndarray, result: np.ndarray, box: Box) -> np.ndarray:
    """The source frames with the result resized into `box`: (F, H, W, 3) each.

    What the command line writes under crop: outside the box every pixel is the
    source's, inside it the edit, so the file lies exactly over the source clip.
    """
    out = background.copy()
    out[:, box.top:box.bottom, box.left:box.right] = resize_frames(result, box.width, box.height)
    return out


def _area(size: Size) -> int:
    return size[0] * size[1]
