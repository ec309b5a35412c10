"""What the extension names: job ids, result folders, frame files, result strips.

Plain Python (no bpy).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from .states import PROTOCOL

MAX_NAME_BYTES = 63  # Blender's ID and strip names hold 63 bytes of UTF-8
RESULT_FOLDER = "understudy"  # //understudy/<job>/ beside the .blend
FRAME_PATTERN = "frame_{:05d}.png"
SOURCE_SUBFOLDER = "source"  # <result folder>/source/: the frames sent, until collected
REGION_SUBFOLDER = "region"  # <result folder>/region/: the region's masks, until sent


def strip_name(prompt: str) -> str:
    """A strip name saying what the result shows, within Blender's 63-byte limit."""
    name = " ".join(prompt.split()) or "Understudy result"
    encoded = name.encode("utf-8")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    cut = encoded[: MAX_NAME_BYTES - len("…".encode())].decode("utf-8", errors="ignore")
    return cut.rstrip() + "…"


def new_job_id(now: float | None = None) -> str:
    """A job id that sorts by time and that the protocol accepts: us-YYYYmmdd-HHMMSS-xxxxxx."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return PROTOCOL.check_job_id(f"us-{stamp}-{secrets.token_hex(3)}")


def result_folder(blend_path: str, job_id: str, temp_dir: str) -> tuple[str, str, bool]:
    """Where a job's frames go: (absolute folder, folder as Blender stores it, is temporary).

    A saved file keeps them beside it as `//understudy/<job>/` (relative, so the
    project folder can move); an unsaved one has no "beside", so a temp folder is used.
    """
    # The protocol's job-id rule (shared/protocol.py) makes an id a safe folder name too:
    # no separators, and a first letter or digit rules out '.' and '..'.
    if not PROTOCOL.JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"unsafe job id {job_id!r}")
    if blend_path:
        folder = Path(blend_path).parent / RESULT_FOLDER / job_id
        return str(folder), f"//{RESULT_FOLDER}/{job_id}/", False
    folder = Path(temp_dir) / RESULT_FOLDER / job_id
    return str(folder), str(folder) + "/", True


def frame_file_names(count: int) -> list[str]:
    """File names of a result's frames, in order."""
    return [FRAME_PATTERN.format(i + 1) for i in range(count)]
