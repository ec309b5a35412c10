"""The frames sent and returned: the size they render at, and a result's frames over the
source's.

Plain Python (no bpy).
"""

from __future__ import annotations

DEFAULT_MAX_RENDER_SIZE = 768  # long side of the frames sent to the server, in pixels


def render_percentage(width: int, height: int, max_size: int) -> int:
    """The scene's resolution percentage that keeps the long side within `max_size`."""
    longest = max(width, height)
    if longest <= max_size:
        return 100
    return max(1, int(100 * max_size / longest))


def rendered_size(width: int, height: int, percentage: int) -> tuple[int, int]:
    """The pixel size Blender renders at a resolution percentage (it rounds down)."""
    return max(1, width * percentage // 100), max(1, height * percentage // 100)


def retime_indices(count_in: int, count_out: int) -> list[int]:
    """For each output frame, which input frame to show (hold retiming, evenly spread).

    The server already returns `output_frames` frames; this only guards against a
    result of another length, so the new strip always matches the source's length.
    """
    if count_in < 1 or count_out < 1:
        raise ValueError("retiming needs at least one frame on each side")
    return [min(count_in - 1, i * count_in // count_out) for i in range(count_out)]
