"""Errors a user can cause or fix.

Every exception here carries one sentence that says what went wrong and what to do;
the command line prints it without a traceback and the server sends it as an error
reply with the class's `code`. The root class and the settings error live in
shared/errors.py, which the Blender extension can import.
"""

from shared.errors import BadSettingsError, UnderstudyError

__all__ = ["BadClipError", "BadSettingsError", "JobCancelled", "ModelNotFoundError",
           "OutOfMemoryError", "UnderstudyError"]


class BadClipError(UnderstudyError):
    """The input video cannot be used (unreadable, empty, too short, absurd size)."""

    code = "bad_clip"


class ModelNotFoundError(UnderstudyError):
    """The model weights are neither local nor downloadable."""

    code = "model_missing"


class OutOfMemoryError(UnderstudyError):
    """The GPU ran out of memory; the message names the settings that help."""

    code = "out_of_memory"


class JobCancelled(UnderstudyError):
    """The caller asked to stop; raised between steps."""

    code = "cancelled"
