"""A job's life in Blender: check, render, submit, follow, collect the result, cancel.

Every check that can fail (the strip, the settings, the result's channel, the result
folder, the server and its limits) runs before the first frame is rendered. Then the
strip's frames are rendered: in the interface a few per `bpy.app.timers` tick
(batches.py), so the progress bar and Cancel are live from the first frame; in
background mode (`blender -b`, the bpy module) timers never fire, so there it blocks.
Following a job is a timer too (polling the server without blocking); in background
mode the caller blocks until the result. Placing a result that keeps the source's
transparency rewrites every frame, so in the interface that runs in batches too.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bpy

from . import batches, compat, link, placement, plan, props, strip_io
from .states import COLLECT_HINT, Phase, Status

POLL_INTERVAL_S = 0.5
WORK_INTERVAL_S = 0.01  # between render (or placing) ticks: Blender handles events in between
# Whether long work runs in timer ticks (the interface) or blocks (background mode, where
# timers never fire). A test may set it to take the interface's path in the bpy module.
BATCHED = not bpy.app.background
SOURCE_SUBFOLDER = "source"  # <result folder>/source/: the frames sent, until collected
SIDECAR_NAME = "sidecar.json"


@dataclass
class RenderSession:
    """One strip being rendered for a job that is not sent yet."""

    job_id: str
    scene_name: str
    strip_name: str
    span: plan.Span
    renderer: batches.BatchRenderer
    folder: str  # the job's result folder (absolute)
    place: placement.Placement
    max_size: int
    settings: dict
    config: link.ServerConfig
    previous_index: int = 0  # the job list's selection before this job was added

    @property
    def source_folder(self) -> str:
        return os.path.join(self.folder, SOURCE_SUBFOLDER)


_sessions: dict[str, RenderSession] = {}  # job id -> its render, while it renders
_placing: dict[str, batches.BatchRenderer] = {}  # job id -> result frames still to prepare


def session_of(job_id: str) -> RenderSession | None:
    return _sessions.get(job_id)


def forget_sessions() -> None:
    """Drop every render and placing session (their file was closed; its records say so)."""
    _sessions.clear()
    _placing.clear()


def check_writable(folder: str) -> None:
    """Raise UserError unless the result folder can be made and written (it is left as
    it was found: a folder made only for the test is removed again)."""
    made = [parent for parent in (Path(folder), *Path(folder).parents) if not parent.exists()]
    try:
        os.makedirs(folder, exist_ok=True)
        probe = Path(folder, ".understudy-write-test")
        probe.write_bytes(b"")
        probe.unlink()
        for parent in made:  # deepest first
            parent.rmdir()
    except OSError as error:
        raise plan.UserError(f"The result folder {folder} cannot be written ({plan.os_reason(error)}); "
                             f"make it a folder you can write to, or save the .blend elsewhere."
                             ) from error


def start(context, prompt: str = "", tick_budget_s: float | None = None) -> RenderSession:
    """Check everything, record the job (rendering) and return its render session.

    Raises plan.UserError, with nothing in the scene changed, when the strip, the
    settings, the result's place, the result folder or the server is unusable.
    """
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    prefs = props.preferences(context)
    values = scene.understudy.values(prompt)
    span = strip_io.strip_span(strip)
    settings = plan.transfer_settings(values, span.length)  # a bad prompt fails before any network
    plan.result_channel(span, strip.name, strip_io.neighbours(scene))
    place = strip_io.placement_of(scene, strip)
    size = strip_io.render_size(scene, place, int(prefs.max_render_size))
    job_id = plan.new_job_id()
    folder, stored, _ = plan.result_folder(bpy.data.filepath, job_id, tempfile.gettempdir())
    check_writable(str(Path(folder).parent))
    config = prefs.server_config()
    try:
        client = link.client_for(config)
        hello = link.guarded(client.hello)
    except plan.UserError:
        link.forget(config)
        raise
    frames = plan.frames_to_render(span, plan.server_frame_limit(hello), repr(strip.name))
    plan.check_server_limits(hello, settings, size)

    previous_index = scene.understudy_job_index
    job = scene.understudy_jobs.add()
    job.job_id, job.prompt, job.status = job_id, settings["prompt"], Status.RENDERING
    job.phase, job.percent = Phase.RENDERING, 0.0
    job.server_address = config.address
    job.source_name, job.channel = strip.name, span.channel
    job.frame_start, job.length = span.start, span.length
    job.frames_dir, job.placement = stored, place.to_json()
    scene.understudy_job_index = len(scene.understudy_jobs) - 1
    session = RenderSession(job_id, scene.name, strip.name, span,
                            batches.BatchRenderer(frames, tick_budget_s), folder, place,
                            int(prefs.max_render_size), settings, config, previous_index)
    _sessions[job_id] = session
    return session


def _locate(session: RenderSession):
    """(scene, source strip, job record) of a session, checking nothing moved meanwhile."""
    scene = bpy.data.scenes.get(session.scene_name)
    job = None
    if scene is not None:
        job = next((job for job in scene.understudy_jobs if job.job_id == session.job_id), None)
    if job is None:
        raise LookupError(session.job_id)  # the record is gone (undo, new file): drop quietly
    strip = next((other for other in compat.top_strips(scene.sequence_editor)
                  if other.name == session.strip_name), None) if scene.sequence_editor else None
    if strip is None or strip_io.strip_span(strip) != session.span:
        raise plan.UserError(f"{session.strip_name!r} was moved, trimmed or deleted while it was "
                             f"being rendered; nothing was sent, so transfer it again.")
    return scene, strip, job


def advance(session: RenderSession) -> bool:
    """Render the session's next batch, or submit once all are rendered; True while more
    remains. Raises plan.UserError (rendering or submitting failed) and LookupError
    (the job record is gone); the caller ends the session."""
    scene, strip, job = _locate(session)
    renderer = session.renderer
    if renderer.cancelled:
        return False
    if not renderer.finished:
        frames = renderer.next_batch()
        started = time.perf_counter()
        try:
            strip_io.render_frames(scene, strip, frames, session.source_folder, renderer.done,
                                   session.place, session.max_size)
        except RuntimeError as error:  # bpy.ops.render.render's own failure
            raise plan.UserError(f"Blender could not render {strip.name!r} ({error}); check "
                                 f"that the strip plays in the preview.") from error
        renderer.record(len(frames), time.perf_counter() - started)
        job.percent = renderer.percent
        return True  # the next call submits, so the bar shows 100% rendered first
    paths = [os.path.join(session.source_folder, strip_io.RENDER_FILE.format(index + 1))
             for index in range(renderer.total)]
    frames = [Path(path).read_bytes() for path in paths]
    client = link.client_for(session.config)
    link.guarded(lambda: client.submit(session.job_id, session.settings, frames))
    job.status, job.phase, job.percent = Status.SUBMITTED, Phase.NONE, 0.0
    return False


def end_session(session: RenderSession, error: str = "", keep_record: bool = True) -> None:
    """Forget a session; on failure or cancel throw its frames away and record why."""
    _sessions.pop(session.job_id, None)
    if not (error or session.renderer.cancelled):
        return
    strip_io.remove_folder(session.folder)
    scene, job = find_job(session.job_id)
    if job is None:
        return
    if not keep_record:
        scene.understudy_jobs.remove(list(scene.understudy_jobs).index(job))
        scene.understudy_job_index = session.previous_index
        return
    if error:
        job.status, job.phase, job.message = Status.FAILED, Phase.NONE, error
    else:
        job.status, job.phase, job.message = (Status.CANCELLED, Phase.NONE,
                                              "Cancelled while rendering; nothing was sent.")


def render_blocking(session: RenderSession) -> None:
    """Background mode: render every frame and submit, or leave the scene as it was."""
    try:
        while advance(session):
            pass
    except plan.UserError as error:
        end_session(session, str(error), keep_record=False)
        raise
    end_session(session)


def work_tick() -> float | None:
    """The interface's work timer: one batch of the oldest render, else of the oldest
    result being placed; None (the timer stops) when there is nothing left."""
    if _sessions:
        render_step(next(iter(_sessions.values())))
    elif _placing:
        place_tick()
    else:
        return None
    redraw_sequencers()
    return WORK_INTERVAL_S if _sessions or _placing else None


def render_step(session: RenderSession) -> None:
    """One batch of a render in the interface; a failure ends it with its sentence."""
    try:
        more = advance(session)
    except LookupError:  # the job record is gone (undone): so are its frames
        _sessions.pop(session.job_id, None)
        strip_io.remove_folder(session.folder)
    except plan.UserError as error:
        end_session(session, str(error))
    else:
        if not more:
            end_session(session)
            if not session.renderer.cancelled:
                follow()


def work_in_batches() -> None:
    """Interface: render (and place) from a timer, a batch per tick (timers never fire in
    background mode)."""
    if not bpy.app.timers.is_registered(work_tick):
        bpy.app.timers.register(work_tick, first_interval=0.0)


def cancel_render(job_id: str) -> bool:
    """Stop a job that is still rendering, before its next batch; False if there is none."""
    session = _sessions.get(job_id)
    if session is None:
        return False
    session.renderer.cancel()
    end_session(session)
    return True


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


def unplaced(job, message: str) -> plan.UserError:
    """Record that a finished job's result is not in the timeline yet; the error to raise."""
    job.status, job.phase, job.message = Status.UNPLACED, Phase.NONE, message
    return plan.UserError(message)


def collect(scene, job, result) -> None:
    """Save a finished job's frames and sidecar in its result folder, then place the strip.

    A result that cannot be saved or placed stays collectable (status "unplaced"):
    Collect Results tries again once the cause is fixed.
    """
    if not job.frames_dir:  # recorded by an older version, which chose the folder here
        job.frames_dir = plan.result_folder(bpy.data.filepath, job.job_id,
                                            tempfile.gettempdir())[1]
    folder = bpy.path.abspath(job.frames_dir)
    if not result.frames:
        job.status, job.phase, job.message = (Status.FAILED, Phase.NONE, f"Job {job.job_id} finished without "
                                              f"frames; run it again.")
        raise plan.UserError(job.message)
    sidecar = result.sidecar or {}
    job.sidecar = json.dumps(sidecar)
    seed = sidecar.get("seed")
    job.seed = "" if seed is None else str(seed)
    try:
        strip_io.write_result_frames(result.frames, folder, job.length)
        Path(folder, SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2))
    except OSError as error:
        raise unplaced(job, f"Could not save the result frames in {folder} ({plan.os_reason(error)}); "
                            f"make the folder writable, then {COLLECT_HINT}.") from error
    place(scene, job)


def place(scene, job) -> None:
    """Prepare the result's frames and add its strip: in batches from the work timer in
    the interface, at once in background mode."""
    if not BATCHED:
        prepare_frames(job, range(job.length))
        add_result(scene, job)
        return
    job.status, job.phase, job.percent = Status.PLACING, Phase.PLACING, 0.0
    _placing[job.job_id] = batches.BatchRenderer(list(range(job.length)))
    work_in_batches()


def place_tick() -> None:
    """One batch of the oldest result being placed; the strip is added after the last."""
    job_id, work = next(iter(_placing.items()))
    scene, job = find_job(job_id)
    if job is None or job.status != Status.PLACING:  # undone, or the file changed
        _placing.pop(job_id, None)
        return
    indices = work.next_batch()
    started = time.perf_counter()
    try:
        prepare_frames(job, indices)
        work.record(len(indices), time.perf_counter() - started)
        job.percent = work.percent
        if work.finished:
            _placing.pop(job_id, None)
            add_result(scene, job)
    except plan.UserError:  # recorded on the job (unplaced): Collect Results tries again
        _placing.pop(job_id, None)


def frames_on_disk(job) -> bool:
    folder = bpy.path.abspath(job.frames_dir)
    return all(Path(folder, name).is_file() for name in plan.frame_file_names(job.length))


def prepare_frames(job, indices) -> None:
    """Give these result frames their place (a crop's canvas) and the source's
    transparency, where the source had any."""
    folder = bpy.path.abspath(job.frames_dir)
    files = plan.frame_file_names(job.length)
    try:
        canvas = result_canvas(job)
        for index in indices:
            strip_io.finish_result_frame(
                os.path.join(folder, files[index]),
                os.path.join(folder, SOURCE_SUBFOLDER, strip_io.RENDER_FILE.format(index + 1)),
                canvas)
    except OSError as error:
        raise unplaced(job, f"Could not rewrite the result frames in {folder} ({plan.os_reason(error)}); "
                            f"make the folder writable, then {COLLECT_HINT}.") from error


def result_canvas(job) -> placement.Canvas | None:
    """The canvas a crop's result frames go on, from the sidecar's framing record (its
    result_size, not the frames' size: a frame already on its canvas has another)."""
    try:
        sidecar = json.loads(job.sidecar) if job.sidecar else {}
        framing = sidecar.get("framing")
        width, height = (int(value) for value in framing["result_size"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return placement.result_canvas(framing, width, height)


def add_result(scene, job) -> None:
    """Add the result strip from the frames in the job's folder, placed like the source."""
    folder = bpy.path.abspath(job.frames_dir)
    files = plan.frame_file_names(job.length)
    strip_io.remove_folder(os.path.join(folder, SOURCE_SUBFOLDER))
    try:
        channel = plan.result_channel(job.span(), job.source_name, strip_io.neighbours(scene),
                                      then=f"then {COLLECT_HINT} to place the result")
    except plan.UserError as error:
        raise unplaced(job, str(error)) from error
    place_info = (placement.Placement.from_json(job.placement) if job.placement else
                  placement.Placement(placement.CANVAS, scene.render.resolution_x,
                                      scene.render.resolution_y))
    width, height = strip_io.png_file_size(os.path.join(folder, files[0]))
    strip = strip_io.add_result_strip(scene, plan.strip_name(job.prompt), folder, job.frames_dir,
                                      files, channel, job.frame_start,
                                      placement.result_look(place_info, width, height))
    job.status, job.phase, job.percent = Status.DONE, Phase.NONE, 100.0
    job.result_strip = strip.name
    job.message = (f"The file is unsaved, so the frames are in the temporary folder {folder}; "
                   f"saving the file moves them beside it." if not bpy.data.filepath else "")
    if job.seed:
        scene.understudy.last_seed = job.seed


def fetch_and_collect(scene, job, client) -> None:
    result = link.guarded(lambda: client.fetch(job.job_id))
    collect(scene, job, result)


def collect_again(scene, job) -> None:
    """Collect Results for a job whose result is not placed: place it, fetching if needed."""
    if frames_on_disk(job):
        place(scene, job)
        return
    client, _ = client_for_job(job)
    fetch_and_collect(scene, job, client)


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
                job.phase, job.message = Phase.WAITING, plan.lost_server_message(str(error))
                raise plan.UserError(job.message) from error
            job.message = str(error)
        raise
    collect(scene, job, result)


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


def apply_reply(scene, job, client, reply: dict) -> None:
    """Apply an event or a status reply to the job record; collect the result when ready."""
    update, ready = plan.job_update(reply)
    apply_update(job, update)
    if ready:
        fetch_and_collect(scene, job, client)


def cancel(scene, job) -> None:
    """Stop a job: before its next batch while rendering, else at the server's next step."""
    if cancel_render(job.job_id):
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


def active_jobs():
    """(scene, job) for every job the server has and has not finished, in the open file."""
    return [(scene, job) for scene in bpy.data.scenes
            for job in getattr(scene, "understudy_jobs", ()) if job.active]


def unplaced_jobs():
    """(scene, job) for every finished job whose result is not in the timeline yet."""
    return [(scene, job) for scene in bpy.data.scenes
            for job in getattr(scene, "understudy_jobs", ()) if job.status == Status.UNPLACED]


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
    redraw_sequencers()
    return POLL_INTERVAL_S


def follow() -> None:
    """Make sure the polling timer runs (interface only; it never fires in background)."""
    if not bpy.app.timers.is_registered(poll_once):
        bpy.app.timers.register(poll_once, first_interval=POLL_INTERVAL_S)


def register() -> None:
    """Nothing to register: the timers start when there is something to render or follow."""


def unregister() -> None:
    for timer in (poll_once, work_tick):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    forget_sessions()
    link.close_all()
