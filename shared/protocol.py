"""Understudy's wire protocol: message layout, vocabulary and validation.

Spec: docs/protocol.md. A message is a list of ZeroMQ frames: a UTF-8 JSON header
(always with "v" and "type") followed by binary payload frames (PNG images).

The vocabulary (message types, job states) is a set of `str` enums: a member *is*
its wire string, so `JobState.DONE == "done"` and JSON carries the plain string. The
error codes are one more (ErrorCode), kept with the errors' root in shared/errors.py. Standard library only (pyzmq is needed by the client, not here): this module
rides inside the Blender extension.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .errors import ErrorCode, UnderstudyError
from .settings import DEFAULTS, MAX_PROMPT_CHARS, TEXT_SETTINGS, text_length_problem

PROTOCOL_VERSION = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # silent intervals before the client calls the server gone
CLIENT_EXPIRY_INTERVALS = 10  # silent intervals before the server forgets a client
# A submit or plan that needs a memory plan is answered once the plan is made (seconds
# to tens of seconds on the server's CPU, more while other plans wait first); the server
# answers everything else meanwhile. A client waits this long for such a reply while the
# server answers its heartbeats, and its usual timeout when the server is silent.
PLAN_WAIT_S = 600.0
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_DEPTH = 32  # nesting of JSON objects and arrays in a header
DEFAULT_LIMITS: dict[str, int] = {
    "max_message_bytes": 512 * 1024 * 1024,
    "max_frames": DEFAULTS["frame_limit"],  # the most frames one edit takes, by default
    "max_side": 4096,
    # Decoded pixels of the frames one job uses (frames used × width × height): the
    # bound on the memory a job's input takes on the server, 3 bytes a pixel.
    "max_job_pixels": 128 * 2**20,
    "max_prompt_chars": MAX_PROMPT_CHARS,
    "max_queue": 16,
}
# Regions one job may carry (docs/protocol.md §4, "Regions"): each is one mask frame per
# clip frame, after the clip's frames in the submit's payload. A server announces it in
# its limits: an older server would read mask frames as more clip frames, so a client
# sends regions only to a server whose welcome names `max_regions`.
MAX_REGIONS = 8
DEFAULT_LIMITS["max_regions"] = MAX_REGIONS
# Takes one job may make (docs/protocol.md §4, "Takes"): every prompt of the submit's
# `prompts` with `takes` seeds each, from one inversion. A server announces it in its
# limits; a client asks for more than one take only of a server whose welcome names it.
MAX_TAKES = 8
DEFAULT_LIMITS["max_takes"] = MAX_TAKES
# Reference images one job may carry (docs/protocol.md §4, "References"): PNGs after the
# clip's and the masks' frames, counted by the submit's `references`. How many a server
# takes is its backbone's (the welcome's `max_references`, 0 when it takes none: a client
# sends none then); this is only the most any header may name.
MAX_WIRE_REFERENCES = 8


class RequestType(StrEnum):
    """Client → server; each gets exactly one reply."""

    HELLO = "hello"
    SUBMIT = "submit"
    STATUS = "status"
    CANCEL = "cancel"
    FETCH = "fetch"
    HEARTBEAT = "heartbeat"
    PLAN = "plan"  # the memory plan of a job not sent: predicted peak and savers (§4)


class ReplyType(StrEnum):
    """Server → client, answering one request (carries its `req`)."""

    WELCOME = "welcome"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    STATUS = "status"
    RESULT = "result"
    HEARTBEAT = "heartbeat"
    PLAN = "plan"
    ERROR = "error"


class EventType(StrEnum):
    """Server → the client that submitted a job, unasked (no `req`)."""

    PROGRESS = "progress"
    RESULT_READY = "result_ready"
    TAKE_READY = "take_ready"  # one take of a several-take job is on disk (§5)
    ERROR = "error"
    CANCELLED = "cancelled"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})


REQUEST_TYPES = frozenset(RequestType)
EVENT_TYPES = frozenset(EventType)

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Finds a request number in a header too large or too deep to parse, so that even
# that error reply can carry its `req`.
_REQ_FIELD = re.compile(rb'"req"\s*:\s*(\d{1,15})[\s,}]')


class ProtocolError(UnderstudyError):
    """A message breaks the protocol: `str(error)` (also `message`) is the sentence, `code`
    one of docs/protocol.md §10 (ErrorCode)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message, code)
        self.message = message


def json_text(value: Any, **options: Any) -> str:
    """JSON as the protocol and the job store write it: NaN and Infinity are refused
    (they are not JSON), and so is text that is not valid Unicode."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False, **options)
        text.encode("utf-8")
    except ValueError as error:  # UnicodeEncodeError is a ValueError too
        raise ProtocolError(
            "The message holds a number that is not finite (NaN or "
            f"Infinity) or text that is not valid Unicode ({error}); send finite numbers and "
            "UTF-8 text.", ErrorCode.BAD_REQUEST) from None
    return text


def encode(header: dict[str, Any], payload: list[bytes] | None = None) -> list[bytes]:
    """Header dict (+ payload frames) → frames to send; adds "v" when missing.

    Raises ProtocolError (bad_request) for a header that is not strict JSON.
    """
    header = {"v": PROTOCOL_VERSION, **header}
    return [json_text(header, separators=(",", ":")).encode("utf-8"), *(payload or [])]


def decode(frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """Frames → (header, payload). Checks only the envelope: JSON object, v, type.

    A wrong version raises ProtocolError (protocol_version); the header is still
    readable via `decode_header` for error replies that carry `req`.
    """
    if not frames:
        raise ProtocolError("The message is empty; send a JSON header frame first.",
                            ErrorCode.BAD_HEADER)
    header = decode_header(frames[0])
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # true and 1.0 are not 1
        raise ProtocolError(
            f"This peer speaks Understudy protocol version {PROTOCOL_VERSION} but the message "
            f"uses version {version!r}; update the older side.",
            ErrorCode.PROTOCOL_VERSION,
        )
    if not isinstance(header.get("type"), str):
        raise ProtocolError("The header has no 'type'; say what the message is.",
                            ErrorCode.BAD_HEADER)
    return header, list(frames[1:])


def decode_header(frame: bytes) -> dict[str, Any]:
    """The JSON header frame → dict, or ProtocolError (bad_header).

    Strict JSON only: no NaN/Infinity (not even as an overflowing 1e999), nesting at
    most MAX_HEADER_DEPTH deep, and text that encodes as UTF-8 (no lone surrogates).
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(
            f"The header is {len(frame)} bytes; keep it under {MAX_HEADER_BYTES}.",
            ErrorCode.BAD_HEADER)
    try:
        text = bytes(frame).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("The first frame is not UTF-8 JSON; send a "
                            "JSON object header.", ErrorCode.BAD_HEADER) from None
    if _nesting_depth(text) > MAX_HEADER_DEPTH:
        raise ProtocolError(f"The header nests deeper than {MAX_HEADER_DEPTH} levels; send a "
                            "flat JSON object.", ErrorCode.BAD_HEADER)
    try:
        header = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as error:
        if isinstance(error, ProtocolError):
            raise
        raise ProtocolError("The first frame is not UTF-8 JSON; send a "
                            "JSON object header.", ErrorCode.BAD_HEADER) from None
    if not isinstance(header, dict):
        raise ProtocolError("The header must be a JSON object.", ErrorCode.BAD_HEADER)
    json_text(header)  # lone surrogates (from \ud800 escapes) cannot be stored or echoed
    return header


class _NotJson(ProtocolError, ValueError):
    """Raised inside json.loads hooks; a ValueError so json passes it through."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"The header holds {name}, which is not JSON; send "
                   "finite numbers.", ErrorCode.BAD_HEADER)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"The header holds the number {text[:20]}, which "
                       "is too large; send finite numbers.", ErrorCode.BAD_HEADER)
    return value


def _nesting_depth(text: str) -> int:
    """How deep [ and { nest, outside strings (cheap, before json builds anything)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def peek_req(frame: bytes) -> int | None:
    """The request number of a header, read without trusting it to parse."""
    try:
        req = decode_header(frame).get("req")
        return req if isinstance(req, int) and not isinstance(req, bool) else None
    except ProtocolError:
        found = _REQ_FIELD.search(bytes(frame[:MAX_HEADER_BYTES * 2]))
        return int(found.group(1)) if found else None


def check_job_id(value: Any) -> str:
    """Return a valid job id or raise ProtocolError (bad_job_id)."""
    if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            f"The job id {value!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
            ErrorCode.BAD_JOB_ID,
        )
    return value


def require(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """header[name] if present with the right JSON type, else ProtocolError (bad_request)."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(
            f"The {header.get('type')!r} message needs a field {name!r} "
            f"of type {_type_name(kind)}.", ErrorCode.BAD_REQUEST)
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
             bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def is_png(frame: bytes) -> bool:
    """True when the bytes start with the PNG signature (a cheap first check)."""
    return bytes(frame[:8]) == PNG_SIGNATURE


def request_digest(settings: dict[str, Any], frames: list[bytes], regions: int = 0,
                   takes: TakesRequest | None = None, references: int = 0) -> str:
    """SHA-256 over canonical settings JSON, the region count, the takes asked for, the
    reference count and every payload frame (clip, then masks, then references): same
    request, same digest. Without regions, takes and references it is the digest jobs
    stored before any of them existed have, so they still match their duplicates."""
    digest = hashlib.sha256()
    digest.update(json_text(settings, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    if regions:  # 12 clip frames and 6 + 6 mask frames are different requests
        digest.update(f"regions:{regions}".encode("ascii"))
    if takes is not None and takes.asked:  # two takes of a clip are not its one edit
        digest.update(json_text(["takes", takes.seeds, takes.prompts]).encode("utf-8"))
    if references:  # a clip frame and a reference are different requests
        digest.update(f"references:{references}".encode("ascii"))
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "big"))
        digest.update(frame)
    return digest.hexdigest()


def payload_size(frames: list[bytes]) -> int:
    """Total bytes of a message's frames."""
    return sum(len(frame) for frame in frames)


def max_payload_frames(limits: dict[str, int]) -> int:
    """The most payload frames a message may have: a clip of max_frames frames, one
    mask frame per clip frame for each of MAX_REGIONS regions, and MAX_WIRE_REFERENCES
    reference images."""
    return limits["max_frames"] * (1 + MAX_REGIONS) + MAX_WIRE_REFERENCES


def check_message_limits(frame_count: int, total_bytes: int, limits: dict[str, int],
                         frame_limit: int | None = None) -> None:
    """Refuse a message over the size limits; needs only counts, so a server can call
    it before it copies anything. `frame_limit`: the most frames (default max_frames)."""
    frame_limit = limits["max_frames"] if frame_limit is None else frame_limit
    if total_bytes > limits["max_message_bytes"]:
        raise ProtocolError(
            f"The job is {total_bytes / 2**20:.1f} MiB; the server "
            f"accepts at most {limits['max_message_bytes'] / 2**20:.0f} MiB, so send fewer or "
            "smaller frames.", ErrorCode.TOO_LARGE)
    if frame_count > frame_limit:
        raise ProtocolError(
            f"The job has {frame_count} frames; the server accepts "
            f"at most {frame_limit}, so send a shorter range.", ErrorCode.TOO_MANY_FRAMES)


def check_regions(value: Any) -> int:
    """A submit's or plan request's `regions` field (absent: 0), or
    ProtocolError (bad_request)."""
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_REGIONS:
        raise ProtocolError(
            f"The request's 'regions' is {value!r}; send a whole number "
            f"from 0 to {MAX_REGIONS} (how many regions the job has).", ErrorCode.BAD_REQUEST)
    return value


def check_references(value: Any, max_references: int) -> int:
    """A submit's `references` field (absent: 0) for a server that takes `max_references`
    (its welcome's), or ProtocolError: bad_request for a value that is no count,
    bad_reference for more than the server takes."""
    if value is None:
        return 0
    if type(value) is not int or not 0 <= value <= MAX_WIRE_REFERENCES:
        raise ProtocolError(
            f"The request's 'references' is {value!r}; send a whole number from 0 to "
            f"{MAX_WIRE_REFERENCES} (how many reference images the job has).",
            ErrorCode.BAD_REQUEST)
    if value > max_references:
        raise ProtocolError(references_refused(value, max_references), ErrorCode.BAD_REFERENCE)
    return value


def references_refused(count: int, max_references: int) -> str:
    """The sentence for `count` reference images to a server that takes `max_references`
    (its welcome's): the client, the extension and the server say the same."""
    if not max_references:
        return ("The server's model takes no reference image; remove the reference, or run "
                "the server with a Wan VACE model (such as Wan-AI/Wan2.1-VACE-1.3B-diffusers).")
    return (f"The job has {count} reference images; the server's model takes at most "
            f"{max_references}.")


def split_references(payload: list[bytes], references: int) -> tuple[list[bytes], list[bytes]]:
    """A submit's payload → (the clip's and masks' frames, the reference images): the
    references are its last `references` frames; too few frames is ProtocolError."""
    if not references:
        return list(payload), []
    if len(payload) <= references:
        raise ProtocolError(
            f"The job has {len(payload)} frames but names {references} reference images; "
            "send the clip's frames, then the masks', then the references.", ErrorCode.BAD_FRAMES)
    return list(payload[:-references]), list(payload[-references:])


@dataclass(frozen=True)
class TakesRequest:
    """The takes a submit or plan request asks for (docs/protocol.md §4, Takes): `seeds`
    takes of each prompt in `prompts` (None: the settings' prompt alone). Take k (from 1)
    is prompt (k − 1) // seeds with seed settings.seed + (k − 1) % seeds."""

    seeds: int = 1
    prompts: tuple[str, ...] | None = None

    @property
    def count(self) -> int:
        """The job's takes in all."""
        return self.seeds * (1 if self.prompts is None else len(self.prompts))

    @property
    def asked(self) -> bool:
        """Whether the request names takes at all (a request without them is as before)."""
        return self.seeds != 1 or self.prompts is not None

    def fields(self) -> dict[str, Any]:
        """The header fields that ask for these takes ({} for one take of the settings'
        prompt: an older server reads no takes, and such a job is as before)."""
        fields: dict[str, Any] = {}
        if self.seeds != 1:
            fields["takes"] = self.seeds
        if self.prompts is not None:
            fields["prompts"] = list(self.prompts)
        return fields


def check_takes(header: dict[str, Any], limits: dict[str, int]) -> TakesRequest:
    """A submit's or plan request's `takes` and `prompts` (absent: one take of the
    settings' prompt), or ProtocolError: bad_request for a wrong type, bad_settings for a
    prompt too long or more takes in all than `max_takes`."""
    most = limits.get("max_takes", MAX_TAKES)
    seeds, prompts = header.get("takes"), header.get("prompts")
    if seeds is None:
        seeds = 1
    if type(seeds) is not int or not 1 <= seeds <= most:
        raise ProtocolError(f"The request's 'takes' is {seeds!r}; send a whole number from 1 "
                            f"to {most} (seeds of each prompt).", ErrorCode.BAD_REQUEST)
    if prompts is not None:
        if (not isinstance(prompts, list) or not 1 <= len(prompts) <= most
                or not all(isinstance(prompt, str) for prompt in prompts)):
            raise ProtocolError(f"The request's 'prompts' must be a list of 1 to {most} "
                                "prompt strings.", ErrorCode.BAD_REQUEST)
        for prompt in prompts:
            if problem := text_length_problem("prompt", prompt, limits["max_prompt_chars"]):
                raise ProtocolError(problem, ErrorCode.BAD_SETTINGS)
        prompts = tuple(prompts)
    request = TakesRequest(seeds, prompts)
    if request.count > most:
        raise ProtocolError(
            f"The job asks for {request.count} takes ({len(prompts or ())} prompts × {seeds} "
            f"seeds); the server makes at most {most} in one job, so ask for fewer.",
            ErrorCode.BAD_SETTINGS)
    return request


def split_payload(payload: list[bytes], regions: int) -> tuple[list[bytes], list[list[bytes]]]:
    """A submit's payload (without its references, `split_references`) → (clip frames,
    each region's mask frames).

    The payload is the clip's F frames, then F mask frames for each region in turn, so
    it holds F × (1 + regions) frames; another count is ProtocolError (bad_mask).
    """
    if regions == 0:
        return list(payload), []
    if len(payload) % (1 + regions):
        raise ProtocolError(
            f"The job has {len(payload)} frames for a clip and {regions} "
            f"region{'s' if regions > 1 else ''}, which is not {1 + regions} equal parts; send "
            "one mask frame per clip frame for every region.", ErrorCode.BAD_MASK)
    count = len(payload) // (1 + regions)
    return (list(payload[:count]),
            [list(payload[count * (1 + region):count * (2 + region)])
             for region in range(regions)])


def check_submit_limits(settings: dict[str, Any], frames: list[bytes], header_bytes: int,
                        limits: dict[str, int], masks: Sequence[list[bytes]] = (),
                        references: Sequence[bytes] = ()) -> None:
    """Refuse a submit over the server's limits, before anything is stored or sent.

    Shared by the client (to fail early with a clear sentence) and the server (to
    enforce). `masks`: each region's mask frames, one per clip frame; they count in
    the message size, and a region of another length is "bad_mask". `references`: the
    reference images' PNGs; they count in the message size (their count is checked
    against the server's backbone by `check_references`). Also bounds the reply: the
    result's frame count and its raw pixels.
    """
    mask_bytes = sum(payload_size(region) for region in masks)
    check_message_limits(len(frames), header_bytes + payload_size(frames) + mask_bytes
                         + payload_size(list(references)), limits)
    if not frames:
        raise ProtocolError("The job has no frames; send the clip as PNG frames.",
                            ErrorCode.BAD_FRAMES)
    if len(masks) > MAX_REGIONS:
        raise ProtocolError(f"The job has {len(masks)} regions; the server "
                            f"takes at most {MAX_REGIONS}, so merge some of their masks.",
                            ErrorCode.BAD_MASK)
    for index, region in enumerate(masks):
        if len(region) != len(frames):
            raise ProtocolError(
                f"Region {index + 1} has {len(region)} mask frames but the "
                f"clip has {len(frames)}; send one mask frame per clip frame.", ErrorCode.BAD_MASK)
    for name in TEXT_SETTINGS:
        text = settings.get(name)
        if isinstance(text, str) and (
                problem := text_length_problem(name, text, limits["max_prompt_chars"])):
            raise ProtocolError(problem, ErrorCode.BAD_SETTINGS)
    check_reply_size(settings, limits)


def check_reply_size(settings: dict[str, Any], limits: dict[str, int]) -> None:
    """The result must fit the same limits as a submit: at most max_frames frames, and
    their raw RGB pixels at most max_message_bytes (a PNG is never much larger)."""
    count = settings.get("output_frames")
    if count is None:
        count = settings.get("num_frames")
    # The result has the last stage's size: the upscaler's when one runs.
    upscaled = settings.get("upscale", DEFAULTS["upscale"]) != "none"
    width = settings.get("upscale_width" if upscaled else "width",
                         DEFAULTS["upscale_width" if upscaled else "width"])
    height = settings.get("upscale_height" if upscaled else "height",
                          DEFAULTS["upscale_height" if upscaled else "height"])
    if not all(isinstance(value, int) and not isinstance(value, bool)
               for value in (count, width, height)):
        return  # defaults or wrong types: the settings check answers those
    if count > limits["max_frames"]:
        raise ProtocolError(
            f"The result would have {count} frames; the server "
            f"returns at most {limits['max_frames']}, so ask for fewer output frames.",
            ErrorCode.BAD_SETTINGS)
    if count * width * height * 3 > limits["max_message_bytes"]:
        raise ProtocolError(
            f"The result ({count} frames of {width}×{height}) would "
            f"exceed the server's {limits['max_message_bytes'] / 2**20:.0f} MiB message "
            "limit; ask for fewer or smaller output frames.", ErrorCode.BAD_SETTINGS)


def error_header(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An error reply or event header."""
    return {"type": ReplyType.ERROR, "code": code, "message": message, **fields}


def failure_reply(error: BaseException, what_failed: str, log: str) -> tuple[str, str]:
    """Any exception that ended a job → the (code, sentence) its error reply carries.

    An UnderstudyError says its own code and sentence. Anything else is a bug, not
    something the user can fix: `internal`, and a sentence saying what failed, the
    exception's class and which log holds the traceback, e.g. what_failed="The server
    failed on this job", log="the server log". The server's job thread and the Ray
    actor both answer through this, so one failure reads the same on one box and on
    a cluster.
    """
    if isinstance(error, UnderstudyError):
        return error.code, str(error)
    return ErrorCode.INTERNAL, f"{what_failed} ({type(error).__name__}); see {log}."
