"""Where a result goes in the timeline: the source's checks, its channel, Make Room's moves.

Plain Python (no bpy): the Blender modules gather the strips' places (Span, Neighbour),
ask here, and carry out the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError

MAX_CHANNEL = 128  # Blender's sequencer has channels 1..128

# Strip types that show nothing on their own, so there is nothing to transfer from.
UNUSABLE_TYPES = {"SOUND": "a sound strip", "ADJUSTMENT": "an adjustment layer"}

# Strip types that show a picture in which nothing moves: there is no motion to transfer.
MOTIONLESS_TYPES = {"COLOR": "a colour strip"}


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


def free_channel(span: Span, others: list[Neighbour]) -> int:
    """The highest channel with nothing over the span's frames (for a strip the extension
    adds only while it renders), or UserError when every channel is taken."""
    busy = {other.span.channel for other in others if other.span.overlaps(span.start, span.end)}
    for channel in range(MAX_CHANNEL, 0, -1):
        if channel not in busy:
            return channel
    raise UserError(f"Every channel is taken between frames {span.start} and {span.end - 1}, "
                    f"so the mask cannot be rendered; free one channel.")
