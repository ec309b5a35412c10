"""Errors a user can cause or fix.

Every exception here carries one sentence that says what went wrong and what to do;
the command line prints it without a traceback and the server sends it as an error
reply with the class's `code` (a member of the registry, shared/errors.py's
ErrorCode). The root class, the registry and the settings error live in
shared/errors.py, which the Blender extension can import.
"""

from shared.errors import BadSettingsError, ErrorCode, UnderstudyError

__all__ = ["BadClipError", "BadMaskError", "BadReferenceError", "BadSettingsError", "JobCancelled", "ModelNotFoundError",
           "OutOfMemoryError", "TooBigForGpuError", "UnderstudyError"]


class BadClipError(UnderstudyError):
    """The input video cannot be used (unreadable, empty, too short, absurd size)."""

    code = ErrorCode.BAD_CLIP


class BadMaskError(BadClipError):
    """A region's mask cannot be used with its clip (unreadable, wrong frame count or
    size, black everywhere, white everywhere); backend/method/regions.py checks."""

    code = ErrorCode.BAD_MASK  # the code a server's refusal of the same mask carries


class BadReferenceError(UnderstudyError):
    """A reference image cannot be used (unreadable, too small or too large, more than
    the backbone takes, or a backbone that takes none); backend/references.py checks."""

    code = ErrorCode.BAD_REFERENCE


class ModelNotFoundError(UnderstudyError):
    """The model weights are neither local nor downloadable."""

    code = ErrorCode.MODEL_MISSING


class OutOfMemoryError(UnderstudyError):
    """The GPU ran out of memory; the message names the settings that help."""

    code = ErrorCode.OUT_OF_MEMORY


class TooBigForGpuError(UnderstudyError):
    """The memory plan says the edit cannot fit the GPU even with every saver on; the
    message names what would make it fit."""

    code = ErrorCode.TOO_BIG_FOR_GPU


class JobCancelled(UnderstudyError):
    """The caller asked to stop; raised between steps."""

    code = ErrorCode.CANCELLED
