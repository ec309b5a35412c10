"""Rendering a strip for a job: check everything, render its frames, submit them.

Every check that can fail (the strip, the region, the settings, the result's channel,
the result folder, the server and its limits) runs before the first frame is
rendered. With a region (a Mask or a matte strip), the region is rendered first, over
the same frames and at the same size as the strip, and its pixels are checked (it
must mark a subject and keep a plate) before the strip is rendered and anything is
sent. Frames are rendered in the interface a few per work-timer tick (batches.py,
jobs.work_tick), so the progress bar and Cancel are live from the first frame; in
background mode (`blender -b`, the bpy module) timers never fire, so there it blocks.

A step of the job flow: jobs.py records the job, keeps its render session, calls
`advance` batch by batch and records what came of it; nothing here changes a job
record.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from .. import addon
from ..connection import link
from ..rules.channels import Span, result_channel
from ..rules.errors import UserError, os_reason
from ..rules.look import check_look
from ..rules.memory_plan import memory_line
from ..rules.names import REGION_SUBFOLDER, SOURCE_SUBFOLDER, new_job_id, result_folder
from ..rules.panel_settings import transfer_settings
from ..rules.regions import (
    REGION_MASK,
    REGION_STRIP,
    MatteFrame,
    Region,
    check_region,
    check_region_frames,
)
from ..rules.server_hello import (
    check_server_limits,
    check_takes,
    frames_to_render,
    server_frame_limit,
)
from ..rules.takes import FINAL
from ..vse import compat, placement, strip_io
from . import batches

# Check GPU Memory waits this long for a plan the server is still making (the first plan of
# a new size takes it up to a minute on its CPU), so the interface never freezes longer;
# the server keeps the plan, so pressing again later answers at once.
PLAN_WAIT_IN_PANEL_S = 4.0
PLAN_PENDING = ("The server is still working out the GPU memory of this size (its first plan "
                "of a size can take a minute); press Check GPU Memory again in a moment.")


@dataclass(frozen=True)
class FinalOf:
    """Render Final: the take whose preview this job's result replaces, and what renders
    it (the source strip as the preview job recorded it, the take's own settings)."""

    job_id: str
    take: int
    source_name: str
    span: Span
    values: dict  # rules/takes.py final_values: the take's settings at quality final
    had_region: bool  # the preview was edited in a region


@dataclass(frozen=True)
class TransferRequest:
    """What a transfer asks for beyond the panel's settings: the prompt (empty: the
    panel's), its quality, how many takes, and for Render Final the take it replaces."""

    prompt: str = ""
    quality: str = FINAL
    takes: int = 1
    final_of: FinalOf | None = None


@dataclass
class RenderSession:
    """One strip being rendered for a job that is not sent yet."""

    job_id: str
    scene_name: str
    strip_name: str
    span: Span
    renderer: batches.BatchRenderer
    folder: str  # the job's result folder (absolute)
    stored_folder: str  # the same folder as Blender stores it (relative beside a saved file)
    place: placement.Placement
    max_size: int
    settings: dict
    config: link.ServerConfig
    previous_index: int = 0  # the job list's selection before this job was added
    region: Region | None = None
    region_renderer: batches.BatchRenderer | None = None  # rendered before the strip
    region_frames: list[MatteFrame] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # the frames' (width, height)
    request: TransferRequest = field(default_factory=TransferRequest)
    look: bytes | None = None  # the panel's Look as a PNG, sent as the job's reference

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
        raise UserError(f"The result folder {folder} cannot be written ({os_reason(error)}); "
                        f"make it a folder you can write to, or save the .blend elsewhere."
                        ) from error


def check_place(context) -> None:
    """The quick checks that need no server: a usable source and region, with a place
    for its result (so a refusal comes before a backend is started)."""
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    region_of(scene, strip, strip_io.strip_span(strip))
    result_channel(strip_io.strip_span(strip), strip.name, strip_io.neighbours(scene))


def plan_memory(context) -> str:
    """Ask the server for the memory plan of transferring the active strip as the panel
    is set (docs/protocol.md §4, `plan`): the line the panel shows, also kept in
    scene.understudy.memory_report. Nothing is rendered or sent but the numbers."""
    scene = compat.sequencer_scene(context)
    strip = strip_io.source_strip(scene)
    prefs = addon.preferences(context)
    values = scene.understudy.values()
    values["prompt"] = values["prompt"] or "a plan"  # the plan does not depend on the words
    if prefs.local:
        values.update(prefs.memory_settings())
    span = strip_io.strip_span(strip)
    regions = 0 if region_of(scene, strip, span) is None else 1  # its masks count too
    settings = transfer_settings(values, span.length)
    size = strip_io.render_size(scene, strip_io.placement_of(scene, strip), int(prefs.max_render_size))
    takes = int(scene.understudy.takes)  # the batch of takes the engine would run
    config = prefs.server_config()
    pending = link.client_api().PlanPending
    try:
        client = link.client_for(config)
        hello = link.known_hello(config) or link.guarded(client.hello)
    except UserError:
        link.forget(config)
        raise
    check_takes(hello, takes)  # an older server would plan one take
    try:
        reply = link.guarded(lambda: client.plan(settings, span.length, size,
                                                 wait_s=PLAN_WAIT_IN_PANEL_S, regions=regions,
                                                 takes=takes))
    except UserError as error:
        if isinstance(error.__cause__, pending):
            raise UserError(PLAN_PENDING) from None  # the connection is fine: keep it
        link.forget(config)
        raise
    scene.understudy.memory_report = memory_line(reply)
    return scene.understudy.memory_report


def new_session(context, request: TransferRequest, tick_budget_s: float | None = None
                ) -> RenderSession:
    """Check everything and return the render session of a new job (jobs.start_render
    records it).

    Raises UserError, with nothing in the scene changed, when the strip, the
    settings, the result's place, the result folder or the server is unusable.
    """
    scene = compat.sequencer_scene(context)
    final_of = request.final_of
    if final_of is None:
        strip = strip_io.source_strip(scene)
        values = {**scene.understudy.values(request.prompt), "quality": request.quality}
    else:  # the preview's source, as it was: the final must be of the same frames
        strip = named_source(scene, final_of.source_name, final_of.span)
        values = dict(final_of.values)
    prefs = addon.preferences(context)
    if prefs.local:  # this computer's memory settings go with every job
        values.update(prefs.memory_settings())
    span = strip_io.strip_span(strip)
    settings = transfer_settings(values, span.length)  # a bad prompt fails before any network
    region = region_of(scene, strip, span)
    if final_of is None:  # a final replaces its take in place: it needs no new channel
        result_channel(span, strip.name, strip_io.neighbours(scene))
    elif final_of.had_region and region is None:
        raise UserError(f"Take {final_of.take} was made inside a region; pick that region in "
                        f"the panel again, then Render Final.")
    place = strip_io.placement_of(scene, strip)
    size = strip_io.render_size(scene, place, int(prefs.max_render_size))
    job_id = new_job_id()
    folder, stored, _ = result_folder(bpy.data.filepath, job_id, tempfile.gettempdir())
    check_writable(str(Path(folder).parent))
    config = prefs.server_config()
    try:
        client = link.client_for(config)
        hello = link.guarded(client.hello)
    except UserError:
        link.forget(config)
        raise
    frames = frames_to_render(span, server_frame_limit(hello), repr(strip.name))
    check_server_limits(hello, settings, size, region)
    check_takes(hello, request.takes)
    look = strip_io.look_png(scene, scene.understudy)
    check_look(hello, look is not None)
    return RenderSession(job_id, scene.name, strip.name, span,
                         batches.BatchRenderer(frames, tick_budget_s), folder, stored, place,
                         int(prefs.max_render_size), settings, config, region=region,
                         region_renderer=batches.BatchRenderer(frames, tick_budget_s)
                         if region else None, size=size, request=request, look=look)


def named_source(scene, name: str, span: Span):
    """The strip a preview was made from, unmoved since (Render Final renders it again)."""
    strip = next((other for other in compat.top_strips(scene.sequence_editor)
                  if other.name == name), None) if scene.sequence_editor else None
    if strip is None or strip_io.strip_span(strip) != span:
        raise UserError(f"{name!r}, the strip the preview was made from, was moved, trimmed or "
                        f"deleted since; put it back, or select it and click Transfer Motion.")
    strip_io.check_source_strip(scene, strip)
    return strip


def region_of(scene, strip, span: Span) -> Region | None:
    """The panel's region for this strip, checked before anything is rendered (None:
    the whole frame changes); UserError when it cannot mark the subject."""
    settings = scene.understudy
    kind = settings.region_kind
    if kind == REGION_MASK:
        mask = settings.region_mask
        shapes = 0 if mask is None else sum(len(spline.points) for layer in mask.layers
                                            for spline in layer.splines)
        return check_region(kind, mask.name if mask else "", strip.name, span,
                                 shapes=shapes)
    matte = next((other for other in compat.top_strips(scene.sequence_editor)
                  if other.name == settings.region_strip), None) if kind == REGION_STRIP else None
    return check_region(kind, settings.region_strip, strip.name, span,
                             matte=strip_io.strip_span(matte) if matte else None)


def _source_strip(session: RenderSession, scene):
    """The session's source strip in its scene, checking it did not move meanwhile."""
    strip = next((other for other in compat.top_strips(scene.sequence_editor)
                  if other.name == session.strip_name), None) if scene.sequence_editor else None
    if strip is None or strip_io.strip_span(strip) != session.span:
        raise UserError(f"{session.strip_name!r} was moved, trimmed or deleted while it was "
                        f"being rendered; nothing was sent, so transfer it again.")
    return strip


def advance(session: RenderSession, scene) -> bool:
    """Render the session's next batch, or submit once all are rendered; True while more
    remains, False once submitted (or cancelled). Raises UserError (rendering or
    submitting failed); the caller ends the session."""
    strip = _source_strip(session, scene)
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
            raise UserError(f"Blender could not render {session.region.label} ({error}); "
                            f"check that it shows in the preview.") from error
        region_renderer.record(len(frames), time.perf_counter() - started)
        if region_renderer.finished:  # the region is whole: check it before the strip renders
            check_region_frames(session.region, session.region_frames, session.size)
        return True
    if not renderer.finished:
        frames = renderer.next_batch()
        started = time.perf_counter()
        try:
            strip_io.render_frames(scene, strip, frames, session.source_folder, renderer.done,
                                   session.place, session.max_size)
        except RuntimeError as error:  # bpy.ops.render.render's own failure
            raise UserError(f"Blender could not render {strip.name!r} ({error}); check "
                            f"that the strip plays in the preview.") from error
        renderer.record(len(frames), time.perf_counter() - started)
        return True  # the next call submits, so the bar shows 100% rendered first
    paths = [os.path.join(session.source_folder, strip_io.RENDER_FILE.format(index + 1))
             for index in range(renderer.total)]
    frames = [Path(path).read_bytes() for path in paths]
    masks = None
    if session.region is not None:
        masks = [[Path(session.region_folder, strip_io.REGION_FILE.format(index + 1)).read_bytes()
                  for index in range(renderer.total)]]
    client = link.client_for(session.config)
    extra = {"takes": session.request.takes} if session.request.takes > 1 else {}
    if session.look is not None:  # the Look goes as the job's one reference image
        extra["references"] = [session.look]
    link.guarded(lambda: client.submit(session.job_id, session.settings, frames, masks=masks,
                                       **extra))
    strip_io.remove_folder(session.region_folder)  # the server keeps them with the job
    return False
