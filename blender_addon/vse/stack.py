"""A job's takes in the timeline: a take stack.

A job of several takes lands as one meta strip (the stack) on the result's channel,
holding one image strip per take on its own channel inside (take k on channel k),
the first take placed shown and the others muted: the takes move, trim and cut
together, and Next / Previous take only changes which one is muted. Each take strip
gets the result's transform, crop and flips (placement.result_look); the blending
(the source's blend mode and opacity, or the region's alpha-over) is the stack's, so
it is applied once, as a single result strip applies it. A one-take result is a plain
image strip and counts as a stack of one. Both carry custom properties
(rules/names.py JOB_PROPERTY, TAKE_PROPERTY) that name their job and take, so finding
them survives renaming and undo.

bpy at the edge: what to show is rules/takes.py's choice.
"""

from __future__ import annotations

from ..rules.names import JOB_PROPERTY, TAKE_PROPERTY
from ..rules.takes import visible_take
from . import compat, strip_io


def find_stack(scene, job_id: str):
    """The top-level strip holding a job's result (its stack, or its one result strip)."""
    editor = scene.sequence_editor
    if editor is None:
        return None
    return next((strip for strip in compat.top_strips(editor)
                 if strip.get(JOB_PROPERTY) == job_id), None)


def stack_of(scene, strip):
    """The stack (or one-take result strip) a strip is, or is a take of; None for any
    other strip."""
    if strip is None:
        return None
    if strip.get(JOB_PROPERTY):
        return strip
    parent = strip.parent_meta() if hasattr(strip, "parent_meta") else None
    return parent if parent is not None and parent.get(JOB_PROPERTY) else None


def take_strips(stack) -> dict[int, object]:
    """Take number -> its image strip, in a stack (a one-take result: itself, take 1)."""
    if stack.type != "META":
        return {int(stack.get(TAKE_PROPERTY, 1)): stack}
    return {int(strip[TAKE_PROPERTY]): strip for strip in compat.meta_strips(stack)
            if strip.get(TAKE_PROPERTY)}


def shown_take(stack) -> int | None:
    """The take the stack shows (rules/takes.py visible_take)."""
    return visible_take([(number, strip.channel, bool(strip.mute))
                         for number, strip in take_strips(stack).items()])


def show_take(stack, number: int) -> None:
    """Show take `number` and mute the others; nothing else changes."""
    for take, strip in take_strips(stack).items():
        if strip.mute != (take != number):
            strip.mute = take != number


def add_take(scene, stack, job_id: str, take: int, names: tuple[str, str], folder: str,
             stored_folder: str, files: list[str], place: tuple[int, int, int], look: dict):
    """Add take `take` to the job's stack, making the stack first (`stack` None) on
    `place` = (channel, first frame, length); (stack, take strip). `names` = (the
    stack's, the take's). The first take in the stack shows; later ones come muted."""
    channel, frame_start, length = place
    if stack is None:
        stack = compat.top_strips(scene.sequence_editor).new_meta(
            name=names[0], channel=channel, frame_start=frame_start)
        stack[JOB_PROPERTY] = job_id
        stack.blend_type, stack.blend_alpha = look["blend_type"], look["blend_alpha"]
    takes = take_strips(stack)
    # Inside the stack the take is drawn over nothing; the stack blends it into the edit.
    inner = {**look, "blend_type": "ALPHA_OVER", "blend_alpha": 1.0}
    start = next(iter(takes.values())).frame_start if takes else stack.frame_start
    strip = strip_io.add_result_strip(scene, names[1], folder, stored_folder, files, take,
                                      int(start), inner, strips=compat.meta_strips(stack))
    strip[TAKE_PROPERTY] = take
    strip.mute = any(not other.mute for other in takes.values())
    if not takes:  # a new meta spans one frame until told (compat.py)
        stack.frame_final_duration = length
    return stack, strip


def replace_take(strip, stored_folder: str, look: dict) -> None:
    """Show other frames (of the same count and names) in a take strip, placed by
    `look`; its blending, channel, timing and mute stay as they are."""
    strip.directory = stored_folder
    strip_io.apply_look(strip, {**look, "blend_type": strip.blend_type,
                                "blend_alpha": strip.blend_alpha})
