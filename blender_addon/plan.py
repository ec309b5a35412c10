"""The extension's decisions, in plain Python: ranges, channels, names, paths, retiming.

Nothing here imports bpy, so every rule is unit-tested without Blender. The Blender
modules gather plain values (frame numbers, channels, names), ask this module what to
do, and carry it out.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .vendored import shared_module

SETTINGS = shared_module("settings")  # shared/settings.py: every setting's name, default, range

MAX_CHANNEL = 128  # Blender's sequencer has channels 1..128
MAX_NAME_BYTES = 63  # Blender's ID and strip names hold 63 bytes of UTF-8
RESULT_FOLDER = "understudy"  # //understudy/<job>/ beside the .blend
FRAME_PATTERN = "frame_{:05d}.png"
DEFAULT_MAX_RENDER_SIZE = 768  # long side of the frames sent to the server, in pixels
DEFAULT_MAX_FRAMES = 240  # frames sent per job unless the server allows fewer
# Strip types that show nothing on their own, so there is nothing to transfer from.
UNUSABLE_TYPES = {"SOUND": "a sound strip", "ADJUSTMENT": "an adjustment layer"}


class UserError(Exception):
    """Something the user can fix; `str(error)` is the one sentence Blender shows."""


@dataclass(frozen=True)
class Span:
    """A strip's visible place in the timeline: channel and frames [start, end)."""

    channel: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    def overlaps(self, start: int, end: int) -> bool:
        return self.start < end and start < self.end


def check_source(strip_type: str | None, name: str, span: Span | None, muted: bool,
                 missing_file: str = "") -> None:
    """Raise UserError unless this strip can be the source of a transfer."""
    if strip_type is None or span is None:
        raise UserError("No strip is selected; click the strip to transfer in the sequencer "
                        "and try again.")
    if strip_type in UNUSABLE_TYPES:
        raise UserError(f"The active strip {name!r} is {UNUSABLE_TYPES[strip_type]}, which shows "
                        f"no picture; select a video, image, scene, meta or effect strip.")
    if muted:
        raise UserError(f"The active strip {name!r} is muted or on a muted channel; unmute it "
                        f"so it can be rendered.")
    if missing_file:
        raise UserError(f"The active strip {name!r} shows {missing_file}, which does not exist; "
                        f"relink the strip's media and try again.")
    if span.length < 2:
        raise UserError(f"The active strip {name!r} shows {span.length} frame; motion transfer "
                        f"needs a strip at least 2 frames long.")


def free_channel_above(source: Span, others: list[Span]) -> int:
    """The lowest channel above the source that is empty over the source's visible range."""
    busy = {other.channel for other in others if other.overlaps(source.start, source.end)}
    for channel in range(source.channel + 1, MAX_CHANNEL + 1):
        if channel not in busy:
            return channel
    raise UserError(f"Every channel above channel {source.channel} is taken between frames "
                    f"{source.start} and {source.end - 1}; free one so the result has a place.")


def frames_to_render(span: Span, max_frames: int) -> list[int]:
    """Timeline frames to render: all visible frames, or an even sample of `max_frames`.

    The server samples the clip evenly anyway, so sending more frames than it can use
    only costs time; sending an even sample keeps the motion's timing.
    """
    if max_frames < 2:
        raise ValueError("max_frames must be at least 2")
    if span.length <= max_frames:
        return list(range(span.start, span.end))
    last = span.length - 1
    return [span.start + round(i * last / (max_frames - 1)) for i in range(max_frames)]


def render_percentage(width: int, height: int, max_size: int) -> int:
    """The scene's resolution percentage that keeps the long side within `max_size`."""
    longest = max(width, height)
    if longest <= max_size:
        return 100
    return max(1, int(100 * max_size / longest))


def retime_indices(count_in: int, count_out: int) -> list[int]:
    """For each output frame, which input frame to show (hold retiming, evenly spread).

    The server already returns `output_frames` frames; this only guards against a
    result of another length, so the new strip always matches the source's length.
    """
    if count_in < 1 or count_out < 1:
        raise ValueError("retiming needs at least one frame on each side")
    return [min(count_in - 1, i * count_in // count_out) for i in range(count_out)]


def strip_name(prompt: str) -> str:
    """A strip name saying what the result shows, within Blender's 63-byte limit."""
    name = " ".join(prompt.split()) or "Understudy result"
    encoded = name.encode("utf-8")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    cut = encoded[: MAX_NAME_BYTES - len("…".encode())].decode("utf-8", errors="ignore")
    return cut.rstrip() + "…"


def new_job_id(now: float | None = None) -> str:
    """A job id that sorts by time and is safe as a folder name: us-YYYYmmdd-HHMMSS-xxxxxx."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"us-{stamp}-{secrets.token_hex(3)}"


def is_safe_job_id(job_id: str) -> bool:
    """Job ids become folder names; accept only letters, digits, '-' and '_'."""
    return bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", job_id))


def result_folder(blend_path: str, job_id: str, temp_dir: str) -> tuple[str, str, bool]:
    """Where a job's frames go: (absolute folder, folder as Blender stores it, is temporary).

    A saved file keeps them beside it as `//understudy/<job>/` (relative, so the
    project folder can move); an unsaved one has no "beside", so a temp folder is used.
    """
    if not is_safe_job_id(job_id):
        raise ValueError(f"unsafe job id {job_id!r}")
    if blend_path:
        folder = Path(blend_path).parent / RESULT_FOLDER / job_id
        return str(folder), f"//{RESULT_FOLDER}/{job_id}/", False
    folder = Path(temp_dir) / RESULT_FOLDER / job_id
    return str(folder), str(folder) + "/", True


def frame_file_names(count: int) -> list[str]:
    """File names of a result's frames, in order."""
    return [FRAME_PATTERN.format(i + 1) for i in range(count)]


def transfer_settings(values: dict, output_frames: int, frames_sent: int | None = None) -> dict:
    """The settings dict sent to the server: the panel's values plus the output length.

    Empty optional text and a random seed are left out so the server's defaults apply
    (it picks and records a seed). A strip shorter than the model's frame count gives
    the model all its frames rather than failing.
    """
    settings = {key: value for key, value in values.items() if value is not None}
    for optional_text in ("source_prompt", "negative_prompt"):
        if optional_text in settings and not settings[optional_text].strip():
            del settings[optional_text]
    if not settings.get("prompt", "").strip():
        raise UserError("The prompt is empty; type what the subject should become.")
    settings["output_frames"] = output_frames
    if frames_sent is not None and settings.get("num_frames", frames_sent) > frames_sent:
        settings["num_frames"] = frames_sent
    try:
        SETTINGS.TransferSettings.from_dict(settings)
    except SETTINGS.BadSettingsError as error:
        raise UserError(str(error)) from None
    return settings


def progress_text(status: str, phase: str, percent: float) -> str:
    """What the progress bar says, e.g. 'sampling 40%' or 'queued'."""
    if status in ("submitted", "queued"):
        return "queued"
    if status == "running":
        return f"{phase or 'running'} {percent:.0f}%"
    return status


def percent_from_event(event: dict) -> float | None:
    """Percent complete from a progress event or status reply, when it says enough."""
    if isinstance(event.get("percent"), int | float):
        return float(event["percent"])
    step, total = event.get("step"), event.get("total")
    if isinstance(step, int | float) and isinstance(total, int | float) and total > 0:
        return 100.0 * step / total
    return None


# The settings the panel edits as whole numbers; their names, defaults and ranges come
# from shared/settings.py, the one place the backend reads them from too.
PANEL_INT_SETTINGS = ("num_frames", "width", "height", "inversion_steps", "steps",
                      "guided_steps", "guidance_iterations")


def int_property_range(name: str) -> dict[str, int]:
    """default, min, max (and step) of a whole-number setting, for the panel's IntProperty.

    A bound that names another setting (guided_steps <= steps) takes that one's maximum.
    """
    spec = SETTINGS.spec_of(name)
    high = SETTINGS.spec_of(spec.high).high if isinstance(spec.high, str) else spec.high
    bounds = {"default": int(SETTINGS.DEFAULTS[name]), "min": int(spec.low), "max": int(high)}
    if spec.multiple_of > 1:
        bounds["step"] = spec.multiple_of
    return bounds


def job_update(event: dict) -> tuple[dict, bool]:
    """How a server event or status reply changes a job record: (field values, fetch now?).

    Events have a "type" (progress, result-ready, error, cancelled); status replies
    have a "state". Unknown kinds change nothing, so a newer server cannot break
    an older extension.
    """
    kind = str(event.get("type") or event.get("state") or "")
    kind = kind.replace("_", "-").lower()
    if kind in ("result-ready", "done", "finished", "succeeded"):
        return {"status": "running", "phase": "fetching", "percent": 100.0}, True
    if kind in ("error", "failed"):
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        message = str(event.get("message") or error.get("message")
                      or "The server could not finish the job.")
        return {"status": "failed", "message": message}, False
    if kind in ("cancelled", "canceled"):
        return {"status": "cancelled", "message": "Cancelled."}, False
    if kind in ("progress", "running", "queued", "submitted"):
        waiting = kind == "queued" or event.get("phase") == "queued"
        update: dict = {"status": "submitted" if waiting else "running"}
        if event.get("phase"):
            update["phase"] = str(event["phase"])
        percent = percent_from_event(event)
        if percent is not None:
            update["percent"] = max(0.0, min(100.0, percent))
        return update, False
    return {}, False
