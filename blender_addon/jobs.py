"""A job's life in Blender, and what its three duties share.

A transfer is checked and its strip rendered (rendering.py), the job followed on the
server (following.py), and its result collected and placed (collecting.py). This
module holds what they share: whether long work runs in timer ticks, the one work
timer that renders and places a batch per tick, finding a job record, and the file's
job lists.
"""

from __future__ import annotations

import bpy

from . import collecting, following, link, rendering
from .states import Status

WORK_INTERVAL_S = 0.01  # between render (or placing) ticks: Blender handles events in between
# Whether long work runs in timer ticks (the interface) or blocks (background mode, where
# timers never fire). A test may set it to take the interface's path in the bpy module.
BATCHED = not bpy.app.background


def work_tick() -> float | None:
    """The interface's work timer: one batch of the oldest render, else of the oldest
    result being placed; None (the timer stops) when there is nothing left."""
    renders = rendering.sessions()
    if renders:
        rendering.render_step(renders[0])
    elif collecting.placing():
        collecting.place_tick()
    else:
        return None
    redraw_sequencers()
    return WORK_INTERVAL_S if rendering.sessions() or collecting.placing() else None


def work_in_batches() -> None:
    """Interface: render (and place) from a timer, a batch per tick (timers never fire in
    background mode)."""
    if not bpy.app.timers.is_registered(work_tick):
        bpy.app.timers.register(work_tick, first_interval=0.0)


def find_job(job_id: str):
    """(scene, job record) for a job id in any scene of this file, or (None, None)."""
    for scene in bpy.data.scenes:
        for job in getattr(scene, "understudy_jobs", ()):
            if job.job_id == job_id:
                return scene, job
    return None, None


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



def forget_sessions() -> None:
    """Drop every render and placing session (their file was closed; its records say so)."""
    rendering.forget_sessions()
    collecting.forget_placing()


def register() -> None:
    """Nothing to register: the timers start when there is something to render or follow."""


def unregister() -> None:
    for timer in (following.poll_once, work_tick):
        if bpy.app.timers.is_registered(timer):
            bpy.app.timers.unregister(timer)
    forget_sessions()
    link.close_all()
