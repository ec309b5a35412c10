"""The Video Sequence Editor: reading and rendering strips, adding the result strip
(strip_io.py), where the result sits (placement.py), its PNG frames (pngio.py), and
the differences between Blender versions (compat.py)."""
