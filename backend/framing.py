"""Framing: which size the model runs at for a clip of a given shape, and where.

Three modes (docs/method.md, "Framing and resolution"):

    fit      the clip's own aspect ratio within the model's pixel budget
             (576×320 = 184,320 pixels for ZeroScope): 16:9 stays 576×320, 9:16
             becomes 320×576, 4:3 becomes 496×368
    crop     a centred box of the model's native aspect ratio is cut from the clip,
             edited at the native size, and put back where it was
    stretch  the whole frame is squeezed to the native size, whatever its shape

Sizes are in pixels, (width, height). Every side is a whole number of latent cells
(8 px for ZeroScope's VAE). The UNet needs nothing coarser: where a side is not a
multiple of its total down-sampling (64 px), its up-samplers match the skip
connections' sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FRAMINGS = ("fit", "crop", "stretch")
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

    "Within one cell": at the chosen height h, the chosen width w differs from the
    exact width h·width/height by at most `cell` pixels, and the same with the roles
    of the sides swapped. Of several such sizes the one with the largest area wins;
    on a tie, the one nearest the exact aspect ratio.
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
            f"high (or the reverse); use --framing crop to edit its centre.")
