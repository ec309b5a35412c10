"""File events: reopening a file follows its jobs; the first save moves its results.

On reopening, jobs.py records what did not survive the file being closed and follows
the rest. Results of a transfer made in an unsaved file go to a temporary folder; the first save
moves them to `//understudy/<job>/` beside the file and points their strips there.
"""

from __future__ import annotations

import os
import shutil

import bpy

from ..rules.errors import os_reason
from ..rules.names import moved_folder, result_folder
from ..rules.states import NO_RESULT
from ..vse import compat
from . import jobs


@bpy.app.handlers.persistent
def on_file_loaded(_filepath) -> None:
    """Reopening a file reconnects to its unfinished jobs and collects finished results."""
    jobs.file_loaded()


_moved: list[tuple[str, str, str]] = []  # (job id, new absolute folder, folder as stored)


def _in_temp_folder(job) -> bool:
    return bool(job.frames_dir) and not job.frames_dir.startswith("//")


@bpy.app.handlers.persistent
def on_save_pre(filepath, *_args) -> None:
    """First save of a file: move results out of the temporary folder to
    `//understudy/<job>/` beside it and point their strips there.

    This runs before Blender writes the file (it receives the new path), so the saved
    .blend already holds the relative paths; on_save_post puts back absolute paths if
    the save was a copy (the open file stays unsaved)."""
    _moved.clear()
    if bpy.data.filepath or not filepath:
        return
    for scene in bpy.data.scenes:
        for job in getattr(scene, "understudy_jobs", ()):
            if not _in_temp_folder(job) or (job.status in NO_RESULT and not job.take_records):
                continue  # failed and cancelled jobs left no frames (but the takes they made)
            old = bpy.path.abspath(job.frames_dir).rstrip("/\\")
            new, stored, _ = result_folder(filepath, job.job_id, "")
            try:
                move_folder(old, new)
            except OSError as error:
                job.message = (f"Could not move the frames from {old} to {new} ({os_reason(error)}); "
                               f"copy the folder there and relink the strip.")
                continue
            session = jobs.render_session(job.job_id)
            if session is not None:
                session.folder = new
            for strip in compat.all_strips(scene.sequence_editor) if scene.sequence_editor else ():
                inside = (moved_folder(bpy.path.abspath(strip.directory), old, stored)
                          if strip.type == "IMAGE" else None)
                if inside is not None:  # the result, or a take's
                    strip.directory = inside
            job.frames_dir = stored
            if job.message.startswith("The file is unsaved"):
                job.message = ""
            _moved.append((job.job_id, new, stored))


def move_folder(old: str, new: str) -> None:
    if not os.path.isdir(old):
        raise FileNotFoundError(2, "the folder is gone", old)
    os.makedirs(os.path.dirname(new), exist_ok=True)
    shutil.move(old, new)


@bpy.app.handlers.persistent
def on_save_post(_filepath, *_args) -> None:
    """After a save that left the file unsaved (a copy): relative paths point nowhere, so
    the moved results are pointed at by their absolute folders."""
    if bpy.data.filepath:
        _moved.clear()
        return
    for job_id, new, stored in _moved:
        scene, job = jobs.find_job(job_id)
        if job is None:
            continue
        absolute = new + os.sep
        for strip in compat.all_strips(scene.sequence_editor) if scene.sequence_editor else ():
            inside = (moved_folder(strip.directory, stored.rstrip("/"), absolute)
                      if strip.type == "IMAGE" else None)
            if inside is not None:
                strip.directory = inside
        job.frames_dir = absolute
    _moved.clear()


HANDLERS = ((bpy.app.handlers.load_post, on_file_loaded),
            (bpy.app.handlers.save_pre, on_save_pre),
            (bpy.app.handlers.save_post, on_save_post))


def register() -> None:
    for handlers, function in HANDLERS:
        handlers.append(function)


def unregister() -> None:
    for handlers, function in HANDLERS:
        if function in handlers:
            handlers.remove(function)
