"""The extension's decisions, in plain Python: ranges, channels, names, paths, retiming.

Nothing here imports bpy, so every rule is unit-tested without Blender. The Blender
modules gather plain values (frame numbers, channels, names), ask this module what to
do, and carry it out.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .states import ACTIVE, COLLECT_HINT, PROTOCOL, Phase, Status
from .vendored import shared_module

SETTINGS = shared_module("settings")  # shared/settings.py: every setting's name, default, range
ERRORS = shared_module("errors")  # shared/errors.py: the one root of Understudy's errors
SIDECAR = shared_module("sidecar")  # shared/sidecar.py: how a result was made
JobState, EventType = PROTOCOL.JobState, PROTOCOL.EventType

MAX_CHANNEL = 128  # Blender's sequencer has channels 1..128
MAX_NAME_BYTES = 63  # Blender's ID and strip names hold 63 bytes of UTF-8
RESULT_FOLDER = "understudy"  # //understudy/<job>/ beside the .blend
FRAME_PATTERN = "frame_{:05d}.png"
DEFAULT_MAX_RENDER_SIZE = 768  # long side of the frames sent to the server, in pixels
# Strip types that show nothing on their own, so there is nothing to transfer from.
UNUSABLE_TYPES = {"SOUND": "a sound strip", "ADJUSTMENT": "an adjustment layer"}
# Strip types that show a picture in which nothing moves: there is no motion to transfer.
MOTIONLESS_TYPES = {"COLOR": "a colour strip"}


class UserError(ERRORS.UnderstudyError):
    """Something the user can fix; `str(error)` is the one sentence Blender shows.

    The extension's own failures and the client's (ClientError) share one root, so one
    handler catches both."""


def os_reason(error: OSError) -> str:
    """The short reason of a file-system error ("Permission denied"), for a sentence."""
    return error.strerror or str(error)


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
    if strip_type in MOTIONLESS_TYPES:
        raise UserError(f"The active strip {name!r} is {MOTIONLESS_TYPES[strip_type]}, in which "
                        f"nothing moves; select a video, image, scene, meta or effect strip.")
    if muted:
        raise UserError(f"The active strip {name!r} is muted or on a muted channel; unmute it "
                        f"so it can be rendered.")
    if missing_file:
        raise UserError(f"The active strip {name!r} shows {missing_file}, which does not exist; "
                        f"relink the strip's media and try again.")
    if span.length < 2:
        raise UserError(f"The active strip {name!r} shows {span.length} frame; motion transfer "
                        f"needs a strip at least 2 frames long.")


class NoRoomUnderGrade(UserError):
    """The result has no channel between its source and the adjustment layer grading it;
    Make Room (make_room below) can fix that, when the editor clicks it."""

    def __init__(self, message: str, source_name: str) -> None:
        super().__init__(message)
        self.source_name = source_name


@dataclass(frozen=True)
class Neighbour:
    """Another top-level strip, as far as placing the result is concerned."""

    name: str
    span: Span
    type: str = "IMAGE"
    inputs: tuple[str, ...] = ()  # the strips an effect strip draws from


def result_channel(source: Span, source_name: str, others: list[Neighbour],
                   then: str = "so the result has a place") -> int:
    """The channel the result goes on: just above the source, below the look built on it.

    The result must sit above the source (to cover it) and below every adjustment layer
    over the source's range (an adjustment layer grades the channels below it), so the
    grade the editor built still applies. An effect strip that takes the source as its
    input would need re-linking to take the result, which the extension never does
    unasked, so that is refused. Nothing here moves a strip; `then` ends the sentence
    (what fixing the cause achieves).
    """
    over = [other for other in others if other.name != source_name
            and other.span.overlaps(source.start, source.end)]
    for other in over:
        if source_name in other.inputs:
            raise UserError(f"The effect strip {other.name!r} takes {source_name!r} as its input, "
                            f"so it would not apply to the result; transfer {other.name!r} itself "
                            f"(it is rendered with its input) or make a meta strip of both.")
    if source.channel >= MAX_CHANNEL:
        raise UserError(f"{source_name!r} is on channel {MAX_CHANNEL}, the top channel, so there is "
                        f"no channel above it for the result; move it down a channel {then}.")
    grades = [other for other in over
              if other.type == "ADJUSTMENT" and other.span.channel > source.channel]
    ceiling = min((other.span.channel for other in grades), default=MAX_CHANNEL + 1)
    busy = {other.span.channel for other in over}
    for channel in range(source.channel + 1, ceiling):
        if channel not in busy:
            return channel
    frames = f"between frames {source.start} and {source.end - 1}"
    if ceiling <= MAX_CHANNEL:
        grade = min(grades, key=lambda other: other.span.channel)
        raise NoRoomUnderGrade(
            f"There is no free channel between {source_name!r} (channel {source.channel}) and "
            f"the adjustment layer {grade.name!r} (channel {ceiling}) {frames}, and above it "
            f"the result would not be graded like the source; move the adjustment layer up a "
            f"channel {then}.", source_name)
    raise UserError(f"Every channel above channel {source.channel} is taken {frames}; free one "
                    f"{then}.")


def make_room(source: Span, source_name: str, others: list[Neighbour]) -> list[tuple[str, int]]:
    """The moves that make a channel for the result under the grade: (strip, new channel),
    highest first, so applying them in order never overlaps two strips.

    Let g be the channel of the lowest adjustment layer over the source's frames above
    it. Every strip on a channel c >= g over the source's frames moves to c + 1, which
    frees channel g there for the result, still below the grade. A strip on c + 1 whose
    frames meet a moved strip's moves too (and so on upwards), so nothing lands on
    another. Empty when no adjustment layer is in the way. UserError when a strip would
    leave channel MAX_CHANNEL.
    """
    over = [other for other in others if other.name != source_name
            and other.span.overlaps(source.start, source.end)]
    grades = [other.span.channel for other in over
              if other.type == "ADJUSTMENT" and other.span.channel > source.channel]
    if not grades:
        return []
    floor = min(grades)
    moving = {other.name: other for other in over if other.span.channel >= floor}
    grown = True
    while grown:  # a strip right above a moved one, meeting it in time, moves too
        grown = False
        for other in others:
            if other.name in moving or other.name == source_name:
                continue
            if any(moved.span.channel + 1 == other.span.channel
                   and moved.span.overlaps(other.span.start, other.span.end)
                   for moved in moving.values()):
                moving[other.name] = other
                grown = True
    top = max(moving.values(), key=lambda other: other.span.channel)
    if top.span.channel >= MAX_CHANNEL:
        raise UserError(f"{top.name!r} is on channel {MAX_CHANNEL}, the top channel, so nothing "
                        f"can move up to make room; free a channel above {source_name!r} by hand.")
    return [(other.name, other.span.channel + 1)
            for other in sorted(moving.values(), key=lambda other: -other.span.channel)]


def frames_to_render(span: Span, max_frames: int, name: str = "The strip") -> list[int]:
    """Timeline frames to render: every visible frame of the strip, each one sent.

    The result has one generated frame per source frame, so nothing is sampled; a strip
    longer than the server's frame limit is refused before anything is rendered.
    """
    if span.length > max_frames:
        raise UserError(f"{name} shows {span.length} frames and the server edits at most "
                        f"{max_frames} frames per job; trim the strip or cut it into parts of "
                        f"{max_frames} frames or fewer.")
    return list(range(span.start, span.end))


def _limits(hello: dict) -> dict:
    return hello.get("limits") if isinstance(hello.get("limits"), dict) else {}


def server_backbone(hello: dict) -> dict:
    """The server's model as its hello describes it (engine.backbone: name, native_size,
    window_frames, frame_rate, side_multiple, defaults); {} from a server that does not say."""
    engine = hello.get("engine") if isinstance(hello.get("engine"), dict) else {}
    backbone = engine.get("backbone")
    if not isinstance(backbone, dict) or not isinstance(backbone.get("native_size"), list):
        return {}
    return backbone


def gigabytes(nbytes: float) -> str:
    """17179869184 → "16.0 GiB"; under a GiB in MiB (as the backend's plan prints them)."""
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def gpu_text(hello: dict) -> str:
    """The server's GPU as its hello describes it (`gpu`: name, total_bytes, free_bytes,
    assumed), e.g. "GPU NVIDIA H200, 139.8 GiB (120.3 GiB free)"; "" without one."""
    gpu = hello.get("gpu")
    if not isinstance(gpu, dict) or not isinstance(gpu.get("total_bytes"), int | float):
        return ""
    text = f"GPU {gpu.get('name') or '?'}, {gigabytes(gpu['total_bytes'])}"
    free = gpu.get("free_bytes")
    if isinstance(free, int | float) and not gpu.get("assumed"):
        text += f" ({gigabytes(free)} free)"
    return text


def memory_line(reply: dict) -> str:
    """The panel's line for a server's `plan` reply (docs/protocol.md §4): the predicted
    peak against the server's GPU, the savers it needs, or why it cannot fit."""
    gpu = reply.get("gpu")
    if not isinstance(gpu, dict):
        return "The server has no GPU to plan for (it runs on a CPU)."
    budget = gigabytes(gpu.get("budget_bytes") or gpu.get("total_bytes") or 0)
    if reply.get("fits") is False:
        return str(reply.get("message") or f"Too big for the server's GPU ({budget}).")
    peak = reply.get("predicted_peak_bytes")
    if not isinstance(peak, int | float):
        return f"Not planned (memory 'off'); the server's GPU has {budget}."
    savers = reply.get("savers") or []
    saving = f", with {', '.join(str(s).replace('_', ' ') for s in savers)}" if savers else ""
    return f"Predicted peak {gigabytes(peak)} of {budget} GPU memory{saving}."


def server_frame_limit(hello: dict) -> int:
    """The most frames one job may have, as the server announces it in `hello`."""
    value = _limits(hello).get("max_frames")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return value
    return int(SETTINGS.MAX_FRAMES_CEILING)


def check_server_limits(hello: dict, settings: dict, render_size: tuple[int, int],
                        region: Region | None = None) -> None:
    """Refuse, before rendering, a job the server announced it would not take (a region
    goes only to a server whose limits name max_regions: an older one would take its
    masks for more frames of the strip).

    The frame count is checked by frames_to_render; the message size is known only
    once the frames are rendered (PNG sizes vary), so the client checks it before sending.
    """
    limits = _limits(hello)
    if region is not None and "max_regions" not in limits:
        raise UserError(f"The server does not take regions (it is older than this extension), "
                        f"so it cannot keep the plate outside {region.label}; update the "
                        f"server, or set the region to None.")
    max_side = limits.get("max_side")
    if isinstance(max_side, int) and max(render_size) > max_side:
        raise UserError(f"The frames would be {render_size[0]}x{render_size[1]} pixels and the "
                        f"server takes at most {max_side} on a side; set the render size limit "
                        f"in the Understudy preferences to {max_side} or less.")
    max_chars = limits.get("max_prompt_chars")
    for name in SETTINGS.TEXT_SETTINGS:
        text = settings.get(name)
        if isinstance(max_chars, int) and isinstance(text, str) and len(text) > max_chars:
            raise UserError(f"The {name.replace('_', ' ')} is {len(text)} characters long and the "
                            f"server takes at most {max_chars}; shorten it.")
    side = server_backbone(hello).get("side_multiple")
    for name in ("width", "height"):
        value = settings.get(name)
        if isinstance(side, int) and side > 0 and isinstance(value, int) and value % side:
            raise UserError(f"The model {name} is {value} and the server's model takes multiples "
                            f"of {side}; set it to a multiple of {side}, or 0 for the model's own.")
    max_queue, queued = limits.get("max_queue"), hello.get("queue_length")
    if isinstance(max_queue, int) and isinstance(queued, int) and queued >= max_queue:
        raise UserError(f"The server already has {queued} jobs queued or running, its limit; "
                        f"transfer again when one has finished.")


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


def transfer_settings(values: dict, frames_sent: int) -> dict:
    """The settings dict sent to the server: the panel's values plus the frame counts.

    Every frame sent is edited and comes back (num_frames = output_frames = frames
    sent), so the result has one generated frame per source frame. Empty optional text
    and a random seed are left out so the server's defaults apply (it picks and records
    a seed).
    """
    settings = {key: value for key, value in values.items() if value is not None}
    for optional_text in ("source_prompt", "negative_prompt"):
        if optional_text in settings and not settings[optional_text].strip():
            del settings[optional_text]
    if not settings.get("prompt", "").strip():
        raise UserError("The prompt is empty; type what the subject should become.")
    settings["num_frames"] = settings["output_frames"] = frames_sent
    try:
        SETTINGS.TransferSettings.from_dict(settings)
    except SETTINGS.BadSettingsError as error:
        raise UserError(str(error)) from None
    return settings


def progress_text(status: str, phase: str, percent: float) -> str:
    """What the progress bar says: 'sampling 40%', 'queued', 'waiting for the server'."""
    if phase == Phase.WAITING and status in ACTIVE:
        return "waiting for the server"
    if status == Status.SUBMITTED:
        return "queued"
    if status in (Status.RUNNING, Status.RENDERING, Status.PLACING):
        return f"{phase or status} {percent:.0f}%"
    if status == Status.UNPLACED:
        return "not placed"
    return str(status)


def lost_server_message(error: str) -> str:
    """After the server stopped answering: the error, and what brings the result in."""
    return (f"{error.rstrip('.')}; the job may still finish there, so {COLLECT_HINT} once the "
            f"server is back.")


def sidecar_summary(sidecar: dict) -> str:
    """One line about how a result was made, from the server's sidecar, for the panel:
    the steps and guided steps the edit used (never the request's automatic None), or
    the one sentence saying why the sidecar cannot be read; "" before there is one."""
    if not sidecar:
        return ""
    try:
        record = SIDECAR.Sidecar.from_dict(sidecar)
    except SIDECAR.SidecarError as error:
        return str(error)
    parts = [f"model {record.model}", f"seed {record.seed}",
             f"{record.steps} steps, {record.guided_steps} guided",
             "inversion from cache" if record.inversion_from_cache else "inversion computed"]
    total = sum(value for value in record.timings_s.values() if isinstance(value, int | float))
    parts.append(f"{total:.1f} s on the server")
    return ", ".join(parts)


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
# num_frames is not one of them: every visible frame of the strip is sent and edited.
PANEL_INT_SETTINGS = ("width", "height", "inversion_steps", "steps", "guided_steps",
                      "guidance_iterations", "region_grow", "region_feather")


# The choice settings the panel offers as drop-downs. Their choices, default and help
# come from shared/settings.py, as the whole-number settings' ranges do.
PANEL_CHOICE_SETTINGS = ("framing", "motion")


def choice_property(name: str) -> dict:
    """items, default and description of a choice setting, for the panel's EnumProperty
    (the setting's help, which says what each choice does, is the tooltip)."""
    spec = SETTINGS.spec_of(name)
    return {"items": [(choice, choice.capitalize(), spec.help) for choice in spec.choices],
            "default": SETTINGS.DEFAULTS[name], "description": spec.help}


def int_property_range(name: str) -> dict[str, int]:
    """default, min, max (and step) of a whole-number setting, for the panel's IntProperty.

    A bound that names another setting (guided_steps <= steps) takes that one's maximum.
    """
    spec = SETTINGS.spec_of(name)
    high = SETTINGS.spec_of(spec.high).high if isinstance(spec.high, str) else spec.high
    default = SETTINGS.DEFAULTS[name]
    if default is None:  # an automatic setting: the panel shows 0 for "automatic"
        return {"default": 0, "min": 0, "max": int(high)}
    bounds = {"default": int(default), "min": int(spec.low), "max": int(high)}
    if spec.multiple_of > 1:
        bounds["step"] = spec.multiple_of
    return bounds


def setting_from_panel(name: str, value: int) -> int | None:
    """A panel number as a setting: 0 in an automatic setting's field means automatic."""
    return None if value == 0 and SETTINGS.DEFAULTS[name] is None else value


def job_update(event: dict) -> tuple[dict, bool]:
    """How a server event or status reply changes a job record: (field values, fetch now?).

    Events have a "type" (shared/protocol.py EventType); status replies are job objects
    with a "state" (JobState). Unknown kinds change nothing, so a newer server cannot
    break an older extension.
    """
    kind = event.get("type") if "type" in event else event.get("state")
    if kind in (EventType.RESULT_READY, JobState.DONE):
        return {"status": Status.RUNNING, "phase": Phase.FETCHING, "percent": 100.0}, True
    if kind in (EventType.ERROR, JobState.FAILED):
        error = event.get("error") if isinstance(event.get("error"), dict) else {}
        message = str(event.get("message") or error.get("message")
                      or "The server could not finish the job.")
        return {"status": Status.FAILED, "message": message}, False
    if kind in (EventType.CANCELLED, JobState.CANCELLED):
        return {"status": Status.CANCELLED, "message": "Cancelled."}, False
    if kind in (EventType.PROGRESS, JobState.RUNNING, JobState.QUEUED):
        waiting = kind == JobState.QUEUED or event.get("phase") == JobState.QUEUED
        update: dict = {"status": Status.SUBMITTED if waiting else Status.RUNNING}
        if event.get("phase"):
            update["phase"] = str(event["phase"])
        percent = percent_from_event(event)
        if percent is not None:
            update["percent"] = max(0.0, min(100.0, percent))
        return update, False
    return {}, False


# --------------------------------------------------------------------------- regions (keep the plate)

# What the panel's region is: nothing (the whole frame changes), a Mask data-block, or a
# strip of the timeline used as a matte (white = subject).
REGION_NONE, REGION_MASK, REGION_STRIP = "NONE", "MASK", "STRIP"
REGION_KINDS = (
    (REGION_NONE, "None", "Change the whole frame"),
    (REGION_MASK, "Mask", "A Mask data-block outlines the subject (white = subject)"),
    (REGION_STRIP, "Matte strip", "A strip of the timeline is the subject's matte (white = "
                                  "subject), e.g. a mask strip or a rendered matte"),
)
# A mask pixel is the subject where its grey level is at least half way to white: the
# engine's rule (backend/masks.py REGION_THRESHOLD), checked before sending.
SUBJECT_GREY = 128


@dataclass(frozen=True)
class Region:
    """The panel's region for one transfer: what it is and its name (for sentences)."""

    kind: str
    name: str

    @property
    def label(self) -> str:
        return f"the mask {self.name!r}" if self.kind == REGION_MASK else f"the matte strip {self.name!r}"


def check_region(kind: str, name: str, source_name: str, source: Span,
                 matte: Span | None = None, shapes: int = 0) -> Region | None:
    """The region to render with the source, or None; UserError (one sentence) for a
    region that cannot mark the subject, before anything is rendered.

    kind MASK: `name` is the Mask data-block ("" when none is chosen), `shapes` its
    spline points. kind STRIP: `name` is the strip, `matte` its visible frames (None:
    no such strip); it must show every source frame (it may be muted: a matte is
    usually kept out of the edit, and it is rendered alone all the same).
    """
    if kind == REGION_NONE:
        return None
    if kind == REGION_MASK:
        if not name:
            raise UserError("The region is set to Mask but no mask is chosen; pick the Mask "
                            "that outlines the subject, or set the region to None.")
        if shapes == 0:
            raise UserError(f"The mask {name!r} has no shapes, so it marks no subject; draw "
                            f"the subject's outline in the Mask editor.")
        return Region(kind, name)
    if not name or matte is None:
        raise UserError(f"The matte strip {name!r} is not in this scene's timeline; pick the "
                        f"strip that shows the subject in white, or set the region to None."
                        if name else "The region is set to Matte strip but no strip is chosen; "
                        "pick the strip that shows the subject in white, or set the region to "
                        "None.")
    if name == source_name:
        raise UserError(f"{name!r} is the strip being transferred, so it cannot be its own "
                        f"matte; pick a strip that shows the subject in white.")
    if matte.start > source.start or matte.end < source.end:
        raise UserError(f"The matte strip {name!r} shows frames {matte.start}-{matte.end - 1} "
                        f"but {source_name!r} shows frames {source.start}-{source.end - 1}; make "
                        f"the matte cover every frame of the strip.")
    return Region(kind, name)


@dataclass(frozen=True)
class MatteFrame:
    """What the checks need of one rendered region frame: its size and whether it marks
    some subject (a pixel ≥ SUBJECT_GREY) and some plate (a pixel below it)."""

    width: int
    height: int
    subject: bool
    plate: bool

    @classmethod
    def of(cls, grey) -> MatteFrame:
        """From (H, W) uint8 grey levels (numpy), white = subject."""
        inside = grey >= SUBJECT_GREY
        return cls(int(grey.shape[1]), int(grey.shape[0]), bool(inside.any()),
                   not bool(inside.all()))


def check_region_frames(region: Region, frames: list[MatteFrame], size: tuple[int, int]) -> None:
    """UserError (one sentence) unless the rendered region fits the frames sent (size
    (w, h)), marks a subject in some frame and keeps a plate in some frame: black in
    every frame, or white over every pixel of every frame, is refused before anything
    is sent, as the server refuses it."""
    label = region.label[0].upper() + region.label[1:]
    for index, frame in enumerate(frames):
        if (frame.width, frame.height) != tuple(size):
            raise UserError(f"Frame {index + 1} of {region.label} rendered at {frame.width}x"
                            f"{frame.height}, not at the strip's {size[0]}x{size[1]}; give the "
                            f"matte the strip's size.")
    if not any(frame.subject for frame in frames):
        raise UserError(f"{label} is black in every frame of the strip, so it marks no "
                        f"subject; paint the subject white where the strip shows it.")
    if not any(frame.plate for frame in frames):
        raise UserError(f"{label} is white over the whole picture in every frame, so no plate "
                        f"would be kept; mark only the subject, or set the region to None to "
                        f"change the whole frame.")


def free_channel(span: Span, others: list[Neighbour]) -> int:
    """The highest channel with nothing over the span's frames (for a strip the extension
    adds only while it renders), or UserError when every channel is taken."""
    busy = {other.span.channel for other in others if other.span.overlaps(span.start, span.end)}
    for channel in range(MAX_CHANNEL, 0, -1):
        if channel not in busy:
            return channel
    raise UserError(f"Every channel is taken between frames {span.start} and {span.end - 1}, "
                    f"so the mask cannot be rendered; free one channel.")


def region_summary(sidecar: dict) -> str:
    """What the panel says of a result's region, from its sidecar ("" without one)."""
    regions = sidecar.get("regions") if isinstance(sidecar, dict) else None
    if not isinstance(regions, dict):
        return ""
    if not regions.get("composited"):
        return f"motion {regions.get('motion')}: the whole frame was regenerated"
    return (f"{regions.get('count')} region(s), grown {regions.get('grow')} px, feathered "
            f"{regions.get('feather')} px: the plate is kept outside")
