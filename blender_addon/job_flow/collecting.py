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
from ..rules.names import SOURCE_SUBFOLDER, frame_file_names, strip_name
from ..rules.states import COLLECT_HINT
from ..vse import placement, strip_io

SIDECAR_NAME = "sidecar.json"


class NotPlaced(UserError):
    """A finished job's result could not be saved or placed; once the cause is fixed,
    Collect Results tries again."""


def save_result(job, frames: list[bytes], sidecar: dict) -> None:
    """Write a finished job's frames and sidecar into its result folder."""
    folder = bpy.path.abspath(job.frames_dir)
    try:
        strip_io.write_result_frames(frames, folder, job.length)
        Path(folder, SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2))
    except OSError as error:
        raise NotPlaced(f"Could not save the result frames in {folder} ({os_reason(error)}); "
                        f"make the folder writable, then {COLLECT_HINT}.") from error


def frames_on_disk(job) -> bool:
    folder = bpy.path.abspath(job.frames_dir)
    return all(Path(folder, name).is_file() for name in frame_file_names(job.length))


def prepare_frames(job, indices) -> None:
    """Give these result frames their place (a crop's canvas), the source's
    transparency where the source had any, and, edited in a region, the layer that
    gives the composite over the source."""
    folder = bpy.path.abspath(job.frames_dir)
    files = frame_file_names(job.length)
    try:
        canvas = result_canvas(job)
        region = composited(job)
        for index in indices:
            strip_io.finish_result_frame(
                os.path.join(folder, files[index]),
                os.path.join(folder, SOURCE_SUBFOLDER, strip_io.RENDER_FILE.format(index + 1)),
                canvas, region)
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


def add_result_strip(scene, job):
    """Add the result strip from the frames in the job's folder, placed like the source;
    the strip."""
    folder = bpy.path.abspath(job.frames_dir)
    files = frame_file_names(job.length)
    strip_io.remove_folder(os.path.join(folder, SOURCE_SUBFOLDER))
    try:
        channel = result_channel(job.span(), job.source_name, strip_io.neighbours(scene),
                                 then=f"then {COLLECT_HINT} to place the result")
    except UserError as error:
        raise NotPlaced(str(error)) from error
    place_info = (placement.Placement.from_json(job.placement) if job.placement else
                  placement.Placement(placement.CANVAS, scene.render.resolution_x,
                                      scene.render.resolution_y))
    width, height = strip_io.png_file_size(os.path.join(folder, files[0]))
    look = placement.result_look(place_info, width, height)
    if composited(job):  # a layer over the source, seen through its feathered region
        look["blend_type"] = "ALPHA_OVER"
    return strip_io.add_result_strip(scene, strip_name(job.prompt), folder, job.frames_dir,
                                     files, channel, job.frame_start, look)
