"""The contact sheet of a take stack in the panel: each take's middle frame (as the
command line's contact sheet, backend/video.py, picks it) as a preview icon.

Blender draws the icons (bpy.utils.previews), so nothing is composed into an image
here: the panel lays them out with each take's name under its frame. Icons are kept
by file path: a take replaced by its final shows the final's frame.
"""

from __future__ import annotations

import os

import bpy
import bpy.utils.previews

_collection = None  # bpy.utils.previews.ImagePreviewCollection, made on first use


def frame_path(strip) -> str:
    """The file of a take strip's middle frame."""
    elements = strip.elements
    return os.path.join(bpy.path.abspath(strip.directory), elements[len(elements) // 2].filename)


def preview(strip):
    """The preview (icon) of a take strip's middle frame, loaded once; None when the
    frame is missing."""
    global _collection

    if strip.type != "IMAGE" or not len(strip.elements):
        return None
    path = frame_path(strip)
    if not os.path.isfile(path):
        return None
    if _collection is None:
        _collection = bpy.utils.previews.new()
    if path not in _collection:
        _collection.load(path, path, "IMAGE")
    return _collection[path]


def icon(strip) -> int:
    """The icon id of a take strip's middle frame (0: none to show)."""
    found = preview(strip)
    return found.icon_id if found is not None else 0


def clear() -> None:
    """Free the icons (the extension is disabled)."""
    global _collection
    if _collection is not None:
        bpy.utils.previews.remove(_collection)
        _collection = None
