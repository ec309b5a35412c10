"""Reading and checking reference images, without torch (docs/method.md, "Reference images").

A reference image gives the new subject's look from a picture (a product shot, a model
sheet): a backbone that takes references (Wan VACE; its facts' `max_references`)
conditions the edit on it. The one place a reference is refused: the command line
(`read_reference`), the server's submit (backend/server/frames.py, torch-free) and the
engine (`check_references`, before any model work) all use these, so each failure is
the same one sentence (BadReferenceError).

A reference is (H, W, 3) uint8 RGB, each side within MIN_REFERENCE_SIDE …
MAX_REFERENCE_SIDE pixels (shared/settings.py); the backbone fits it into the edit's
frame itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backend.errors import BadReferenceError
from shared.settings import MAX_REFERENCE_SIDE, MIN_REFERENCE_SIDE, REFERENCE_FLAG


def reference_name(index: int) -> str:
    """How sentences name the reference at `index` (0-based): "reference 1"."""
    return f"reference {index + 1}"


def side_problem(width: int, height: int, what: str) -> str | None:
    """The one sentence for a reference of width × height outside the sides allowed, else None."""
    if min(width, height) < MIN_REFERENCE_SIDE:
        return (f"The {what} is {width}x{height} pixels, too small to give a look; use an "
                f"image at least {MIN_REFERENCE_SIDE} pixels on each side.")
    if max(width, height) > MAX_REFERENCE_SIDE:
        return (f"The {what} is {width}x{height} pixels; scale it down to at most "
                f"{MAX_REFERENCE_SIDE} pixels on each side.")
    return None


def count_problem(count: int, max_references: int, backbone: str) -> str | None:
    """The one sentence for `count` references to a backbone that takes `max_references`
    (0: none), else None."""
    if count and not max_references:
        return (f"The {backbone} backbone takes no reference image; drop {REFERENCE_FLAG}, "
                f"or run a Wan VACE model (such as Wan-AI/Wan2.1-VACE-1.3B-diffusers).")
    if count > max_references:
        return (f"{count} reference images were given; the {backbone} backbone takes at "
                f"most {max_references}.")
    return None


def fingerprint(image: np.ndarray) -> dict[str, int | str]:
    """What a result's sidecar records of a reference: its size and the SHA-256 of its
    RGB pixels (row-major uint8), so the same picture is known again in any file format."""
    import hashlib

    image = np.ascontiguousarray(image)
    return {"width": int(image.shape[1]), "height": int(image.shape[0]),
            "sha256": hashlib.sha256(image.tobytes()).hexdigest()}


def check_reference(image: np.ndarray, what: str) -> np.ndarray:
    """`image` as a reference: (H, W, 3) uint8 within the sides allowed, else
    BadReferenceError with one sentence."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise BadReferenceError(
            f"The {what} is not an RGB picture ({image.dtype}, shape {image.shape}); give an "
            f"RGB image.")
    if problem := side_problem(image.shape[1], image.shape[0], what):
        raise BadReferenceError(problem)
    return image


def check_references(images: Sequence[np.ndarray], max_references: int,
                     backbone: str) -> list[np.ndarray]:
    """Every reference of an edit, checked: their count for the backbone, then each image."""
    if problem := count_problem(len(images), max_references, backbone):
        raise BadReferenceError(problem)
    return [check_reference(image, reference_name(index)) for index, image in enumerate(images)]


def read_reference(path: str | Path) -> np.ndarray:
    """A reference image file (PNG, JPEG, WebP: anything Pillow reads) as (H, W, 3) uint8
    RGB, checked; BadReferenceError with one sentence for anything unusable. The size is
    read from the header first, so an oversized picture is refused before it is decoded."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise BadReferenceError(f"There is no reference image at {path}; check the "
                                f"{REFERENCE_FLAG} path.")
    what = f"reference image {path.name}"
    try:
        with Image.open(path) as image:
            if problem := side_problem(*image.size, what):
                raise BadReferenceError(problem)
            pixels = np.asarray(image.convert("RGB"))
    except BadReferenceError:
        raise
    except Exception as error:  # Pillow raises many types for broken or foreign files
        raise BadReferenceError(
            f"The {what} is not a readable image ({type(error).__name__}); give a PNG or "
            f"JPEG picture.") from None
    return check_reference(pixels, what)
