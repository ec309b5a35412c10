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
TAKE_SUBFOLDER = "take{}"  # <result folder>/take<k>/: take k's frames and sidecar (K > 1)
REGION_SUBFOLDER = "region"  # <result folder>/region/: the region's masks, until sent
# Custom properties on result strips: which job a strip (a take stack, or a one-take
# result) came from, and which take an image strip shows; they survive renames and undo.
JOB_PROPERTY = "understudy_job"
TAKE_PROPERTY = "understudy_take"


def strip_name(prompt: str, suffix: str = "") -> str:
    """A strip name saying what the result shows, within Blender's 63-byte limit: the
    prompt (cut with "…" where it is too long) and then `suffix`, which is never cut."""
    name = " ".join(prompt.split()) or "Understudy result"
    room = MAX_NAME_BYTES - len(suffix.encode("utf-8"))
    encoded = name.encode("utf-8")
    if len(encoded) > room:
        cut = encoded[: room - len("…".encode())].decode("utf-8", errors="ignore")
        name = cut.rstrip() + "…"
    return name + suffix


def take_strip_name(prompt: str, seed: object, quality: str) -> str:
    """A take's strip: its prompt and seed, and "preview" while it is one
    ("a red fox · seed 7 · preview"; its final drops the last part)."""
    return strip_name(prompt, f" · seed {seed}" + (" · preview" if quality == "preview" else ""))


def stack_name(prompt: str, count: int) -> str:
    """The meta strip holding a job's takes ("a red fox · 3 takes")."""
    return strip_name(prompt, f" · {count} takes")


def take_folder(folder: str, take: int) -> str:
    """Where take k of a job of several takes keeps its frames: <result folder>/take<k>/
    (string-joined, so a folder Blender stores relative, `//understudy/<job>/`, stays so)."""
    return f"{folder.rstrip('/')}/{TAKE_SUBFOLDER.format(take)}/"


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


def moved_folder(directory: str, old: str, new: str) -> str | None:
    """A strip's folder once `old` moved to `new`: `new` for `old` itself, new/take2/ for
    old/take2/ (a take's); None for a folder outside `old`."""
    directory = directory.rstrip("/\\")
    if directory == old:
        return new
    if directory.startswith(old + "/") or directory.startswith(old + "\\"):
        return new.rstrip("/\\") + "/" + directory[len(old) + 1:] + "/"
    return None
