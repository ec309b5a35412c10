"""What the panel says of a job: its progress, a lost server, how its result was made.

Plain Python (no bpy).
"""

from __future__ import annotations

from ..vendored import shared_module
from .states import ACTIVE, COLLECT_HINT, Phase, Status

SIDECAR = shared_module("sidecar")  # shared/sidecar.py: how a result was made


def progress_text(status: str, phase: str, percent: float) -> str:
    """What the progress bar says: 'sampling 40%', 'queued', 'waiting for the server'."""
    if phase == Phase.WAITING and status in ACTIVE:
        return "waiting for the server"
    if status == Status.SUBMITTED:
        return "queued"
    if status in (Status.RUNNING, Status.RENDERING, Status.PLACING):
        return f"{phase or status} {percent:.0f}%"
    if status == Status.UNPLACED:
        return "not placed"
    return str(status)


def cancel_report(job_id: str, status: str) -> str:
    """What Cancel says, by the job's status once the server has answered: a job still
    queued there (or rendering here) is cancelled at once, a running one stops at its next
    step, and one that ended before the cancel reached the server ended as it did (a
    finished job's result is collected, as Collect Results would)."""
    if status == Status.CANCELLED:
        return f"Cancelled {job_id}."
    if status in ACTIVE:
        return f"Cancelling {job_id}: the server stops it at its next step."
    if status == Status.FAILED:
        return f"{job_id} had already failed on the server; there was nothing to cancel."
    return f"{job_id} had already finished on the server; its result is collected instead."


def lost_server_message(error: str) -> str:
    """After the server stopped answering: the error, and what brings the result in."""
    return (f"{error.rstrip('.')}; the job may still finish there, so {COLLECT_HINT} once the "
            f"server is back.")


def sidecar_summary(sidecar: dict) -> str:
    """One line about how a result was made, from the server's sidecar, for the panel:
    the steps and guided steps the edit used (never the request's automatic None), a
    preview said as one, what it cost in forward-equivalents (full model passes) when
    the sidecar records it, and its seconds; or
    the one sentence saying why the sidecar cannot be read; "" before there is one."""
    if not sidecar:
        return ""
    try:
        record = SIDECAR.Sidecar.from_dict(sidecar)
    except SIDECAR.SidecarError as error:
        return str(error)
    preview = " (preview)" if record.settings.get("quality") == "preview" else ""
    parts = [f"model {record.model}", f"seed {record.seed}",
             f"{record.steps} steps{preview}, {record.guided_steps} guided",
             "inversion from cache" if record.inversion_from_cache else "inversion computed"]
    cost = (record.cost or {}).get("forward_equivalents", {})
    if isinstance(cost.get("total"), int | float):  # a sidecar with its cost (issue 27)
        parts.append(f"cost {cost['total']:.0f} FE")
    total = sum(value for value in record.timings_s.values() if isinstance(value, int | float))
    parts.append(f"{total:.1f} s on the server")
    return ", ".join(parts)


def region_summary(sidecar: dict) -> str:
    """What the panel says of a result's region, from its sidecar ("" without one)."""
    regions = sidecar.get("regions") if isinstance(sidecar, dict) else None
    if not isinstance(regions, dict):
        return ""
    if not regions.get("composited"):
        return f"motion {regions.get('motion')}: the whole frame was regenerated"
    return (f"{regions.get('count')} region(s), grown {regions.get('grow')} px, feathered "
            f"{regions.get('feather')} px: the plate is kept outside")
