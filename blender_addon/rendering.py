"""Rendering a strip for a job: check everything, render its frames, submit them.

Every check that can fail (the strip, the region, the settings, the result's channel,
the result folder, the server and its limits) runs before the first frame is
rendered. With a region (a Mask or a matte strip), the region is rendered first, over
the same frames and at the same size as the strip, and its pixels are checked (it
must mark a subject and keep a plate) before the strip is rendered and anything is
sent. Frames are rendered in the interface a few per work-timer tick (batches.py,
jobs.work_tick), so the progress bar and Cancel are live from the first frame; in
background mode (`blender -b`, the bpy module) timers never fire, so there it blocks.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import batches, compat, following, jobs, link, placement, plan, props, strip_io
from .states import Phase, Status

SOURCE_SUBFOLDER = "source"  # <result folder>/source/: the frames sent, until collected
REGION_SUBFOLDER = "region"  # <result folder>/region/: the region's masks, until sent
# Check GPU Memory waits this long for a plan the server is still making (the first plan of
# a new size takes it up to a minute on its CPU), so the interface never freezes longer;
# the server keeps the plan, so pressing again later answers at once.
PLAN_WAIT_IN_PANEL_S = 4.0
PLAN_PENDING = ("The server is still working out the GPU memory of this size (its first plan "
                "of a size can take a minute); press Check GPU Memory again in a moment.")


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
    region: plan.Region | None = None
    region_renderer: batches.BatchRenderer | None = None  # rendered before the strip
    region_frames: list[plan.MatteFrame] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # the frames' (width, height)

    @property
    def source_folder(self) -> str:
        return os.path.join(self.folder, SOURCE_SUBFOLDER)

    @property
    def region_folder(self) -> str:
        return os.path.join(self.folder, REGION_SUBFOLDER)

    @property
    def percent(self) -> float:
        """Rendering progress over the region's frames and the strip's."""
        parts = [self.renderer] + ([self.region_renderer] if self.region_renderer else [])
        total = sum(part.total for part in parts)
        return 100.0 * sum(part.done for part in parts) / total if total else 100.0


_sessions: dict[str, RenderSession] = {}  # job id -> its render, while it renders


def session_of(job_id: str) -> RenderSession | None:
    return _sessions.get(job_id)


def sessions() -> list[RenderSession]:
    """The renders in progress, oldest first."""
    return list(_sessions.values())


def forget_sessions() -> None:
    """Drop every render session (their file was closed; its records say so)."""
    _sessions.clear()


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


def check_place(context) -> None:
    """The quick checks that need no server: a usable source and region, with a place
    for its result (so a refusal comes before a backend is started)."""
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    region_of(scene, strip, strip_io.strip_span(strip))
    plan.result_channel(strip_io.strip_span(strip), strip.name, strip_io.neighbours(scene))


def plan_memory(context) -> str:
    """Ask the server for the memory plan of transferring the active strip as the panel
    is set (docs/protocol.md §4, `plan`): the line the panel shows, also kept in
    scene.understudy.memory_report. Nothing is rendered or sent but the numbers."""
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    prefs = props.preferences(context)
    values = scene.understudy.values()
    values["prompt"] = values["prompt"] or "a plan"  # the plan does not depend on the words
    if prefs.local:
        values.update(prefs.memory_settings())
    span = strip_io.strip_span(strip)
    regions = 0 if region_of(scene, strip, span) is None else 1  # its masks count too
    settings = plan.transfer_settings(values, span.length)
    size = strip_io.render_size(scene, strip_io.placement_of(scene, strip), int(prefs.max_render_size))
    config = prefs.server_config()
    pending = link.client_api().PlanPending
    try:
        client = link.client_for(config)
        reply = link.guarded(lambda: client.plan(settings, span.length, size,
                                                 wait_s=PLAN_WAIT_IN_PANEL_S, regions=regions))
    except plan.UserError as error:
        if isinstance(error.__cause__, pending):
            raise plan.UserError(PLAN_PENDING) from None  # the connection is fine: keep it
        link.forget(config)
        raise
    scene.understudy.memory_report = plan.memory_line(reply)
    return scene.understudy.memory_report


def start(context, prompt: str = "", tick_budget_s: float | None = None) -> RenderSession:
    """Check everything, record the job (rendering) and return its render session.

    Raises plan.UserError, with nothing in the scene changed, when the strip, the
    settings, the result's place, the result folder or the server is unusable.
    """
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    prefs = props.preferences(context)
    values = scene.understudy.values(prompt)
    if prefs.local:  # this computer's memory settings go with every job
        values.update(prefs.memory_settings())
    span = strip_io.strip_span(strip)
    settings = plan.transfer_settings(values, span.length)  # a bad prompt fails before any network
    region = region_of(scene, strip, span)
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
    plan.check_server_limits(hello, settings, size, region)

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
                            int(prefs.max_render_size), settings, config, previous_index,
                            region, batches.BatchRenderer(frames, tick_budget_s) if region else None,
                            size=size)
    _sessions[job_id] = session
    return session


def region_of(scene, strip, span: plan.Span) -> plan.Region | None:
    """The panel's region for this strip, checked before anything is rendered (None:
    the whole frame changes); plan.UserError when it cannot mark the subject."""
    settings = scene.understudy
    kind = settings.region_kind
    if kind == plan.REGION_MASK:
        mask = settings.region_mask
        shapes = 0 if mask is None else sum(len(spline.points) for layer in mask.layers
                                            for spline in layer.splines)
        return plan.check_region(kind, mask.name if mask else "", strip.name, span,
                                 shapes=shapes)
    matte = next((other for other in compat.top_strips(scene.sequence_editor)
                  if other.name == settings.region_strip), None) if kind == plan.REGION_STRIP else None
    return plan.check_region(kind, settings.region_strip, strip.name, span,
                             matte=strip_io.strip_span(matte) if matte else None)


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
    region_renderer = session.region_renderer
    if region_renderer is not None and not region_renderer.finished:
        frames = region_renderer.next_batch()
        started = time.perf_counter()
        try:
            session.region_frames += strip_io.render_region_frames(
                scene, session.region, session.span, frames, session.region_folder,
                region_renderer.done, session.place, session.max_size)
        except RuntimeError as error:  # bpy.ops.render.render's own failure
            raise plan.UserError(f"Blender could not render {session.region.label} ({error}); "
                                 f"check that it shows in the preview.") from error
        region_renderer.record(len(frames), time.perf_counter() - started)
        if region_renderer.finished:  # the region is whole: check it before the strip renders
            plan.check_region_frames(session.region, session.region_frames, session.size)
        job.percent = session.percent
        return True
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
        job.percent = session.percent
        return True  # the next call submits, so the bar shows 100% rendered first
    paths = [os.path.join(session.source_folder, strip_io.RENDER_FILE.format(index + 1))
             for index in range(renderer.total)]
    frames = [Path(path).read_bytes() for path in paths]
    masks = None
    if session.region is not None:
        masks = [[Path(session.region_folder, strip_io.REGION_FILE.format(index + 1)).read_bytes()
                  for index in range(renderer.total)]]
    client = link.client_for(session.config)
    link.guarded(lambda: client.submit(session.job_id, session.settings, frames, masks=masks))
    strip_io.remove_folder(session.region_folder)  # the server keeps them with the job
    job.status, job.phase, job.percent = Status.SUBMITTED, Phase.NONE, 0.0
    return False


def end_session(session: RenderSession, error: str = "", keep_record: bool = True) -> None:
    """Forget a session; on failure or cancel throw its frames away and record why."""
    _sessions.pop(session.job_id, None)
    if not (error or session.renderer.cancelled):
        return
    strip_io.remove_folder(session.folder)
    scene, job = jobs.find_job(session.job_id)
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
                following.follow()


def cancel_render(job_id: str) -> bool:
    """Stop a job that is still rendering, before its next batch; False if there is none."""
    session = _sessions.get(job_id)
    if session is None:
        return False
    session.renderer.cancel()
    end_session(session)
    return True


