"""The one root of Understudy's errors, the registry of their codes, and the settings error.

Every failure a user can cause or fix is an UnderstudyError: the engine's
(backend/errors.py), the server's, the cluster's, the client's (ClientError,
shared/client.py), the protocol's (ProtocolError, shared/protocol.py) and the Blender
extension's (UserError, blender_addon/rules/errors.py). `str(error)` is the one sentence to
show; `code` is its word in the registry of error codes (ErrorCode, below),
the same word whichever layer raised it or carried it across a network.

Standard library only, no imports from the rest of shared/: the extension vendors this
package, and shared/protocol.py builds on this module.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The registry of error codes: every `code` an UnderstudyError can carry, whichever
    layer raises it (docs/protocol.md §10). Each exception class names its member's
    value as its `code`; tests/test_errors.py checks that every class's code is here.
    """

    # Envelope and request checks (the server's reply to a malformed or refused request).
    BAD_HEADER = "bad_header"
    PROTOCOL_VERSION = "protocol_version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"
    BAD_JOB_ID = "bad_job_id"
    BAD_SETTINGS = "bad_settings"
    BAD_FRAMES = "bad_frames"
    BAD_CLIP = "bad_clip"
    BAD_MASK = "bad_mask"  # a region's mask frames: wrong count or size, unreadable, empty, all white
    BAD_REFERENCE = "bad_reference"  # a reference image: unreadable, too small or large, too many, or a backbone without any
    TOO_MANY_FRAMES = "too_many_frames"
    TOO_LARGE = "too_large"
    QUEUE_FULL = "queue_full"
    TOO_BIG_FOR_GPU = "too_big_for_gpu"  # the memory plan: it cannot fit even with every saver
    STORE_UNAVAILABLE = "store_unavailable"
    JOB_EXISTS = "job_exists"
    UNKNOWN_JOB = "unknown_job"
    DAMAGED = "damaged"  # the server's copy of the job is damaged; the message names where it lies
    NOT_READY = "not_ready"
    JOB_FAILED = "job_failed"
    JOB_CANCELLED = "job_cancelled"
    INTERRUPTED = "interrupted"
    INTERNAL = "internal"
    # A job's own failure, as the engine (or the process running it) raises it; the
    # server sends it in the job's error event and status.
    MODEL_MISSING = "model_missing"
    OUT_OF_MEMORY = "out_of_memory"
    CANCELLED = "cancelled"
    WORKER_LOST = "worker_lost"
    GANG_STALLED = "gang_stalled"  # a collective of a gang of GPUs did not complete in its timeout
    BAD_SIDECAR = "bad_sidecar"  # a result's record that this side cannot read
    # Raised where they happen and never sent: a bad server or cluster setup (at start),
    # and what a client finds on its own side of the connection.
    ERROR = "error"  # an UnderstudyError without a more specific class
    SERVER_CONFIG = "server_config"
    CLUSTER_CONFIG = "cluster_config"
    CLIENT_ERROR = "client_error"
    SERVER_UNAVAILABLE = "server_unavailable"
    AUTHENTICATION_FAILED = "authentication_failed"
    BAD_KEY_FILE = "bad_key_file"
    REJECTED = "rejected"
    WAIT_TIMEOUT = "wait_timeout"


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
