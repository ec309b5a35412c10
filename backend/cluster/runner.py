"""The gateway's handle on one worker actor: run a job there as if it ran here.

`ActorRunner.run` has the shape of a local edit: it blocks, calls `progress(phase,
step, total)` as the worker reports, polls `cancelled()` and returns the result frames
and sidecar as a TransferResult, or raises what a local run would (JobCancelled, an
UnderstudyError with the job's code). What a local run cannot do is lose its process;
that is `ActorLost`,
and the job book decides what happens to the job (re-queued once, as after a crash).

Cancel is cooperative first: the worker's engine stops at its next step. A worker that
has not stopped `cancel_grace_s` later is killed with `ray.kill`; Ray restarts it
(`max_restarts`) with a fresh engine, and `wait_ready` returns once it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from backend.errors import JobCancelled, UnderstudyError
from backend.results import CancelCheck, ProgressCallback, TakeCallback, TransferResult
from backend.server.engine_api import EngineLost
from shared.sidecar import Sidecar

log = logging.getLogger("understudy.cluster")

# How often a running job's cancel flag is looked at while the worker is quiet.
CANCEL_POLL_S = 0.25


class ActorLost(EngineLost):
    """The worker's process or node died while it held the job."""


class ActorRunner:
    """Runs jobs on one EngineActor, one at a time."""

    def __init__(self, name: str, actor: Any, cancel_grace_s: float) -> None:
        self.name = name
        self.actor = actor
        self.cancel_grace_s = cancel_grace_s
        self.identity: dict[str, Any] | None = None

    def wait_ready(self, stopping: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        """Block until the actor answers (across restarts); its identity, or None on stop."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError

        while not stopping():
            try:
                self.identity = ray.get(self.actor.identity.remote(), timeout=CANCEL_POLL_S * 4)
                return self.identity
            except (GetTimeoutError, ActorUnavailableError):
                continue  # starting or restarting: ask again
        return None

    def check_settings(self, settings: dict[str, Any], clip_length: int,
                       frame_size: tuple[int, int] | None, timeout_s: float) -> None:
        """The engine's submit-time check, run on this actor (check_on_actor)."""
        check_on_actor(self.actor, settings, clip_length, frame_size, timeout_s)

    def run(self, job_id: str, settings: dict[str, Any], inputs: list[bytes],
            progress: ProgressCallback, cancelled: CancelCheck,
            masks: list[list[bytes]] | None = None, memory: dict[str, Any] | None = None,
            takes: list[dict[str, Any]] | None = None, batch_size: int | None = None,
            on_take: TakeCallback | None = None,
            references: list[bytes] | None = None) -> list[TransferResult]:
        """Run one job on the actor (`masks`: each region's mask PNGs, None for none;
        `memory`: the savers decided for it, MemoryDecision.to_dict(), None for none;
        `takes`: a job of several takes, each {"prompt", "seed"}, `batch_size` at once,
        each handed to `on_take(index, result)` as the actor finishes it; `references`:
        its reference images' PNGs, None for none); its results, one per take (one for a
        job of one). See the module docstring for what it raises."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayError

        events = self.actor.run.options(num_returns="streaming").remote(
            job_id, settings, inputs, masks, memory, takes, batch_size, references)
        finished: list[TransferResult] = []
        started = False
        cancel_sent_at: float | None = None
        killed = False
        while True:
            if cancel_sent_at is None and cancelled():
                self.actor.cancel.remote(job_id)
                cancel_sent_at = time.monotonic()
            elif (cancel_sent_at is not None and not killed
                  and time.monotonic() - cancel_sent_at > self.cancel_grace_s):
                log.warning("Worker %s did not stop job %s within %.0f s of its cancel; "
                            "killing it (Ray restarts it).", self.name, job_id,
                            self.cancel_grace_s)
                ray.kill(self.actor, no_restart=False)
                killed = True
            ready, _ = ray.wait([events], timeout=CANCEL_POLL_S)
            if not ready:
                continue
            try:
                event = ray.get(next(events))
            except StopIteration:
                raise ActorLost(f"Worker {self.name} ended job {job_id} without a result.",
                                started) from None
            except RayError as error:
                if isinstance(error, ActorUnavailableError):
                    # "Unavailable" may be a broken connection to a live actor. Kill it so
                    # the job cannot go on there while the gateway runs it again elsewhere.
                    ray.kill(self.actor, no_restart=False)
                if cancel_sent_at is not None:
                    raise JobCancelled("The edit was cancelled.") from None
                raise ActorLost(f"Worker {self.name} was lost while holding job {job_id} "
                                f"({type(error).__name__}).", started) from None
            kind = event["event"]
            if kind == "started":
                started = True
                self.identity = event["worker"]
            elif kind == "progress":
                progress(event["phase"], event["step"], event["total"])
            elif kind == "take":  # one take of several, finished on the actor
                finished.append(_result_of(event))
                if on_take is not None:
                    try:
                        on_take(event["index"], finished[-1])
                    except BaseException:  # not stored: the worker stops the job too
                        self.actor.cancel.remote(job_id)
                        raise
            elif kind == "done":
                return finished if takes is not None else [_result_of(event)]
            elif kind == "cancelled":
                raise JobCancelled("The edit was cancelled.")
            elif kind == "failed":
                raise UnderstudyError(event["message"], event["code"])


def _result_of(event: dict[str, Any]) -> TransferResult:
    """A "done" or "take" event's frames and sidecar as the result of a local edit."""
    return TransferResult(event["frames"], Sidecar.from_dict(event["sidecar"]),
                          event.get("alpha"))


def check_on_actor(actor: Any, settings: dict[str, Any], clip_length: int,
                   frame_size: tuple[int, int] | None, timeout_s: float) -> None:
    """The engine's submit-time check, run on `actor` (an EngineActor handle); raises
    UnderstudyError with the code the actor's engine raised."""
    import ray

    refused = ray.get(actor.check_settings.remote(settings, clip_length, frame_size),
                      timeout=timeout_s)
    if refused is not None:
        raise UnderstudyError(refused["message"], refused["code"])
