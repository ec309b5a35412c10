"""Every difference between Blender 4.2 and 5.0 that the extension meets, in one place.

- 4.2 has only `sequence_editor.sequences`; 4.4 added `strips`; 5.0 has only `strips`.
  (Test with hasattr: an empty collection is falsy.) A meta strip's own strips are
  `sequences` and `strips` likewise; both have `new_meta(name, channel, frame_start)`.
- 5.0 has `context.sequencer_scene` (the sequencer may show another scene than
  `context.scene`); 4.2 does not.
- 5.0 wants `image_settings.media_type = 'IMAGE'` before an image file format; 4.2 has
  no `media_type`.

Everything else the extension uses (`new_image`, `new_meta`, `elements.append`,
`frame_final_*`, `channels`, `active_strip`, `input_1/2`, custom properties on strips)
is the same in both. A new meta strip spans one frame whatever it holds, in both: its
length is set (`frame_final_duration`) once its strips are in.
"""

from __future__ import annotations


def sequencer_scene(context):
    """The scene whose sequencer the user is editing."""
    scene = getattr(context, "sequencer_scene", None)
    return scene if scene is not None else context.scene


def top_strips(editor):
    """The strips at the top level of the timeline (not those inside meta strips)."""
    return editor.strips if hasattr(editor, "strips") else editor.sequences


def meta_strips(meta):
    """The strips inside a meta strip (one level down)."""
    return meta.strips if hasattr(meta, "strips") else meta.sequences


def all_strips(editor):
    """Every strip, those inside meta strips included."""
    return editor.strips_all if hasattr(editor, "strips_all") else editor.sequences_all


def active_strip(scene):
    """The scene's active strip, or None."""
    editor = scene.sequence_editor
    return editor.active_strip if editor is not None else None


def use_png_output(image_settings, color_mode: str = "RGBA") -> None:
    """Make the render output 8-bit PNG files (RGBA: transparent where nothing is drawn)."""
    if hasattr(image_settings, "media_type"):
        image_settings.media_type = "IMAGE"
    image_settings.file_format = "PNG"
    image_settings.color_mode = color_mode
    image_settings.color_depth = "8"


def image_settings_fields(image_settings) -> list[str]:
    """The image-settings fields that `use_png_output` changes (to save and restore them)."""
    fields = ["file_format", "color_mode", "color_depth", "compression"]
    if hasattr(image_settings, "media_type"):
        fields.insert(0, "media_type")
    return fields


def new_image_strip(strips, name: str, directory: str, files: list[str], channel: int,
                    frame_start: int):
    """An image-sequence strip in `strips` (top_strips or meta_strips) showing `files`
    from `directory` at their own pixel size (the caller sets its transform)."""
    strip = strips.new_image(name=name, filepath=directory.rstrip("/\\") + "/" + files[0],
                             channel=channel, frame_start=frame_start, fit_method="ORIGINAL")
    for file_name in files[1:]:
        strip.elements.append(file_name)
    return strip
