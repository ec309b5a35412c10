"""Errors a user can cause or fix.

Every exception here carries one sentence that says what went wrong and what to do;
the command line prints it without a traceback and the server sends it as an error
reply with the class's `code`.
"""


class UnderstudyError(Exception):
    """A failure the user can act on; `str(error)` is the sentence to show."""

    code = "error"


class BadClipError(UnderstudyError):
    """The input video cannot be used (unreadable, empty, too short, absurd size)."""

    code = "bad_clip"


class BadSettingsError(UnderstudyError):
    """A setting has the wrong type or an out-of-range value."""

    code = "bad_settings"


class ModelNotFoundError(UnderstudyError):
    """The model weights are neither local nor downloadable."""

    code = "model_missing"


class OutOfMemoryError(UnderstudyError):
    """The GPU ran out of memory; the message names the settings that help."""

    code = "out_of_memory"


class JobCancelled(UnderstudyError):
    """The caller asked to stop; raised between steps."""

    code = "cancelled"
