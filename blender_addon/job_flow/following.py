"""Following a job on the server: where it stands, its events, its result, cancelling it.

A step of the job flow: this module only talks to the server about jobs (through
connection/link.py, every failure one sentence); jobs.py decides what each answer changes
in the job record, and runs the interface's polling timer. Events reach only the client
that submitted a job, so jobs from a reopened file (or whose events were missed) are
also asked about by status every few seconds (`status_due`).
"""

from __future__ import annotations

from collections.abc import Callable

from .. import addon
from ..connection import link

POLL_INTERVAL_S = 0.5
STATUS_EVERY_S = 2.0
_last_status: dict[str, float] = {}  # job id -> when its status was last asked (monotonic)


def client_for_job(job):
    """The client for the server this job went to (keys and timeouts from the preferences)."""
    config = addon.preferences().server_config()
    if job.server_address and job.server_address != config.address:
        config = link.ServerConfig(job.server_address, config.server_key_file,
                                   config.client_key_file, config.timeout_s)
    return link.client_for(config), config


def status(client, job_id: str) -> dict:
    """Where the job stands, as the server says (a job object with its "state")."""
    return link.guarded(lambda: client.status(job_id))


def events(client) -> list[dict]:
    """The events the server has sent this client since the last call; never waits."""
    return link.guarded(lambda: client.poll(0.0))


def wait(client, job_id: str, on_event: Callable[[dict], None], timeout_s: float | None):
    """Background mode: block until the job ends (each event to `on_event`); its result."""
    return link.guarded(lambda: client.wait(job_id, on_event=on_event,
                                            timeout_s=timeout_s or None))


def fetch(client, job_id: str, take: int | None = None):
    """The finished job's result (its frames and sidecar), or take k's of a job of
    several takes (as soon as that take is done)."""
    if take is None:
        return link.guarded(lambda: client.fetch(job_id))
    return link.guarded(lambda: client.fetch(job_id, take=take))


def cancel(client, job_id: str) -> dict:
    """Ask the server to stop the job at its next step; its reply (the job's state)."""
    return link.guarded(lambda: client.cancel(job_id))


def status_due(job_id: str, now: float) -> bool:
    """Whether it is time to ask the server for this job's status again (every
    STATUS_EVERY_S); asking is counted from now on."""
    if now - _last_status.get(job_id, 0.0) < STATUS_EVERY_S:
        return False
    _last_status[job_id] = now
    return True
