"""This extension in the running Blender: its name, its preferences, whether long work
runs in timer ticks, and redrawing the sequencer.

It sits at the top of the package because Blender knows the extension by the
package's own name (`__package__` here). Every Blender-facing layer may import it (it
imports nothing of the extension): the preferences, like the job records, are Blender
data, read through bpy by any module, whichever module defined their class
(interface/props.py).
"""

from __future__ import annotations

import bpy

ADDON_ID = __package__

# Whether long work runs in timer ticks (the interface) or blocks (background mode, where
# timers never fire). A test may set it to take the interface's path in the bpy module.
BATCHED = not bpy.app.background


def preferences(context=None):
    """This extension's preferences (interface/props.py UnderstudyPreferences)."""
    context = context or bpy.context
    return context.preferences.addons[ADDON_ID].preferences


def redraw_sequencers() -> None:
    for window in getattr(bpy.context.window_manager, "windows", ()):
        for area in window.screen.areas:
            if area.type == "SEQUENCE_EDITOR":
                area.tag_redraw()


def push_undo(message: str) -> None:
    """Make what changed so far one undo step (work a timer finished has none of its own:
    only operators a user runs push steps)."""
    try:
        bpy.ops.ed.undo_push(message=message)
    except RuntimeError:  # no undo here (a file loading): the change stays, without a step
        pass
