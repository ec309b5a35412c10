"""A job record's status and phase: every word the extension stores or compares, in one place.

The server's vocabulary (job states, event types, error codes) is shared/protocol.py's
str enums; a record's status takes the server's words for what the server decides
(running, done, failed, cancelled) and adds the extension's own for what happens here:
rendering before anything is sent, submitted until the server reports, placing while
the result's frames are prepared, unplaced when its strip could not be added.
Plain Python (no bpy): a StrEnum member *is* its text, so it is stored in a
StringProperty and compared with the text read back.
"""

from __future__ import annotations

from enum import StrEnum

from ..vendored import shared_module

PROTOCOL = shared_module("protocol")  # shared/protocol.py: JobState, EventType


class Status(StrEnum):
    """A job record's status (interface/props.py UnderstudyJob.status)."""

    RENDERING = "rendering"  # the strip's frames are being rendered; nothing is sent yet
    SUBMITTED = "submitted"  # the server has the job and has not said it runs it
    RUNNING = PROTOCOL.JobState.RUNNING.value
    PLACING = "placing"  # the result's frames are here and are being prepared for its strip
    UNPLACED = "unplaced"  # the result's frames are here but its strip could not be added
    DONE = PROTOCOL.JobState.DONE.value
    FAILED = PROTOCOL.JobState.FAILED.value
    CANCELLED = PROTOCOL.JobState.CANCELLED.value


# The server has the job and has not finished it: it is followed and can be cancelled there.
ACTIVE = frozenset({Status.SUBMITTED, Status.RUNNING})
# Finished with no frames to place (nothing of the job is left to move or collect).
NO_RESULT = frozenset({Status.FAILED, Status.CANCELLED})


class Phase(StrEnum):
    """What a job is doing within its status (interface/props.py UnderstudyJob.phase); the server's
    progress events bring their own phases (invert, guide, ...), shown as they come."""

    NONE = ""
    RENDERING = "rendering"
    FETCHING = "fetching"
    PLACING = "placing"
    WAITING = "waiting"  # the server cannot be reached


COLLECT_HINT = "click Collect Results"
