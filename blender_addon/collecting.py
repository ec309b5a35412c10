"""Collecting a finished job: save its frames and sidecar, prepare them, add the strip.

Placing a result that keeps the source's transparency rewrites every frame, so in the
interface that runs in batches from the work timer (jobs.work_tick); in background
mode it runs at once. A result that cannot be saved or placed stays collectable.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import bpy

from . import batches, following, jobs, link, placement, plan, rendering, strip_io
from .states import COLLECT_HINT, Phase, Status

SIDECAR_NAME = "sidecar.json"

_placing: dict[str, batches.BatchRenderer] = {}  # job id -> result frames still to prepare


def placing() -> bool:
    """Whether some result's frames are still being prepared."""
    return bool(_placing)


def forget_placing() -> None:
    """Drop every placing session (their file was closed; its records say so)."""
    _placing.clear()


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
    if not jobs.BATCHED:
        prepare_frames(job, range(job.length))
        add_result(scene, job)
        return
    job.status, job.phase, job.percent = Status.PLACING, Phase.PLACING, 0.0
    _placing[job.job_id] = batches.BatchRenderer(list(range(job.length)))
    jobs.work_in_batches()


def place_tick() -> None:
    """One batch of the oldest result being placed; the strip is added after the last."""
    job_id, work = next(iter(_placing.items()))
    scene, job = jobs.find_job(job_id)
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
    """Give these result frames their place (a crop's canvas), the source's
    transparency where the source had any, and, edited in a region, the layer that
    gives the composite over the source."""
    folder = bpy.path.abspath(job.frames_dir)
    files = plan.frame_file_names(job.length)
    try:
        canvas = result_canvas(job)
        region = composited(job)
        for index in indices:
            strip_io.finish_result_frame(
                os.path.join(folder, files[index]),
                os.path.join(folder, rendering.SOURCE_SUBFOLDER, strip_io.RENDER_FILE.format(index + 1)),
                canvas, region)
    except OSError as error:
        raise unplaced(job, f"Could not rewrite the result frames in {folder} ({plan.os_reason(error)}); "
                            f"make the folder writable, then {COLLECT_HINT}.") from error


def composited(job) -> bool:
    """Whether the result was composited through a region (its sidecar says so)."""
    try:
        sidecar = json.loads(job.sidecar) if job.sidecar else {}
    except ValueError:
        return False
    regions = sidecar.get("regions") if isinstance(sidecar, dict) else None
    return isinstance(regions, dict) and bool(regions.get("composited"))


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
    strip_io.remove_folder(os.path.join(folder, rendering.SOURCE_SUBFOLDER))
    try:
        channel = plan.result_channel(job.span(), job.source_name, strip_io.neighbours(scene),
                                      then=f"then {COLLECT_HINT} to place the result")
    except plan.UserError as error:
        raise unplaced(job, str(error)) from error
    place_info = (placement.Placement.from_json(job.placement) if job.placement else
                  placement.Placement(placement.CANVAS, scene.render.resolution_x,
                                      scene.render.resolution_y))
    width, height = strip_io.png_file_size(os.path.join(folder, files[0]))
    look = placement.result_look(place_info, width, height)
    if composited(job):  # a layer over the source, seen through its feathered region
        look["blend_type"] = "ALPHA_OVER"
    strip = strip_io.add_result_strip(scene, plan.strip_name(job.prompt), folder, job.frames_dir,
                                      files, channel, job.frame_start, look)
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
    client, _ = following.client_for_job(job)
    fetch_and_collect(scene, job, client)


