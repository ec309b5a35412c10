"""How the server's words change a job record: its events and status replies.

Plain Python (no bpy). jobs.py applies what `job_update` returns.
"""

from __future__ import annotations

from .states import PROTOCOL, Phase, Status

JobState, EventType = PROTOCOL.JobState, PROTOCOL.EventType


def percent_from_event(event: dict) -> float | None:
    """Percent complete from a progress event or status reply, when it says enough."""
    if isinstance(event.get("percent"), int | float):
        return float(event["percent"])
    step, total = event.get("step"), event.get("total")
    if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
        return 100.0 * step / total
    return None


def job_update(event: dict) -> tuple[dict, bool]:
    """How a server event or status reply changes a job record: (field values, fetch now?).

    Events have a "type" (shared/protocol.py EventType); status replies are job objects
    with a "state" (JobState). Unknown kinds change nothing, so a newer server cannot
    break an older extension.
    """
    kind = event.get("type") if "type" in event else event.get("state")
    if kind in (EventType.RESULT_READY, JobState.DONE):
        return {"status": Status.RUNNING, "phase": Phase.FETCHING, "percent": 100.0}, True
    if kind in (EventType.ERROR, JobState.FAILED):
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        message = str(event.get("message") or error.get("message")
                      or "The server could not finish the job.")
        return {"status": Status.FAILED, "message": message}, False
    if kind == EventType.TAKE_READY:  # one take of several is made: the job still runs
        return {"status": Status.RUNNING}, False  # (rules/takes.py says what to fetch)
    if kind in (EventType.CANCELLED, JobState.CANCELLED):
        return {"status": Status.CANCELLED, "message": "Cancelled."}, False
    if kind in (EventType.PROGRESS, JobState.RUNNING, JobState.QUEUED):
        waiting = kind == JobState.QUEUED or event.get("phase") == JobState.QUEUED
        update: dict = {"status": Status.SUBMITTED if waiting else Status.RUNNING}
        if event.get("phase"):
            update["phase"] = str(event["phase"]) + take_text(event)
        percent = percent_from_event(event)
        if percent is not None:
            update["percent"] = max(0.0, min(100.0, percent))
        return update, False
    return {}, False


def take_text(event: dict) -> str:
    """", take 2 of 3" while a take of several is being made (progress events carry
    `take` and `takes` then); "" otherwise."""
    take, takes = event.get("take"), event.get("takes")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in (take, takes)) \
            and takes > 1:
        return f", take {take} of {takes}"
    return ""
