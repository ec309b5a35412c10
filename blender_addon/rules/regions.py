"""Keep the plate: the panel's region (a Mask or a matte strip), checked before anything
is rendered, and its rendered frames, checked before anything is sent.

Plain Python (no bpy).
"""

from __future__ import annotations

from dataclasses import dataclass

from .channels import Span
from .errors import UserError

# What the panel's region is: nothing (the whole frame changes), a Mask data-block, or a
# strip of the timeline used as a matte (white = subject).
REGION_NONE, REGION_MASK, REGION_STRIP = "NONE", "MASK", "STRIP"
REGION_KINDS = (
    (REGION_NONE, "None", "Change the whole frame"),
    (REGION_MASK, "Mask", "A Mask data-block outlines the subject (white = subject)"),
    (REGION_STRIP, "Matte strip", "A strip of the timeline is the subject's matte (white = "
                                  "subject), e.g. a mask strip or a rendered matte"),
)

# A mask pixel is the subject where its grey level is at least half way to white: the
# engine's rule (backend/masks.py REGION_THRESHOLD), checked before sending.
SUBJECT_GREY = 128


@dataclass(frozen=True)
class Region:
    """The panel's region for one transfer: what it is and its name (for sentences)."""

    kind: str
    name: str

    @property
    def label(self) -> str:
        return f"the mask {self.name!r}" if self.kind == REGION_MASK else f"the matte strip {self.name!r}"


def check_region(kind: str, name: str, source_name: str, source: Span,
                 matte: Span | None = None, shapes: int = 0) -> Region | None:
    """The region to render with the source, or None; UserError (one sentence) for a
    region that cannot mark the subject, before anything is rendered.

    kind MASK: `name` is the Mask data-block ("" when none is chosen), `shapes` its
    spline points. kind STRIP: `name` is the strip, `matte` its visible frames (None:
    no such strip); it must show every source frame (it may be muted: a matte is
    usually kept out of the edit, and it is rendered alone all the same).
    """
    if kind == REGION_NONE:
        return None
    if kind == REGION_MASK:
        if not name:
            raise UserError("The region is set to Mask but no mask is chosen; pick the Mask "
                            "that outlines the subject, or set the region to None.")
        if shapes == 0:
            raise UserError(f"The mask {name!r} has no shapes, so it marks no subject; draw "
                            f"the subject's outline in the Mask editor.")
        return Region(kind, name)
    if not name or matte is None:
        raise UserError(f"The matte strip {name!r} is not in this scene's timeline; pick the "
                        f"strip that shows the subject in white, or set the region to None."
                        if name else "The region is set to Matte strip but no strip is chosen; "
                        "pick the strip that shows the subject in white, or set the region to "
                        "None.")
    if name == source_name:
        raise UserError(f"{name!r} is the strip being transferred, so it cannot be its own "
                        f"matte; pick a strip that shows the subject in white.")
    if matte.start > source.start or matte.end < source.end:
        raise UserError(f"The matte strip {name!r} shows frames {matte.start}-{matte.end - 1} "
                        f"but {source_name!r} shows frames {source.start}-{source.end - 1}; make "
                        f"the matte cover every frame of the strip.")
    return Region(kind, name)


@dataclass(frozen=True)
class MatteFrame:
    """What the checks need of one rendered region frame: its size and whether it marks
    some subject (a pixel ≥ SUBJECT_GREY) and some plate (a pixel below it)."""

    width: int
    height: int
    subject: bool
    plate: bool

    @classmethod
    def of(cls, grey) -> MatteFrame:
        """From (H, W) uint8 grey levels (numpy), white = subject."""
        inside = grey >= SUBJECT_GREY
        return cls(int(grey.shape[1]), int(grey.shape[0]), bool(inside.any()),
                   not bool(inside.all()))


def check_region_frames(region: Region, frames: list[MatteFrame], size: tuple[int, int]) -> None:
    """UserError (one sentence) unless the rendered region fits the frames sent (size
    (w, h)), marks a subject in some frame and keeps a plate in some frame: black in
    every frame, or white over every pixel of every frame, is refused before anything
    is sent, as the server refuses it."""
    label = region.label[0].upper() + region.label[1:]
    for index, frame in enumerate(frames):
        if (frame.width, frame.height) != tuple(size):
            raise UserError(f"Frame {index + 1} of {region.label} rendered at {frame.width}x"
                            f"{frame.height}, not at the strip's {size[0]}x{size[1]}; give the "
                            f"matte the strip's size.")
    if not any(frame.subject for frame in frames):
        raise UserError(f"{label} is black in every frame of the strip, so it marks no "
                        f"subject; paint the subject white where the strip shows it.")
    if not any(frame.plate for frame in frames):
        raise UserError(f"{label} is white over the whole picture in every frame, so no plate "
                        f"would be kept; mark only the subject, or set the region to None to "
                        f"change the whole frame.")
