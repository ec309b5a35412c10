"""Understudy for Blender's Video Sequence Editor (filled in by the extension issue)."""
