"""A job's life in Blender: submit, follow, collect the result, cancel.

In the interface, following a job is a `bpy.app.timers` function that polls the
server without blocking, so Blender stays responsive. In background mode (`blender -b`,
the bpy module) timers never fire, so there the caller blocks until the result.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import bpy

from . import compat, link, plan, props, strip_io

POLL_INTERVAL_S = 0.5


def start(context, prompt: str = ""):
    """Render the active strip, submit it, record the job in the scene; return the record.

    Raises plan.UserError before anything in the scene changes when the strip, the
    settings or the server is unusable.
    """
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    prefs = props.preferences(context)
    values = scene.understudy.values(prompt)
    span = strip_io.strip_span(strip)
    plan.transfer_settings(values, span.length)  # a bad prompt fails before any network
    config = prefs.server_config()
    try:
        client = link.client_for(config)
        hello = link.guarded(client.hello)
    except plan.UserError:
        link.forget(config)
        raise
    max_frames = int(prefs.max_frames)
    server_max = (hello.get("limits") or {}).get("max_frames")
    if isinstance(server_max, int) and server_max >= 2:
        max_frames = min(max_frames, server_max)
    to_render = plan.frames_to_render(span, max_frames)
    settings = plan.transfer_settings(values, span.length, len(to_render))
    job_id = plan.new_job_id()
    with tempfile.TemporaryDirectory(prefix="understudy-render-") as folder:
        try:
            paths = strip_io.render_frames(scene, strip, to_render, folder,
                                           int(prefs.max_render_size))
        except RuntimeError as error:  # bpy.ops.render.render's own failure
            raise plan.UserError(f"Blender could not render {strip.name!r} ({error}); check "
                                 f"that the strip plays in the preview.") from error
        frames = [Path(path).read_bytes() for path in paths]
    link.guarded(lambda: client.submit(job_id, settings, frames))

    job = scene.understudy_jobs.add()
    job.job_id, job.prompt, job.status = job_id, settings["prompt"], "submitted"
    job.server_address = config.address
    job.source_name, job.channel = strip.name, span.channel
    job.frame_start, job.length = span.start, span.length
    scene.understudy_job_index = len(scene.understudy_jobs) - 1
    return job


def find_job(job_id: str):
    """(scene, job record) for a job id in any scene of this file, or (None, None)."""
    for scene in bpy.data.scenes:
        for job in getattr(scene, "understudy_jobs", ()):
            if job.job_id == job_id:
                return scene, job
    return None, None


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


def collect(scene, job, result) -> None:
    """Save a finished job's frames beside the .blend and add the result strip."""
    folder, stored, temporary = plan.result_folder(bpy.data.filepath, job.job_id,
                                                   tempfile.gettempdir())
    try:
        if not result.frames:
            raise plan.UserError(f"Job {job.job_id} finished without frames; run it again.")
        try:
            files = strip_io.write_result_frames(result.frames, folder, job.length)
        except OSError as error:
            raise plan.UserError(f"Could not save the result frames in {folder} ({error}); "
                                 f"check that the folder can be written.") from error
        strip = strip_io.add_result_strip(scene, plan.strip_name(job.prompt), folder, stored,
                                          files, job.span())
    except plan.UserError as error:
        job.status, job.phase, job.message = "failed", "", str(error)
        raise
    seed = (result.sidecar or {}).get("seed")
    job.status, job.phase, job.percent = "done", "", 100.0
    job.result_strip, job.frames_dir = strip.name, stored
    job.seed = "" if seed is None else str(seed)
    job.message = (f"The file is unsaved, so the frames are in the temporary folder {folder}; "
                   f"save the file before the next run to keep them beside it."
                   if temporary else "")
    if job.seed:
        scene.understudy.last_seed = job.seed


def fetch_and_collect(scene, job, client) -> None:
    result = link.guarded(lambda: client.fetch(job.job_id))
    collect(scene, job, result)


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
        result = link.guarded(lambda: client.wait(job.job_id, progress=progress,
                                                  timeout_s=timeout_s or None))
    except plan.UserError as error:
        resync(scene, job, client)
        if job.active:
            job.message = str(error)
        raise
    collect(scene, job, result)


def resync(scene, job, client) -> None:
    """Ask the server where a job stands and catch up (after reopening a file, an error)."""
    try:
        reply = link.guarded(lambda: client.status(job.job_id))
        apply_reply(scene, job, client, reply)
    except plan.UserError as error:
        job.message = str(error)


def apply_reply(scene, job, client, reply: dict) -> None:
    """Apply an event or a status reply to the job record; collect the result when ready."""
    update, ready = plan.job_update(reply)
    apply_update(job, update)
    if ready:
        fetch_and_collect(scene, job, client)


def cancel(scene, job) -> None:
    """Ask the server to stop the job; a running job stops at its next step."""
    client, _ = client_for_job(job)
    reply = link.guarded(lambda: client.cancel(job.job_id))
    apply_reply(scene, job, client, reply)
    if job.active:
        job.message = "Cancelling: the server stops the job at its next step."


# --------------------------------------------------------------------------- interface polling


def active_jobs():
    """(scene, job) for every unfinished job in the open file."""
    return [(scene, job) for scene in bpy.data.scenes
            for job in getattr(scene, "understudy_jobs", ()) if job.active]


def redraw_sequencers() -> None:
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "SEQUENCE_EDITOR":
                area.tag_redraw()


STATUS_EVERY_S = 2.0
_last_status: dict[str, float] = {}


def poll_once() -> float | None:
    """One timer tick: apply server events to the job records; None stops the timer.

    Events reach only the client that submitted a job, so jobs from a reopened file
    (or whose events were missed) are also asked about by status every few seconds.
    Nothing here waits: poll(0) returns at once, and status is asked only while the
    server answers.
    """
    pending = active_jobs()
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
                by_id[job_id][1].message = str(error)
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
    redraw_sequencers()
    return POLL_INTERVAL_S


def follow() -> None:
    """Make sure the polling timer runs (interface only; it never fires in background)."""
    if not bpy.app.timers.is_registered(poll_once):
        bpy.app.timers.register(poll_once, first_interval=POLL_INTERVAL_S)


@bpy.app.handlers.persistent
def on_file_loaded(_filepath) -> None:
    """Reopening a file reconnects to its unfinished jobs and collects finished results."""
    jobs = active_jobs()
    if not jobs:
        return
    if bpy.app.background:
        for scene, job in jobs:
            try:
                client, _ = client_for_job(job)
                resync(scene, job, client)
            except plan.UserError as error:
                job.message = str(error)
        return
    follow()


def register() -> None:
    bpy.app.handlers.load_post.append(on_file_loaded)


def unregister() -> None:
    if on_file_loaded in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(on_file_loaded)
    if bpy.app.timers.is_registered(poll_once):
        bpy.app.timers.unregister(poll_once)
    link.close_all()
