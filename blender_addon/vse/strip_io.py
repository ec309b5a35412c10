"""Strip input and output: render a strip's frames, add the result strip.

Rendering goes through the sequencer (so retiming, fps, effects and modifiers look as
in the preview) with the source strip alone, at a bounded size, in the way
placement.py describes (a movie or image strip's own picture, else the canvas with
alpha). Every setting it touches, the source strip's transform and blending
included, is recorded first and put back after each batch, also when rendering fails,
so between batches (and after) the scene is exactly as the editor left it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..rules.channels import Neighbour, Span, check_source, free_channel
from ..rules.errors import UserError
from ..rules.frames import render_percentage, rendered_size, retime_indices
from ..rules.look import LOOK_FILE, LOOK_IMAGE, LOOK_NONE, LOOK_STRIP, check_look_size
from ..rules.names import frame_file_names
from ..rules.regions import REGION_MASK, MatteFrame, Region
from . import compat, placement, pngio

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


def strip_span(strip) -> Span:
    """A strip's channel and visible frames."""
    return Span(strip.channel, strip.frame_final_start, strip.frame_final_end)


def neighbours(scene) -> list[Neighbour]:
    """Every top-level strip, for choosing the result's channel."""
    return [Neighbour(other.name, strip_span(other), other.type,
                           tuple(source.name for source in (getattr(other, "input_1", None),
                                                            getattr(other, "input_2", None))
                                 if source is not None))
            for other in compat.top_strips(scene.sequence_editor)]


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
    """The active strip if it can be transferred; raise UserError otherwise."""
    strip = compat.active_strip(scene) if scene is not None else None
    if strip is None:
        check_source(None, "", None, False)
    check_source_strip(scene, strip)
    return strip


def check_source_strip(scene, strip) -> None:
    """Raise UserError unless this strip can be transferred."""
    top_names = {other.name for other in compat.top_strips(scene.sequence_editor)}
    if strip.name not in top_names:
        raise UserError(f"The active strip {strip.name!r} is inside a meta strip; leave the "
                             f"meta strip (Tab) and select the meta strip itself.")
    check_source(strip.type, strip.name, strip_span(strip), strip_is_hidden(scene, strip),
                      missing_media(strip))


def media_size(strip) -> tuple[int, int]:
    """A movie or image strip's picture size in pixels, as the file holds it."""
    import bpy

    element = strip.elements[0] if len(strip.elements) else None
    if element is not None and element.orig_width > 0 and element.orig_height > 0:
        return int(element.orig_width), int(element.orig_height)
    if strip.type == "MOVIE":
        clip = bpy.data.movieclips.load(bpy.path.abspath(strip.filepath))
        try:
            return int(clip.size[0]), int(clip.size[1])
        finally:
            bpy.data.movieclips.remove(clip)
    image = bpy.data.images.load(os.path.join(bpy.path.abspath(strip.directory),
                                              element.filename))
    try:
        return int(image.size[0]), int(image.size[1])
    finally:
        bpy.data.images.remove(image)


def placement_of(scene, strip) -> placement.Placement:
    """How the source sits in the edit, and so how it is rendered and the result placed."""
    blend = {"blend_type": strip.blend_type, "blend_alpha": float(strip.blend_alpha)}
    mode = placement.mode_for(strip.type)
    if mode == placement.CANVAS:
        return placement.Placement(mode, scene.render.resolution_x, scene.render.resolution_y,
                                   **blend)
    width, height = media_size(strip)
    transform, crop = strip.transform, strip.crop
    return placement.Placement(
        mode, width, height, scale_x=transform.scale_x, scale_y=transform.scale_y,
        offset_x=transform.offset_x, offset_y=transform.offset_y, rotation=transform.rotation,
        origin=tuple(transform.origin), filter=transform.filter,
        crop=(crop.min_x, crop.max_x, crop.min_y, crop.max_y),
        flip_x=strip.use_flip_x, flip_y=strip.use_flip_y, **blend)


def render_size(scene, place: placement.Placement, max_size: int) -> tuple[int, int]:
    """The pixel size of the frames sent."""
    percentage = render_percentage(place.width, place.height, max_size)
    return rendered_size(place.width, place.height, percentage)


def _show_alone(snapshot: Snapshot, scene, strip, place: placement.Placement,
                max_size: int) -> None:
    """Set up the scene to render what placement.py says is sent (the snapshot undoes it)."""
    render = scene.render
    keep = {strip.name, *(source.name for source in effect_inputs(strip))}
    for other in compat.top_strips(scene.sequence_editor):
        if other.name not in keep and not other.mute:
            snapshot.set(other, "mute", True)
    # Blending is applied once, by the result strip; the render shows the strip as it is.
    snapshot.set(strip, "blend_type", "REPLACE")
    snapshot.set(strip, "blend_alpha", 1.0)
    if place.mode == placement.PICTURE:
        # The strip's own picture: the canvas is the media, the strip fills it untransformed.
        snapshot.set(render, "resolution_x", place.width)
        snapshot.set(render, "resolution_y", place.height)
        snapshot.set(render, "pixel_aspect_x", 1.0)
        snapshot.set(render, "pixel_aspect_y", 1.0)
        for name, value in (("scale_x", 1.0), ("scale_y", 1.0), ("offset_x", 0.0),
                            ("offset_y", 0.0), ("rotation", 0.0)):
            snapshot.set(strip.transform, name, value)
        for name in ("min_x", "max_x", "min_y", "max_y"):
            snapshot.set(strip.crop, name, 0)
        snapshot.set(strip, "use_flip_x", False)
        snapshot.set(strip, "use_flip_y", False)
    snapshot.set(render, "resolution_percentage",
                 render_percentage(place.width, place.height, max_size))
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


def render_frames(scene, strip, frames: list[int], folder: str, first_index: int,
                  place: placement.Placement, max_size: int) -> list[str]:
    """Render these timeline frames of the strip as RGBA PNGs; return their paths.

    The files are numbered from `first_index` + 1 (RENDER_FILE), so batches add up to
    one numbered sequence. Everything changed for the render is put back before this
    returns, also when it fails.
    """
    import bpy

    os.makedirs(folder, exist_ok=True)
    snapshot = Snapshot()
    snapshot.remember(scene, "frame_current")
    paths = []
    try:
        _show_alone(snapshot, scene, strip, place, max_size)
        for index, frame in enumerate(frames, start=first_index):
            path = os.path.join(folder, RENDER_FILE.format(index + 1))
            scene.frame_set(frame)
            scene.render.filepath = path
            bpy.ops.render.render(write_still=True, scene=scene.name)
            if not os.path.isfile(path):
                raise UserError(f"Blender rendered no image for frame {frame} of "
                                     f"{strip.name!r}; check that the strip shows a picture there.")
            paths.append(path)
    finally:
        snapshot.restore()
        scene.frame_set(scene.frame_current)  # re-evaluate the restored frame
    return paths


REGION_FILE = "region_{:05d}.png"
TEMPORARY_MASK_STRIP = "Understudy region"  # a Mask's strip, only while it renders


def render_region_frames(scene, region: Region, span: Span, frames: list[int],
                         folder: str, first_index: int, place: placement.Placement,
                         max_size: int) -> list[MatteFrame]:
    """Render the region over these timeline frames, as the source is rendered (same
    size and framing, the region alone), and keep each frame as a grey PNG (white =
    subject, REGION_FILE numbered from first_index + 1); returns what the checks need.

    A Mask data-block is rendered through a mask strip added on a free channel from the
    source's first frame (its frame 1 there) and removed again, also on failure.
    """
    import bpy

    editor = scene.sequence_editor
    added = None
    shown = Snapshot()  # a muted matte (or its muted channel) shows while it renders
    try:
        if region.kind == REGION_MASK:
            mask = bpy.data.masks.get(region.name)
            if mask is None:
                raise UserError(f"The mask {region.name!r} was deleted; pick the Mask that "
                                     f"outlines the subject again.")
            added = compat.top_strips(editor).new_mask(
                name=TEMPORARY_MASK_STRIP, mask=mask, channel=free_channel(span, neighbours(scene)),
                frame_start=span.start)
            strip = added
        else:
            strip = next((other for other in compat.top_strips(editor)
                          if other.name == region.name), None)
            if strip is None:
                raise UserError(f"The matte strip {region.name!r} was deleted; pick the "
                                     f"strip that shows the subject again.")
            shown.set(strip, "mute", False)
            shown.set(editor.channels[strip.channel], "mute", False)
        paths = render_frames(scene, strip, frames, folder, first_index, place, max_size)
    finally:
        if added is not None:
            compat.top_strips(editor).remove(added)
        shown.restore()
    checked = []
    for index, path in enumerate(paths, start=first_index):
        grey = pngio.matte_grey(read_rgba(path))
        Path(folder, REGION_FILE.format(index + 1)).write_bytes(pngio.encode_grey(grey))
        os.remove(path)
        checked.append(MatteFrame.of(grey))
    return checked


def write_result_frames(frames: list[bytes], folder: str, length: int) -> list[str]:
    """Write the result's PNGs (one per source frame); return the file names.

    The server returns exactly the frames sent; should another count arrive, frames
    are held evenly so the strip still matches the source's length.
    """
    os.makedirs(folder, exist_ok=True)
    names = frame_file_names(length)
    for name, index in zip(names, retime_indices(len(frames), length), strict=True):
        Path(folder, name).write_bytes(frames[index])
    return names


def read_rgba(path: str):
    """A PNG's pixels as (H, W, 4) uint8, top row first, decoded by Blender."""
    import bpy
    import numpy as np

    image = bpy.data.images.load(path)
    try:
        width, height = image.size
        pixels = np.empty(width * height * 4, np.float32)
        image.pixels.foreach_get(pixels)
    finally:
        bpy.data.images.remove(image)
    return (pixels.reshape(height, width, 4)[::-1] * 255).round().astype(np.uint8)


def finish_result_frame(result_path: str, source_path: str,
                        canvas: placement.Canvas | None = None, region: bool = False) -> bool:
    """Give a result frame its place and the source's transparency, in place.

    Under crop the frame goes on its transparent canvas (placement.result_canvas);
    where the frame sent was transparent (the source showed nothing), so is the result.
    A result edited in a region (composited, its alpha the feathered region) becomes
    the layer that gives that composite over the source (pngio.layer_over_source).
    Doing it twice changes nothing (a frame already on its canvas is not moved again,
    and the frame sent is gone once the strip is placed). False when nothing was
    rewritten.
    """
    import numpy as np

    pixels = None
    if region and os.path.isfile(source_path):
        pixels, source = read_rgba(result_path), read_rgba(source_path)
        if pixels.shape[:2] == source.shape[:2]:
            pixels = pngio.layer_over_source(pixels, source)
    if canvas is not None and png_file_size(result_path) == (canvas.result_width,
                                                            canvas.result_height):
        pixels = pngio.on_canvas(read_rgba(result_path), canvas.width, canvas.height,
                                 canvas.left, canvas.top)
    if os.path.isfile(source_path):
        alpha = read_rgba(source_path)[..., 3]
        if alpha.min() < 255:
            if pixels is None:
                pixels = read_rgba(result_path)
            height, width = pixels.shape[:2]
            pixels[..., 3] = np.minimum(pixels[..., 3], pngio.resize_nearest(alpha, width, height))
    if pixels is None:
        return False
    Path(result_path).write_bytes(pngio.encode_rgba(pixels))
    return True


def look_png(scene, settings) -> bytes | None:
    """The panel's Look as one PNG (None: no Look): the Image data-block's pixels, the
    image strip's picture at the current frame, or the file's. UserError with one
    sentence when it is not set, cannot be read, or is too small or too large."""
    import bpy

    kind = settings.look_kind
    if kind == LOOK_NONE:
        return None
    if kind == LOOK_IMAGE:
        if settings.look_image is None:
            raise UserError("Pick the Image of the new subject's look, or set Look to None.")
        return _image_png(settings.look_image, repr(settings.look_image.name))
    if kind == LOOK_STRIP:
        editor = scene.sequence_editor
        strip = compat.all_strips(editor).get(settings.look_strip) if editor else None
        if strip is None or strip.type != "IMAGE":
            raise UserError(f"The Look's image strip {settings.look_strip!r} is not an image "
                            f"strip of this scene; pick one, or set Look to None.")
        element = strip.strip_elem_from_frame(scene.frame_current)
        if element is None:
            raise UserError(f"The image strip {strip.name!r} shows nothing at frame "
                            f"{scene.frame_current}; move to a frame it shows.")
        path = os.path.join(bpy.path.abspath(strip.directory), element.filename)
    else:
        assert kind == LOOK_FILE
        path = bpy.path.abspath(settings.look_file)
    if not os.path.isfile(path):
        raise UserError(f"The Look's picture {path} is not there; pick the file again.")
    try:
        image = bpy.data.images.load(path, check_existing=False)
    except RuntimeError as error:
        raise UserError(f"Blender cannot read the Look's picture {path} ({error}); give a PNG "
                        f"or JPEG.") from error
    try:
        return _image_png(image, os.path.basename(path))
    finally:
        bpy.data.images.remove(image)


def _image_png(image, name: str) -> bytes:
    """An Image's pixels (its stored values, top row first) as an RGBA PNG."""
    import numpy as np

    width, height = image.size
    check_look_size(width, height, name)
    pixels = np.empty(width * height * 4, np.float32)
    image.pixels.foreach_get(pixels)
    rgba = np.flipud(pixels.reshape(height, width, 4))  # Blender's first row is the bottom
    return pngio.encode_rgba(np.clip(np.rint(rgba * 255), 0, 255).astype(np.uint8))


def png_file_size(path: str) -> tuple[int, int]:
    """(width, height) of a PNG file, from its header."""
    with open(path, "rb") as file:
        return pngio.png_size(file.read(32))


def remove_folder(folder: str) -> None:
    """Remove a folder the extension made (rendered frames of a job that went no further)."""
    shutil.rmtree(folder, ignore_errors=True)


def add_result_strip(scene, name: str, folder: str, stored_folder: str, files: list[str],
                     channel: int, frame_start: int, look: dict, strips=None):
    """The result as an image strip on `channel` from `frame_start`, placed by `look`;
    in `strips` (a meta strip's, compat.meta_strips) or else at the top level."""
    collection = strips if strips is not None else compat.top_strips(scene.sequence_editor)
    strip = compat.new_image_strip(collection, name, folder, files, channel, frame_start)
    if stored_folder != strip.directory:
        strip.directory = stored_folder
    apply_look(strip, look)
    return strip


def apply_look(strip, look: dict) -> None:
    """Give a result strip its transform, crop, flips and blending (placement.result_look)."""
    transform, crop = strip.transform, strip.crop
    for key in ("scale_x", "scale_y", "offset_x", "offset_y", "rotation"):
        setattr(transform, key, look[key])
    transform.origin = look["origin"]
    if look.get("filter"):
        transform.filter = look["filter"]
    crop.min_x, crop.max_x, crop.min_y, crop.max_y = look["crop"]
    strip.use_flip_x, strip.use_flip_y = look["flip_x"], look["flip_y"]
    strip.blend_type, strip.blend_alpha = look["blend_type"], look["blend_alpha"]
