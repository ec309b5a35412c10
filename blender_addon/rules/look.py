"""The new subject's look from a picture: the panel's Look (an image data-block, an image
strip at the current frame, or a file), checked before anything is rendered.

A look goes with the job as one reference image (docs/protocol.md §4, References) to a
server whose model takes references (Wan VACE; its hello's `max_references`). Plain
Python (no bpy).
"""

from __future__ import annotations

from ..vendored import shared_module
from .errors import UserError
from .panel_settings import SETTINGS

PROTOCOL = shared_module("protocol")  # shared/protocol.py: the refusal's one sentence

# What the panel's Look is: nothing (the prompt alone), an Image data-block, the image
# strip's picture at the current frame, or an image file.
LOOK_NONE, LOOK_IMAGE, LOOK_STRIP, LOOK_FILE = "NONE", "IMAGE", "STRIP", "FILE"
LOOK_KINDS = (
    (LOOK_NONE, "None", "The prompt alone says what the new subject looks like"),
    (LOOK_IMAGE, "Image", "An Image data-block shows the new subject's look"),
    (LOOK_STRIP, "Image strip", "An image strip of the timeline, at the current frame, shows "
                                "the new subject's look"),
    (LOOK_FILE, "File", "A picture file (PNG, JPEG) shows the new subject's look"),
)


def server_takes(hello: dict | None) -> int:
    """How many reference images the server's model takes (its hello's max_references;
    0 when it takes none or does not say)."""
    value = (hello or {}).get("max_references")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def look_refusal(hello: dict | None, has_look: bool) -> str | None:
    """The one sentence when the panel has a Look and the server's model takes no
    reference (the server and the client say the same), else None."""
    if has_look and not server_takes(hello):
        return PROTOCOL.references_refused(1, 0)
    return None


def check_look(hello: dict, has_look: bool) -> None:
    """Refuse, before anything is rendered, a Look the server could not take."""
    if problem := look_refusal(hello, has_look):
        raise UserError(problem)


def check_look_size(width: int, height: int, name: str) -> None:
    """Refuse a look picture with a side outside the range the server takes
    (shared/settings.py), in one sentence naming it."""
    low, high = SETTINGS.MIN_REFERENCE_SIDE, SETTINGS.MAX_REFERENCE_SIDE
    if min(width, height) < low:
        raise UserError(f"The look {name} is {width}x{height} pixels, too small to give a "
                        f"look; use a picture at least {low} pixels on each side.")
    if max(width, height) > high:
        raise UserError(f"The look {name} is {width}x{height} pixels; scale it down to at most "
                        f"{high} pixels on each side.")


def look_text(kind: str, name: str) -> str:
    """What the Look is, by name, for the panel."""
    if kind == LOOK_NONE:
        return "The prompt alone gives the look"
    if not name:
        return "Pick the picture of the new subject's look"
    what = {LOOK_IMAGE: "the image", LOOK_STRIP: "the image strip", LOOK_FILE: "the file"}[kind]
    return f"The look from {what} {name!r}"
