"""One worker actor in the shape of the server's engine: describe, check_settings, transfer.

The gateway's worker threads call `transfer` exactly as they call a local Engine, one
thread per actor; the job runs on the actor and the call returns (or raises) when it
ends there. `wait_ready` lets a thread hold back from the queue while its actor is
being restarted, so the other actors take the waiting jobs.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from backend.cluster.pool import WorkerPool
from backend.cluster.runner import ActorRunner
from backend.engine import TransferResult
from shared.settings import TransferSettings


class ActorEngine:
    """The server's engine interface, served by one actor of a WorkerPool."""

    def __init__(self, pool: WorkerPool, runner: ActorRunner) -> None:
        self.pool = pool
        self.runner = runner

    @property
    def name(self) -> str:
        return self.runner.name

    def describe(self) -> dict[str, Any]:
        return self.pool.describe()

    def check_settings(self, settings: TransferSettings, clip_length: int) -> None:
        self.pool.check_settings(settings, clip_length)

    def wait_ready(self, stopping: threading.Event) -> bool:
        """Block until the actor answers; False when the gateway stops first."""
        return self.runner.wait_ready(stopping.is_set) is not None

    def transfer(self, clip_frames: Any, settings: TransferSettings,
                 progress: Callable[[str, int, int], None] | None = None,
                 cancelled: Callable[[], bool] | None = None) -> TransferResult:
        """Run the edit on the actor; raises what a local edit raises, or WorkerLost."""
        # The id only pairs a cancel with this run on the actor.
        run_id = f"run-{uuid.uuid4().hex}"
        output = self.runner.run(run_id, settings.to_dict(), png_frames(clip_frames),
                                 progress or _ignore_progress, cancelled or _never_cancelled)
        return TransferResult(frames=output.frames, metadata=output.sidecar)


def png_frames(clip_frames: Any) -> list[bytes]:
    """The clip as PNG bytes: a stored clip's files as they are, or frames encoded."""
    paths = getattr(clip_frames, "paths", None)
    if paths is not None:
        return [path.read_bytes() for path in paths]
    from backend.video import encode_png

    return [encode_png(frame) for frame in clip_frames]


def _ignore_progress(phase: str, step: int, total: int) -> None:
    pass


def _never_cancelled() -> bool:
    return False
