"""A job's life in Blender: the job lists, every change of a job's state, and its steps in order.

A transfer is checked and its strip rendered (rendering.py), the job followed on the
server (following.py), and its result collected and placed (collecting.py). Those
three are steps: each does its work and reports back, and none knows the others or
this module. This module calls them in order, holds the job lists (the file's job
records, the renders in progress, the results being placed) and makes every change of
a record's status. In the interface it runs two timers: the work timer, which renders
(or places) a batch per tick, and the polling timer, which follows the server; in
background mode (`blender -b`, the bpy module), where timers never fire, it blocks.

A job of several takes places each take as soon as the server says it is ready (its
take_ready, or `takes_done` in a status reply) into one take stack (vse/stack.py); a
Render Final job's result replaces its preview take in place, as one undo step.
"""

from __future__ import annotations

import json
import tempfile
import time

import bpy

from .. import addon
from ..connection import link
from ..connection import local as local_backend
from ..rules.errors import UserError
from ..rules.job_updates import job_update
from ..rules.messages import lost_server_message, progress_text
from ..rules.names import result_folder
from ..rules.states import COLLECT_HINT, PROTOCOL, Phase, Status
from ..rules.takes import takes_to_fetch
from ..vse import compat, strip_io
from . import batches, collecting, following, rendering
from .rendering import RenderSession, TransferRequest

EventType = PROTOCOL.EventType

WORK_INTERVAL_S = 0.01  # between render (or placing) ticks: Blender handles events in between

# --------------------------------------------------------------------------- the job lists

_renders: dict[str, RenderSession] = {}  # job id -> its render, while it renders
_placing: dict[str, batches.BatchRenderer] = {}  # job id -> result frames still to prepare


def find_job(job_id: str):
    """(scene, job record) for a job id in any scene of this file, or (None, None)."""
    for scene in bpy.data.scenes:
        for job in getattr(scene, "understudy_jobs", ()):
            if job.job_id == job_id:
                return scene, job
    return None, None


def any_job(condition) -> bool:
    """True when some job of the open file meets the condition."""
    return any(condition(job) for scene in bpy.data.scenes
               for job in getattr(scene, "understudy_jobs", ()))


def active_jobs():
    """(scene, job) for every job the server has and has not finished, in the open file."""
    return [(scene, job) for scene in bpy.data.scenes
            for job in getattr(scene, "understudy_jobs", ()) if job.active]


def unplaced_jobs():
    """(scene, job) for every finished job whose result is not in the timeline yet."""
    return [(scene, job) for scene in bpy.data.scenes
            for job in getattr(scene, "understudy_jobs", ()) if job.status == Status.UNPLACED]


def render_session(job_id: str) -> RenderSession | None:
    """The render of a job that is still rendering, or None."""
    return _renders.get(job_id)


def renders() -> list[RenderSession]:
    """The renders in progress, oldest first."""
    return list(_renders.values())


def forget_sessions() -> None:
    """Drop every render and placing session (their file was closed; its records say so)."""
    _renders.clear()
    _placing.clear()


def file_loaded() -> None:
    """A file was opened: follow its unfinished jobs and collect finished results.

    A job recorded while its strip was still rendering was never sent: it is marked
    cancelled (the render session did not survive the file being closed)."""
    forget_sessions()
    for scene in bpy.data.scenes:
        for job in getattr(scene, "understudy_jobs", ()):
            if job.status == Status.RENDERING:
                job.status, job.phase = Status.CANCELLED, Phase.NONE
                job.message = "The file was closed while the strip was rendering; nothing was sent."
            elif job.status == Status.PLACING:  # the frames are here: Collect Results ends it
                job.status, job.phase = Status.UNPLACED, Phase.NONE
                job.message = (f"The file was closed while the result was being placed; "
                               f"{COLLECT_HINT} to place it.")
    pending = active_jobs()
    if not pending:
        return
    if not addon.BATCHED:  # background mode: timers never fire, so catch up now
        for scene, job in pending:
            try:
                client, _ = following.client_for_job(job)
                resync(scene, job, client)
            except UserError as error:
                job.message = str(error)
        return
    follow()


# --------------------------------------------------------------------------- rendering


def start_render(context, request: TransferRequest | str = "",
                 tick_budget_s: float | None = None) -> RenderSession:
    """Check everything, record the job (rendering) and return its render session
    (`request` a TransferRequest, or the prompt of a plain transfer).

    Raises UserError, with nothing in the scene changed, when the strip, the
    settings, the result's place, the result folder or the server is unusable.
    """
    if isinstance(request, str):
        request = TransferRequest(prompt=request)
    session = rendering.new_session(context, request, tick_budget_s)
    scene = compat.sequencer_scene(context)
    session.previous_index = scene.understudy_job_index
    job = scene.understudy_jobs.add()
    job.job_id, job.prompt, job.status = session.job_id, session.settings["prompt"], Status.RENDERING
    job.phase, job.percent = Phase.RENDERING, 0.0
    job.server_address = session.config.address
    job.source_name, job.channel = session.strip_name, session.span.channel
    job.frame_start, job.length = session.span.start, session.span.length
    job.frames_dir, job.placement = session.stored_folder, session.place.to_json()
    job.quality, job.takes = session.settings["quality"], request.takes
    if request.final_of is not None:
        job.final_of_job, job.final_of_take = request.final_of.job_id, request.final_of.take
    scene.understudy_job_index = len(scene.understudy_jobs) - 1
    _renders[session.job_id] = session
    return session


def _advance(session: RenderSession) -> bool:
    """One step of a render (rendering.advance) and what it changes in the record; True
    while more remains. Raises UserError (rendering or submitting failed) and
    LookupError (the job record is gone); the caller ends the session."""
    scene = bpy.data.scenes.get(session.scene_name)
    job = None
    if scene is not None:
        job = next((job for job in scene.understudy_jobs if job.job_id == session.job_id), None)
    if job is None:
        raise LookupError(session.job_id)  # the record is gone (undo, new file): drop quietly
    more = rendering.advance(session, scene)
    if more:
        job.percent = session.percent
    elif not session.renderer.cancelled:
        job.status, job.phase, job.percent = Status.SUBMITTED, Phase.NONE, 0.0
    return more


def end_render(session: RenderSession, error: str = "", keep_record: bool = True) -> None:
    """Forget a render; on failure or cancel throw its frames away and record why."""
    _renders.pop(session.job_id, None)
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
        while _advance(session):
            pass
    except UserError as error:
        end_render(session, str(error), keep_record=False)
        raise
    end_render(session)


def render_step(session: RenderSession) -> None:
    """One batch of a render in the interface; a failure ends it with its sentence."""
    try:
        more = _advance(session)
    except LookupError:  # the job record is gone (undone): so are its frames
        _renders.pop(session.job_id, None)
        strip_io.remove_folder(session.folder)
    except UserError as error:
        end_render(session, str(error))
    else:
        if not more:
            end_render(session)
            if not session.renderer.cancelled:
                follow()


def cancel_render(job_id: str) -> bool:
    """Stop a job that is still rendering, before its next batch; False if there is none."""
    session = _renders.get(job_id)
    if session is None:
        return False
    session.renderer.cancel()
    end_render(session)
    return True


# --------------------------------------------------------------------------- the work timer


def work_tick() -> float | None:
    """The interface's work timer: one batch of the oldest render, else of the oldest
    result being placed; None (the timer stops) when there is nothing left."""
    if _renders:
        render_step(renders()[0])
    elif _placing:
        place_tick()
    else:
        return None
    addon.redraw_sequencers()
    return WORK_INTERVAL_S if _renders or _placing else None


def work_in_batches() -> None:
    """Interface: render (and place) from a timer, a batch per tick (timers never fire in
    background mode)."""
    if not bpy.app.timers.is_registered(work_tick):
        bpy.app.timers.register(work_tick, first_interval=0.0)


# --------------------------------------------------------------------------- following


def apply_update(job, update: dict) -> None:
    """Set the record's fields to what a server event or status reply says (job_update)."""
    for name, value in update.items():
        setattr(job, name, value)


def apply_reply(scene, job, client, reply: dict) -> None:
    """Apply an event or a status reply to the job record; collect the result when ready
    (a job of several takes: each take as soon as it is ready)."""
    update, ready = job_update(reply)
    apply_update(job, update)
    if job.takes > 1:
        collect_takes(scene, job, client, reply, ready)
    elif ready:
        fetch_and_collect(scene, job, client)


def resync(scene, job, client) -> bool:
    """Ask the server where a job stands and catch up; False when it cannot be reached."""
    try:
        reply = following.status(client, job.job_id)
    except UserError as error:
        job.message = str(error)
        return False
    if job.phase == Phase.WAITING:  # the server is back
        job.phase, job.message = Phase.NONE, ""
    try:
        apply_reply(scene, job, client, reply)
    except UserError as error:
        job.message = str(error)
    return True


def wait_and_collect(scene, job, timeout_s: float | None = None) -> None:
    """Background mode: block until the job ends, then collect it (or record why not)."""
    client, config = following.client_for_job(job)
    last_print = [0.0]

    def progress(event: dict) -> None:
        apply_update(job, job_update(event)[0])
        if time.monotonic() - last_print[0] > 1.0:
            last_print[0] = time.monotonic()
            print(f"Understudy {job.job_id}: {progress_text(job.status, job.phase, job.percent)}",
                  flush=True)

    def on_event(event: dict) -> None:
        if job.takes > 1 and event.get("type") == EventType.TAKE_READY:  # place it now
            collect_takes(scene, job, client, event, ready=False)
        else:
            progress(event)

    try:
        result = following.wait(client, job.job_id, on_event, timeout_s)
    except UserError as error:
        reachable = resync(scene, job, client)
        if job.active:
            if not reachable:
                link.forget(config)
                if local_backend.revive():  # the backend started here had died: it is back,
                    wait_and_collect(scene, job, timeout_s)  # with the job in its store
                    return
                job.phase, job.message = Phase.WAITING, lost_server_message(str(error))
                raise UserError(job.message) from error
            job.message = str(error)
        raise
    if job.takes > 1:  # the result is take 1; any take not placed yet is fetched now
        collect_takes(scene, job, client, {"type": EventType.RESULT_READY}, True, first=result)
        return
    collect(scene, job, result)


def catch_up(scene, job, wait: bool, timeout_s: float | None = None) -> None:
    """Collect Results in background mode: ask where a job stands and, with `wait`,
    block until it ends. Raises UserError only while the job is still unfinished
    (the server is unreachable or the wait timed out); a job that ended badly has its
    reason recorded instead."""
    try:
        client, _ = following.client_for_job(job)
        resync(scene, job, client)
        if job.active and wait:
            wait_and_collect(scene, job, timeout_s)
    except UserError:
        if job.active:
            raise


def cancel(scene, job) -> None:
    """Stop a job: before its next batch while rendering, else at the server's next step."""
    if cancel_render(job.job_id):
        return
    if not job.cancellable:
        raise UserError(f"Job {job.job_id} has finished on the server; there is nothing "
                        f"to cancel.")
    client, _ = following.client_for_job(job)
    reply = following.cancel(client, job.job_id)
    apply_reply(scene, job, client, reply)
    if job.active:
        job.message = "Cancelling: the server stops the job at its next step."


def poll_once() -> float | None:
    """The interface's polling timer: apply server events to the job records; None stops
    the timer.

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
            client, config = following.client_for_job(job)
        except UserError as error:
            job.message = str(error)
            continue
        groups.setdefault(config, (client, []))[1].append(job.job_id)
    for client, job_ids in groups.values():
        try:
            events = following.events(client)
        except UserError as error:
            for job_id in job_ids:
                job = by_id[job_id][1]
                job.phase, job.message = Phase.WAITING, lost_server_message(str(error))
            continue
        for event in events:
            target = by_id.get(str(event.get("job_id")))
            if target is not None and target[1].active:
                try:
                    apply_reply(target[0], target[1], client, event)
                except UserError as error:
                    target[1].message = str(error)
        now = time.monotonic()
        for job_id in job_ids:
            scene, job = by_id[job_id]
            if job.active and following.status_due(job_id, now):
                resync(scene, job, client)
    addon.redraw_sequencers()
    return following.POLL_INTERVAL_S


def follow() -> None:
    """Make sure the polling timer runs (interface only; it never fires in background)."""
    if not bpy.app.timers.is_registered(poll_once):
        bpy.app.timers.register(poll_once, first_interval=following.POLL_INTERVAL_S)


# --------------------------------------------------------------------------- collecting


def record_unplaced(job, message: str) -> None:
    """A finished job's result is not in the timeline yet: Collect Results tries again."""
    job.status, job.phase, job.message = Status.UNPLACED, Phase.NONE, message


def collect(scene, job, result) -> None:
    """Save a finished job's frames and sidecar in its result folder, then place the strip.

    A result that cannot be saved or placed stays collectable (status "unplaced"):
    Collect Results tries again once the cause is fixed.
    """
    if not job.frames_dir:  # recorded by an older version, which chose the folder here
        job.frames_dir = result_folder(bpy.data.filepath, job.job_id, tempfile.gettempdir())[1]
    if not result.frames:
        job.status, job.phase, job.message = (Status.FAILED, Phase.NONE, f"Job {job.job_id} "
                                              f"finished without frames; run it again.")
        raise UserError(job.message)
    sidecar = result.sidecar or {}
    job.sidecar = json.dumps(sidecar)
    seed = sidecar.get("seed")
    job.seed = "" if seed is None else str(seed)
    try:
        collecting.save_result(job, result.frames, sidecar)
    except collecting.NotPlaced as error:
        record_unplaced(job, str(error))
        raise
    place(scene, job)


def place(scene, job) -> None:
    """Prepare the result's frames and add its strip: in batches from the work timer in
    the interface, at once in background mode."""
    if not addon.BATCHED:
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
    except UserError:  # recorded on the job (unplaced): Collect Results tries again
        _placing.pop(job_id, None)


def prepare_frames(job, indices) -> None:
    """collecting.prepare_frames; a result it cannot rewrite is recorded unplaced."""
    try:
        collecting.prepare_frames(job, indices)
    except collecting.NotPlaced as error:
        record_unplaced(job, str(error))
        raise


def add_result(scene, job) -> None:
    """Add the result strip (collecting.add_result_strip), or for Render Final put it in
    place of its take (add_final), and record the job done."""
    if job.final_of_job:
        add_final(scene, job)
        return
    try:
        strip = collecting.add_result_strip(scene, job)
    except collecting.NotPlaced as error:
        record_unplaced(job, str(error))
        raise
    record_done(scene, job, strip.name)


def record_done(scene, job, result_strip: str) -> None:
    """The job's result is in the timeline: done, and where its frames are."""
    job.status, job.phase, job.percent = Status.DONE, Phase.NONE, 100.0
    job.result_strip = result_strip
    folder = bpy.path.abspath(job.frames_dir)
    job.message = (f"The file is unsaved, so the frames are in the temporary folder {folder}; "
                   f"saving the file moves them beside it." if not bpy.data.filepath else "")
    if job.seed:
        scene.understudy.last_seed = job.seed


def fetch_and_collect(scene, job, client) -> None:
    collect(scene, job, following.fetch(client, job.job_id))


# --------------------------------------------------------------------------- takes


def take_record(job, take: int):
    """The placed take k of a job (its record), or None."""
    return next((record for record in job.take_records if record.number == take), None)


def collect_takes(scene, job, client, reply: dict, ready: bool, first=None) -> None:
    """Fetch and place the takes a server event or status reply says are ready
    (rules/takes.py takes_to_fetch), each into the job's stack as it comes; once the job
    is done (`ready`), every take left, and the job is recorded done. `first`: take 1's
    result when it is already here.

    A take that cannot be placed while the job runs is said on the record and tried
    again when the job is done; then the job is recorded unplaced (Collect Results)."""
    placed = {record.number for record in job.take_records}
    for take in takes_to_fetch(reply, job.takes, placed):
        result = first if take == 1 and first is not None else \
            following.fetch(client, job.job_id, take)
        try:
            place_take(scene, job, take, result)
        except UserError as error:
            if ready:
                record_unplaced(job, str(error))
                raise
            job.message = str(error)
    if ready:
        collecting.remove_sent_frames(job)
        record_done(scene, job, job.result_strip)


def place_take(scene, job, take: int, result) -> None:
    """Save take k's frames and sidecar in its folder, prepare them and add its strip to
    the job's stack (at once: a take is one batch); the take's record last, so a take
    that fails is fetched again."""
    if not result.frames:
        raise collecting.NotPlaced(f"Take {take} of {job.job_id} came without frames; "
                                   f"{COLLECT_HINT} to fetch it again.")
    sidecar = result.sidecar if isinstance(result.sidecar, dict) else {}
    seed = "" if sidecar.get("seed") is None else str(sidecar["seed"])
    prompt = take_prompt(sidecar, job.prompt)
    if not job.sidecar:  # the first take placed: the job's summary, framing and region
        job.sidecar, job.seed = json.dumps(sidecar), seed
    collecting.save_result(job, result.frames, sidecar, take)
    collecting.prepare_frames(job, range(job.length), take)
    holder, _ = collecting.add_take_strip(scene, job, take, prompt, seed)
    record = job.take_records.add()
    record.number, record.prompt, record.seed = take, prompt, seed
    record.quality, record.sidecar = job.quality, json.dumps(sidecar)
    job.result_strip = holder.name


def take_prompt(sidecar: dict, default: str) -> str:
    """A take's prompt, as its sidecar records it (jobs of several prompts)."""
    if isinstance(sidecar.get("prompt"), str):
        return sidecar["prompt"]
    settings = sidecar.get("settings")
    if isinstance(settings, dict) and isinstance(settings.get("prompt"), str):
        return settings["prompt"]
    return default


def add_final(scene, job) -> None:
    """Render Final's result: its frames replace the preview take's in place, as one undo
    step (one undo shows the preview again). The job is recorded done before the step
    begins, so undoing it does not make the result arrive again."""
    _, target = find_job(job.final_of_job)
    if target is None:
        record_unplaced(job, f"The preview job {job.final_of_job} is no longer in this file, so "
                             f"its take cannot be replaced; undo its removal, then "
                             f"{COLLECT_HINT}.")
        raise UserError(job.message)
    take = job.final_of_take
    record_done(scene, job, job.result_strip)
    addon.push_undo(f"Understudy: take {take} as a preview")
    try:
        strip = collecting.replace_with_final(scene, job, target, take)
    except collecting.NotPlaced as error:
        record_unplaced(job, str(error))
        raise
    job.result_strip = strip.name
    record = take_record(target, take)
    if record is not None:
        record.quality, record.sidecar, record.final_job = job.quality, job.sidecar, job.job_id
    else:  # a one-take preview: the job is its take
        target.quality, target.sidecar = job.quality, job.sidecar
    target.result_strip = strip.name if target.takes == 1 else target.result_strip
    addon.push_undo(f"Understudy: final of take {take}")


def collect_again(scene, job) -> None:
    """Collect Results for a job whose result is not placed: place it, fetching if needed."""
    if job.takes > 1:  # the takes not placed yet are fetched again
        client, _ = following.client_for_job(job)
        collect_takes(scene, job, client, {"type": EventType.RESULT_READY}, True)
        return
    if collecting.frames_on_disk(job):
        place(scene, job)
        return
    client, _ = following.client_for_job(job)
    fetch_and_collect(scene, job, client)


def register() -> None:
    """Nothing to register: the timers start when there is something to render or follow."""


def unregister() -> None:
    for timer in (poll_once, work_tick):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    forget_sessions()
    link.close_all()
