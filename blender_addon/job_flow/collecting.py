"""Collecting a finished job: save its frames and sidecar, prepare them, add the strip.

A step of the job flow: jobs.py calls these in order and records what came of them.
Placing a result that keeps the source's transparency rewrites every frame, so in the
interface jobs.py runs `prepare_frames` in batches from its work timer; in background
mode at once. A result that cannot be saved or placed raises NotPlaced, and jobs.py
keeps it collectable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bpy

from ..rules.channels import result_channel
from ..rules.errors import UserError, os_reason
from ..rules.names import (
    JOB_PROPERTY,
    SOURCE_SUBFOLDER,
    TAKE_PROPERTY,
    frame_file_names,
    stack_name,
    strip_name,
    take_folder,
    take_strip_name,
)
from ..rules.states import COLLECT_HINT
from ..rules.takes import PREVIEW
from ..vse import placement, stack, strip_io

SIDECAR_NAME = "sidecar.json"


class NotPlaced(UserError):
    """A finished job's result could not be saved or placed; once the cause is fixed,
    Collect Results tries again."""


def result_frames_folder(job, take: int = 0) -> str:
    """Where a job's result frames are (absolute): its result folder, or take k's
    subfolder of it (take 0: the job's one result)."""
    folder = bpy.path.abspath(job.frames_dir)
    return take_folder(folder, take) if take else folder


def save_result(job, frames: list[bytes], sidecar: dict, take: int = 0) -> None:
    """Write a finished job's frames and sidecar into its result folder (take k's
    subfolder for a take)."""
    folder = result_frames_folder(job, take)
    try:
        strip_io.write_result_frames(frames, folder, job.length)
        Path(folder, SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2))
    except OSError as error:
        raise NotPlaced(f"Could not save the result frames in {folder} ({os_reason(error)}); "
                        f"make the folder writable, then {COLLECT_HINT}.") from error


def frames_on_disk(job, take: int = 0) -> bool:
    folder = result_frames_folder(job, take)
    return all(Path(folder, name).is_file() for name in frame_file_names(job.length))


def prepare_frames(job, indices, take: int = 0) -> None:
    """Give these result frames (take k's for a take) their place (a crop's canvas),
    the source's transparency where the source had any, and, edited in a region, the
    layer that gives the composite over the source."""
    folder = result_frames_folder(job, take)
    source = os.path.join(bpy.path.abspath(job.frames_dir), SOURCE_SUBFOLDER)
    files = frame_file_names(job.length)
    try:
        canvas = result_canvas(job)
        region = composited(job)
        for index in indices:
            strip_io.finish_result_frame(
                os.path.join(folder, files[index]),
                os.path.join(source, strip_io.RENDER_FILE.format(index + 1)), canvas, region)
    except OSError as error:
        raise NotPlaced(f"Could not rewrite the result frames in {folder} ({os_reason(error)}); "
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


def result_look(scene, job, placed_job, folder: str) -> dict:
    """How a result strip sits (placement.result_look): placed like `placed_job`'s source
    (the job itself, or the preview a final replaces), for this job's frames in `folder`."""
    scene_size = (scene.render.resolution_x, scene.render.resolution_y)
    place_info = (placement.Placement.from_json(placed_job.placement) if placed_job.placement
                  else placement.Placement(placement.CANVAS, *scene_size))
    width, height = strip_io.png_file_size(os.path.join(folder, frame_file_names(job.length)[0]))
    look = placement.result_look(place_info, width, height)
    if composited(job):  # a layer over the source, seen through its feathered region
        look["blend_type"] = "ALPHA_OVER"
    return look


def remove_sent_frames(job) -> None:
    """The frames sent are needed only to prepare the result's: gone once it is placed."""
    strip_io.remove_folder(os.path.join(bpy.path.abspath(job.frames_dir), SOURCE_SUBFOLDER))


def result_place(scene, job) -> int:
    """The channel a job's result (or its take stack) goes on; NotPlaced without one."""
    try:
        return result_channel(job.span(), job.source_name, strip_io.neighbours(scene),
                              then=f"then {COLLECT_HINT} to place the result")
    except UserError as error:
        raise NotPlaced(str(error)) from error


def add_result_strip(scene, job):
    """Add the result strip from the frames in the job's folder, placed like the source;
    the strip (marked as the job's one take, vse/stack.py)."""
    folder = bpy.path.abspath(job.frames_dir)
    files = frame_file_names(job.length)
    remove_sent_frames(job)
    channel = result_place(scene, job)
    name = (take_strip_name(job.prompt, job.seed, job.quality) if job.quality == PREVIEW
            else strip_name(job.prompt))
    strip = strip_io.add_result_strip(scene, name, folder, job.frames_dir, files, channel,
                                      job.frame_start, result_look(scene, job, job, folder))
    strip[JOB_PROPERTY], strip[TAKE_PROPERTY] = job.job_id, 1
    return strip


def add_take_strip(scene, job, take: int, prompt: str, seed: str):
    """Add take k's strip to the job's stack (made with the first take); (stack, strip)."""
    folder = result_frames_folder(job, take)
    existing = stack.find_stack(scene, job.job_id)
    place = (result_place(scene, job) if existing is None else 0, job.frame_start, job.length)
    return stack.add_take(
        scene, existing, job.job_id, take,
        (stack_name(job.prompt, job.takes), take_strip_name(prompt, seed, job.quality)),
        folder, take_folder(job.frames_dir, take), frame_file_names(job.length), place,
        result_look(scene, job, job, folder))


def replace_with_final(scene, final, target, take: int):
    """Show the final job's frames in place of take k of `target` (its stack, or its one
    result strip): same slot, same placement; the take strip, renamed as a final."""
    holder = stack.find_stack(scene, target.job_id)
    strip = stack.take_strips(holder).get(take) if holder is not None else None
    if strip is None:
        raise NotPlaced(f"Take {take} of {target.job_id}, which the final replaces, is no longer "
                        f"in the timeline; undo its deletion, then {COLLECT_HINT}.")
    if len(strip.elements) != final.length:
        raise NotPlaced(f"The final has {final.length} frames and take {take} shows "
                        f"{len(strip.elements)}; trim the source as it was, then Render Final "
                        f"again.")
    folder = bpy.path.abspath(final.frames_dir)
    remove_sent_frames(final)
    stack.replace_take(strip, final.frames_dir, result_look(scene, final, target, folder))
    strip.name = take_strip_name(final.prompt, final.seed, final.quality)
    return strip
