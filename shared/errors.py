"""The one root of Understudy's errors, and the settings error.

Every failure a user can cause or fix is an UnderstudyError: the engine's
(backend/errors.py), the server's, the cluster's, the client's (ClientError,
shared/client.py), the protocol's (ProtocolError, shared/protocol.py) and the Blender
extension's (UserError, blender_addon/plan.py). `str(error)` is the one sentence to
show; `code` is its word in the registry of error codes (ErrorCode, shared/protocol.py),
the same word whichever layer raised it or carried it across a network.

Standard library only, no imports from the rest of shared/: the extension vendors this
package, and shared/protocol.py builds on this module.
"""

from __future__ import annotations


class UnderstudyError(Exception):
    """A failure the user can act on; `str(error)` is the sentence to show.

    `code` is the class's registered code unless a carrier (a client reading an error
    reply, a gateway reading a Ray worker's failure) passes the code it received.
    """

    code: str = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadSettingsError(UnderstudyError):
    """A setting has the wrong type or an out-of-range value."""

    code = "bad_settings"
