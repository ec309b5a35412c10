"""Following a job on the server: its progress, waiting for it, catching up, cancelling.

In the interface a polling timer applies the server's events (and asks for status
every few seconds) without blocking; in background mode the caller blocks until the
result. A finished job's result is handed to collecting.py.
"""

from __future__ import annotations

import time

import bpy

from . import collecting, jobs, link, local_backend, plan, props, rendering
from .states import Phase

POLL_INTERVAL_S = 0.5


def client_for_job(job):
    """The client for the server this job went to (keys and timeouts from the preferences)."""
    config = props.preferences().server_config()
    if job.server_address and job.server_address != config.address:
        config = link.ServerConfig(job.server_address, config.server_key_file,
                                   config.client_key_file, config.timeout_s)
    return link.client_for(config), config


def apply_update(job, update: dict) -> None:
    for name, value in update.items():
        setattr(job, name, value)


def wait_and_collect(scene, job, timeout_s: float | None = None) -> None:
    """Background mode: block until the job ends, then collect it (or record why not)."""
    client, config = client_for_job(job)
    last_print = [0.0]

    def progress(event: dict) -> None:
        update, _ = plan.job_update(event)
        apply_update(job, update)
        if time.monotonic() - last_print[0] > 1.0:
            last_print[0] = time.monotonic()
            print(f"Understudy {job.job_id}: {plan.progress_text(job.status, job.phase, job.percent)}",
                  flush=True)

    try:
        result = link.guarded(lambda: client.wait(job.job_id, on_event=progress,
                                                  timeout_s=timeout_s or None))
    except plan.UserError as error:
        reachable = resync(scene, job, client)
        if job.active:
            if not reachable:
                link.forget(config)
                if local_backend.revive():  # the backend started here had died: it is back,
                    wait_and_collect(scene, job, timeout_s)  # with the job in its store
                    return
                job.phase, job.message = Phase.WAITING, plan.lost_server_message(str(error))
                raise plan.UserError(job.message) from error
            job.message = str(error)
        raise
    collecting.collect(scene, job, result)


def resync(scene, job, client) -> bool:
    """Ask the server where a job stands and catch up; False when it cannot be reached."""
    try:
        reply = link.guarded(lambda: client.status(job.job_id))
    except plan.UserError as error:
        job.message = str(error)
        return False
    if job.phase == Phase.WAITING:  # the server is back
        job.phase, job.message = Phase.NONE, ""
    try:
        apply_reply(scene, job, client, reply)
    except plan.UserError as error:
        job.message = str(error)
    return True


def catch_up(scene, job, wait: bool, timeout_s: float | None = None) -> None:
    """Collect Results in background mode: ask where a job stands and, with `wait`,
    block until it ends. Raises plan.UserError only while the job is still unfinished
    (the server is unreachable or the wait timed out); a job that ended badly has its
    reason recorded instead."""
    try:
        client, _ = client_for_job(job)
        resync(scene, job, client)
        if job.active and wait:
            wait_and_collect(scene, job, timeout_s)
    except plan.UserError:
        if job.active:
            raise


def apply_reply(scene, job, client, reply: dict) -> None:
    """Apply an event or a status reply to the job record; collect the result when ready."""
    update, ready = plan.job_update(reply)
    apply_update(job, update)
    if ready:
        collecting.fetch_and_collect(scene, job, client)


def cancel(scene, job) -> None:
    """Stop a job: before its next batch while rendering, else at the server's next step."""
    if rendering.cancel_render(job.job_id):
        return
    if not job.cancellable:
        raise plan.UserError(f"Job {job.job_id} has finished on the server; there is nothing "
                             f"to cancel.")
    client, _ = client_for_job(job)
    reply = link.guarded(lambda: client.cancel(job.job_id))
    apply_reply(scene, job, client, reply)
    if job.active:
        job.message = "Cancelling: the server stops the job at its next step."


# --------------------------------------------------------------------------- interface polling


STATUS_EVERY_S = 2.0
_last_status: dict[str, float] = {}


def poll_once() -> float | None:
    """One timer tick: apply server events to the job records; None stops the timer.

    Events reach only the client that submitted a job, so jobs from a reopened file
    (or whose events were missed) are also asked about by status every few seconds.
    Nothing here waits: poll(0) returns at once, and status is asked only while the
    server answers.
    """
    pending = jobs.active_jobs()
    if not pending:
        return None
    by_id = {job.job_id: (scene, job) for scene, job in pending}
    groups: dict = {}
    for _scene, job in pending:
        try:
            client, config = client_for_job(job)
        except plan.UserError as error:
            job.message = str(error)
            continue
        groups.setdefault(config, (client, []))[1].append(job.job_id)
    for client, job_ids in groups.values():
        try:
            events = link.guarded(lambda client=client: client.poll(0.0))
        except plan.UserError as error:
            for job_id in job_ids:
                job = by_id[job_id][1]
                job.phase, job.message = Phase.WAITING, plan.lost_server_message(str(error))
            continue
        for event in events:
            target = by_id.get(str(event.get("job_id")))
            if target is not None and target[1].active:
                try:
                    apply_reply(target[0], target[1], client, event)
                except plan.UserError as error:
                    target[1].message = str(error)
        now = time.monotonic()
        for job_id in job_ids:
            scene, job = by_id[job_id]
            if job.active and now - _last_status.get(job_id, 0.0) >= STATUS_EVERY_S:
                _last_status[job_id] = now
                resync(scene, job, client)
    jobs.redraw_sequencers()
    return POLL_INTERVAL_S


def follow() -> None:
    """Make sure the polling timer runs (interface only; it never fires in background)."""
    if not bpy.app.timers.is_registered(poll_once):
        bpy.app.timers.register(poll_once, first_interval=POLL_INTERVAL_S)


