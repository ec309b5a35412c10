"""Strip input and output: render a strip's visible frames, add the result strip.

Rendering goes through the sequencer (so every strip type, effects and transforms
included, looks as it does in the preview) with the source strip alone, at a bounded
size. Every scene setting it touches is recorded first and put back afterwards, also
when rendering fails; the source strip itself is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import compat, plan

RENDER_FILE = "source_{:05d}.png"


class Snapshot:
    """Sets attributes and remembers their old values, to put everything back later."""

    def __init__(self) -> None:
        self._saved: list[tuple[object, str, object]] = []

    def set(self, owner: object, name: str, value: object) -> None:
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def remember(self, owner: object, name: str) -> None:
        """Record a value that something else (an operator) will change."""
        self._saved.append((owner, name, getattr(owner, name)))

    def restore(self) -> None:
        """Put back every value, newest change first; one failure does not stop the rest."""
        failures = []
        for owner, name, value in reversed(self._saved):
            try:
                setattr(owner, name, value)
            except (AttributeError, TypeError, ValueError) as error:
                failures.append(f"{name}: {error}")
        self._saved.clear()
        if failures:
            raise RuntimeError("could not restore " + "; ".join(failures))


def strip_span(strip) -> plan.Span:
    """A strip's channel and visible frames."""
    return plan.Span(strip.channel, strip.frame_final_start, strip.frame_final_end)


def strip_is_hidden(scene, strip) -> bool:
    """True when the strip or its channel is muted, so a render would not show it."""
    return bool(strip.mute or scene.sequence_editor.channels[strip.channel].mute)


def effect_inputs(strip) -> list:
    """The strips an effect strip draws from, recursively (they must stay visible)."""
    found = []
    for name in ("input_1", "input_2"):
        source = getattr(strip, name, None)
        if source is not None:
            found += [source, *effect_inputs(source)]
    return found


def missing_media(strip) -> str:
    """The file a movie or image strip shows, when that file is missing; else ''."""
    import bpy

    if strip.type == "MOVIE":
        path = bpy.path.abspath(strip.filepath)
    elif strip.type == "IMAGE" and len(strip.elements):
        path = os.path.join(bpy.path.abspath(strip.directory), strip.elements[0].filename)
    else:
        return ""
    return "" if os.path.isfile(path) else path


def source_strip(scene):
    """The active strip if it can be transferred; raise plan.UserError otherwise."""
    strip = compat.active_strip(scene) if scene is not None else None
    if strip is None:
        plan.check_source(None, "", None, False)
    top_names = {other.name for other in compat.top_strips(scene.sequence_editor)}
    if strip.name not in top_names:
        raise plan.UserError(f"The active strip {strip.name!r} is inside a meta strip; leave the "
                             f"meta strip (Tab) and select the meta strip itself.")
    plan.check_source(strip.type, strip.name, strip_span(strip), strip_is_hidden(scene, strip),
                      missing_media(strip))
    return strip


def render_frames(scene, strip, frames: list[int], folder: str, max_size: int) -> list[str]:
    """Render the given timeline frames with only `strip` visible; return the PNG paths.

    The image is the sequencer's output (the whole canvas) scaled so its long side is at
    most `max_size` pixels.
    """
    import bpy

    os.makedirs(folder, exist_ok=True)
    render = scene.render
    keep = {strip.name, *(source.name for source in effect_inputs(strip))}
    snapshot = Snapshot()
    snapshot.remember(scene, "frame_current")
    paths = []
    try:
        for other in compat.top_strips(scene.sequence_editor):
            if other.name not in keep and not other.mute:
                snapshot.set(other, "mute", True)
        snapshot.set(render, "resolution_percentage",
                     plan.render_percentage(render.resolution_x, render.resolution_y, max_size))
        snapshot.set(render, "use_sequencer", True)
        snapshot.set(render, "use_compositing", False)
        snapshot.set(render, "use_stamp", False)
        snapshot.set(render, "use_file_extension", True)
        snapshot.remember(render, "filepath")
        for name in compat.image_settings_fields(render.image_settings):
            snapshot.remember(render.image_settings, name)
        compat.use_png_output(render.image_settings)
        # The server should see the strip's own pixels, not a tone-mapped version.
        for name in ("view_transform", "look", "exposure", "gamma", "use_curve_mapping"):
            snapshot.remember(scene.view_settings, name)
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
        scene.view_settings.use_curve_mapping = False
        for index, frame in enumerate(frames):
            path = os.path.join(folder, RENDER_FILE.format(index + 1))
            scene.frame_set(frame)
            render.filepath = path
            bpy.ops.render.render(write_still=True, scene=scene.name)
            if not os.path.isfile(path):
                raise plan.UserError(f"Blender rendered no image for frame {frame} of "
                                     f"{strip.name!r}; check that the strip shows a picture there.")
            paths.append(path)
    finally:
        snapshot.restore()
        scene.frame_set(scene.frame_current)  # re-evaluate the restored frame
    return paths


def write_result_frames(frames: list[bytes], folder: str, length: int) -> list[str]:
    """Write the result's PNGs, retimed to `length` frames; return the file names."""
    os.makedirs(folder, exist_ok=True)
    names = plan.frame_file_names(length)
    for name, index in zip(names, plan.retime_indices(len(frames), length), strict=True):
        Path(folder, name).write_bytes(frames[index])
    return names


def add_result_strip(scene, name: str, folder: str, stored_folder: str, files: list[str],
                     source: plan.Span):
    """The result as an image strip on the first free channel above the source, same start."""
    editor = scene.sequence_editor
    others = [strip_span(other) for other in compat.top_strips(editor)]
    channel = plan.free_channel_above(source, others)
    strip = compat.new_image_strip(editor, name, folder, files, channel, source.start)
    if stored_folder != strip.directory:
        strip.directory = stored_folder
    return strip
