"""How the result sits in the edit: the source's transform, crop, flips and blending.

Two ways to send a strip, chosen by its type:

- PICTURE (movie and image strips): the strip's own picture is sent, untransformed
  and uncropped, at its media size; the result strip then takes the source's
  transform, crop, flips, blend mode and opacity. The result frames come back at the
  model's size, so the result's scale is the source's times media size / result size
  on each axis, and its crop is the source's crop in result pixels: the result covers
  the area the source covered. The strip's colour settings and modifiers are part of
  the picture sent (they are not copied, or they would apply twice).
- CANVAS (scene, meta, text and effect strips): what the strip draws over the whole
  canvas is sent, with its own transform applied and an alpha channel; the result
  covers the canvas (stretched back to its shape), keeps that alpha where the source
  showed nothing, and takes the source's blend mode and opacity.

In both, the frames are rendered with the source's blend mode set to Replace and its
opacity to 1 (restored afterwards), so blending is applied once, by the result strip.

Framing (the server's `framing` setting, recorded in its sidecar): under `fit` and
`stretch` the result covers the whole frame sent, whatever its own size (`fit` keeps
the frame's aspect ratio within a latent cell, so its pixels stay square). Under
`crop` it covers only a centred box of that frame: each result frame is first put on a
transparent canvas of the whole frame's shape (result_canvas), at the result's own
scale so none of its pixels is resampled, and that canvas is then placed as above, so
the result lies over the box and shows nothing outside it.
Plain Python: strip_io reads and writes the Blender values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

PICTURE = "picture"
CANVAS = "canvas"
PICTURE_TYPES = frozenset({"MOVIE", "IMAGE"})


def mode_for(strip_type: str) -> str:
    return PICTURE if strip_type in PICTURE_TYPES else CANVAS


@dataclass
class Placement:
    """The source's place in the edit, recorded when it is sent (saved with the job)."""

    mode: str
    width: int  # PICTURE: the media's pixel size; CANVAS: the canvas size
    height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    rotation: float = 0.0
    origin: tuple[float, float] = (0.5, 0.5)
    filter: str = ""
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # min_x, max_x, min_y, max_y
    flip_x: bool = False
    flip_y: bool = False
    blend_type: str = "ALPHA_OVER"
    blend_alpha: float = 1.0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Placement:
        values = json.loads(text)
        values["origin"] = tuple(values["origin"])
        values["crop"] = tuple(values["crop"])
        return cls(**values)


def result_look(placement: Placement, result_width: int, result_height: int) -> dict:
    """The result strip's transform, crop, flips and blending, for frames of this size.

    The size is read from the result's frames, so it holds for whatever size the
    backend returns (today the panel's width x height; with the framing issue's `fit`
    the source's own shape).
    """
    factor_x = placement.width / result_width
    factor_y = placement.height / result_height
    look = {"blend_type": placement.blend_type, "blend_alpha": placement.blend_alpha}
    if placement.mode == CANVAS:
        return {**look, "scale_x": factor_x, "scale_y": factor_y, "offset_x": 0.0,
                "offset_y": 0.0, "rotation": 0.0, "origin": (0.5, 0.5), "filter": placement.filter,
                "crop": (0, 0, 0, 0), "flip_x": False, "flip_y": False}
    min_x, max_x, min_y, max_y = placement.crop
    return {**look, "scale_x": placement.scale_x * factor_x, "scale_y": placement.scale_y * factor_y,
            "offset_x": placement.offset_x, "offset_y": placement.offset_y,
            "rotation": placement.rotation, "origin": placement.origin, "filter": placement.filter,
            "crop": (round(min_x / factor_x), round(max_x / factor_x), round(min_y / factor_y),
                     round(max_y / factor_y)),
            "flip_x": placement.flip_x, "flip_y": placement.flip_y}


@dataclass(frozen=True)
class Canvas:
    """A transparent frame of the sent frame's shape, at the result's scale, and where
    on it a result frame (result_width x result_height) goes."""

    width: int
    height: int
    left: int
    top: int
    result_width: int
    result_height: int


def result_canvas(framing: object, result_width: int, result_height: int) -> Canvas | None:
    """Where a result that covers only a box of the frame sent goes; None when it covers
    the whole frame (fit, stretch, or a sidecar without framing, as older servers send).

    `framing` is the sidecar's record: "source_size" [w, h] of the frames sent and
    "crop_box" [left, top, right, bottom] in their pixels.
    """
    if not isinstance(framing, dict):
        return None
    try:
        source_width, source_height = (int(value) for value in framing["source_size"])
        left, top, right, bottom = (int(value) for value in framing["crop_box"])
    except (KeyError, TypeError, ValueError):
        return None
    if not 0 <= left < right <= source_width or not 0 <= top < bottom <= source_height:
        return None
    if (left, top, right, bottom) == (0, 0, source_width, source_height):
        return None
    scale_x, scale_y = result_width / (right - left), result_height / (bottom - top)
    canvas_left, canvas_top = _round(left * scale_x), _round(top * scale_y)
    return Canvas(max(_round(source_width * scale_x), canvas_left + result_width),
                  max(_round(source_height * scale_y), canvas_top + result_height),
                  canvas_left, canvas_top, result_width, result_height)


def _round(value: float) -> int:
    """Half up (Python's round() goes to even, which can drift a pixel between sides)."""
    return math.floor(value + 0.5)
