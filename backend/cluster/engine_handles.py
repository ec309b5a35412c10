"""One worker actor in the shape of the server's engine: describe, check_settings, transfer,
transfer_takes.

The gateway's job threads (backend/server/job_thread.py) call `transfer` exactly as they
call a local Engine, one thread per actor; the job runs on the actor and the call
returns (or raises) when it ends there. `wait_ready` lets a thread hold back from the
queue while its actor is being restarted, so the other actors take the waiting jobs.

This module builds on the pool (pool.py), never the reverse: `actor_engines` makes the
handles, so pool.py needs nothing from here.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import TYPE_CHECKING, Any

from backend.cluster.pool import ActorPool
from backend.cluster.runner import ActorRunner
from backend.results import CancelCheck, ProgressCallback, Take, TakeCallback, TransferResult
from shared.settings import TransferSettings

if TYPE_CHECKING:
    from backend.memory.savers import MemoryDecision

log = logging.getLogger("understudy.cluster")

# A worker restarted on a box where the model no longer loads is asked again this often.
BROKEN_RETRY_S = 60.0


class ActorEngine:
    """The server's engine interface, served by one actor of a ActorPool."""

    def __init__(self, pool: ActorPool, runner: ActorRunner) -> None:
        self.pool = pool
        self.runner = runner

    @property
    def name(self) -> str:
        return self.runner.name

    def describe(self) -> dict[str, Any]:
        return self.pool.describe()

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        self.pool.check_settings(settings, clip_length, frame_size)

    def wait_ready(self, stopping: threading.Event) -> bool:
        """Block until the actor answers with a loaded model; False when it cannot take
        a job now (the gateway stops, or its model failed to load after a restart)."""
        identity = self.runner.wait_ready(stopping.is_set)
        if identity is None:
            return False
        if "load_error" in identity:  # parked: the other workers take the queue
            log.error("Worker %s cannot load the model (%s); asking again in %.0f s.",
                      self.name, identity["load_error"]["message"], BROKEN_RETRY_S)
            stopping.wait(BROKEN_RETRY_S)
            return False
        return True

    def transfer(self, clip_frames: Any, settings: TransferSettings,
                 progress: ProgressCallback | None = None,
                 cancelled: CancelCheck | None = None, masks: Any | None = None,
                 savers: MemoryDecision | None = None,
                 references: Any | None = None) -> TransferResult:
        """Run the edit on the actor; raises what a local edit raises, or ActorLost.
        `masks` (a PngMasks) and `references` (a PngReferences) travel as their PNG
        bytes, like the clip; `savers` (decided by the gateway's job thread,
        backend/server/job_thread.py) as their record."""
        frames = png_frames(clip_frames)
        # The id only pairs a cancel with this run on the actor.
        run_id = f"run-{uuid.uuid4().hex}"
        return self.runner.run(run_id, settings.to_dict(), frames,
                               progress or _ignore_progress, cancelled or _never_cancelled,
                               masks.png_bytes() if masks is not None else None,
                               savers.to_dict() if savers is not None else None,
                               references=references.png_bytes() if references else None)[0]

    def transfer_takes(self, clip_frames: Any, settings: TransferSettings, takes: list[Take],
                       progress: ProgressCallback | None = None,
                       cancelled: CancelCheck | None = None, masks: Any | None = None,
                       savers: MemoryDecision | None = None, batch_size: int | None = None,
                       on_take: TakeCallback | None = None,
                       references: Any | None = None) -> list[TransferResult]:
        """A job of several takes, whole on the actor (one inversion there); each take
        comes back as the actor finishes it, and `on_take` is told then."""
        run_id = f"run-{uuid.uuid4().hex}"
        return self.runner.run(run_id, settings.to_dict(), png_frames(clip_frames),
                               progress or _ignore_progress, cancelled or _never_cancelled,
                               masks.png_bytes() if masks is not None else None,
                               savers.to_dict() if savers is not None else None,
                               takes=[{"prompt": take.prompt, "seed": take.seed}
                                      for take in takes],
                               batch_size=batch_size, on_take=on_take,
                               references=references.png_bytes() if references else None)


def actor_engines(pool: ActorPool) -> list[ActorEngine]:
    """One engine-shaped handle per actor of the pool, for the gateway's job threads."""
    return [ActorEngine(pool, runner) for runner in pool.runners]


def png_frames(clip_frames: Any) -> list[bytes]:
    """The clip as PNG bytes: a stored clip's files as they are, or frames encoded."""
    from backend.server.frames import PngClip
    from backend.video import encode_png

    if isinstance(clip_frames, PngClip):
        return clip_frames.png_bytes()

    return [encode_png(frame) for frame in clip_frames]


def _ignore_progress(phase: str, step: int, total: int) -> None:
    pass


def _never_cancelled() -> bool:
    return False
