"""The root of the errors a user can cause or fix, and the settings error.

They live here, beside the settings they guard, because the Blender extension checks
settings too and cannot import the backend. The backend's other errors
(backend/errors.py) derive from UnderstudyError.
"""


class UnderstudyError(Exception):
    """A failure the user can act on; `str(error)` is the sentence to show."""

    code = "error"


class BadSettingsError(UnderstudyError):
    """A setting has the wrong type or an out-of-range value."""

    code = "bad_settings"
