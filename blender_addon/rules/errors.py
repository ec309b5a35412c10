"""The extension's error: one sentence the user can act on, and the reason of a file error.

Plain Python (no bpy). The extension's own failures and the client's (ClientError) share
one root (shared/errors.py UnderstudyError), so one handler catches both; connection/link.py
keeps the client's `code`, so a caller can tell one failure from another.
"""

from __future__ import annotations

from ..vendored import shared_module

ERRORS = shared_module("errors")  # shared/errors.py: the one root of Understudy's errors


class UserError(ERRORS.UnderstudyError):
    """Something the user can fix; `str(error)` is the one sentence Blender shows.

    The extension's own failures and the client's (ClientError) share one root, so one
    handler catches both."""


def os_reason(error: OSError) -> str:
    """The short reason of a file-system error ("Permission denied"), for a sentence."""
    return error.strerror or str(error)
