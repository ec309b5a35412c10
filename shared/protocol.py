"""Understudy's wire protocol: message layout, constants and validation.

Spec: docs/protocol.md. A message is a list of ZeroMQ frames: a UTF-8 JSON header
(always with "v" and "type") followed by binary payload frames (PNG images).

Standard library only (pyzmq is needed by the client, not here): this module rides
inside the Blender extension.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

PROTOCOL_VERSION = 1
DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_LIVENESS = 3  # silent intervals before the client calls the server gone
CLIENT_EXPIRY_INTERVALS = 10  # silent intervals before the server forgets a client
ZMTP_HEARTBEAT_IVL_MS = 1000
ZMTP_HEARTBEAT_TIMEOUT_MS = 3000

MAX_HEADER_BYTES = 64 * 1024
DEFAULT_LIMITS: dict[str, int] = {
    "max_message_bytes": 512 * 1024 * 1024,
    "max_frames": 1000,
    "max_side": 4096,
    "max_prompt_chars": 1000,
    "max_queue": 16,
}

# Message types. Requests go client → server; each gets one reply.
HELLO, SUBMIT, STATUS, CANCEL, FETCH, HEARTBEAT = (
    "hello", "submit", "status", "cancel", "fetch", "heartbeat")
REQUEST_TYPES = frozenset({HELLO, SUBMIT, STATUS, CANCEL, FETCH, HEARTBEAT})
# Replies.
WELCOME, ACCEPTED, REJECTED, RESULT, ERROR = "welcome", "accepted", "rejected", "result", "error"
# Events: sent unasked to the client that submitted a job (ERROR is also an event).
PROGRESS, RESULT_READY, CANCELLED = "progress", "result_ready", "cancelled"
EVENT_TYPES = frozenset({PROGRESS, RESULT_READY, ERROR, CANCELLED})

# Job states.
QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
JOB_CANCELLED = "cancelled"
FINISHED_STATES = frozenset({DONE, FAILED, JOB_CANCELLED})

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ProtocolError(Exception):
    """A message breaks the protocol. `code` is one of docs/protocol.md §10."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(header: dict[str, Any], payload: list[bytes] | None = None) -> list[bytes]:
    """Header dict (+ payload frames) → frames to send; adds "v" when missing."""
    header = {"v": PROTOCOL_VERSION, **header}
    return [json.dumps(header, separators=(",", ":")).encode("utf-8"), *(payload or [])]


def decode(frames: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
    """Frames → (header, payload). Checks only the envelope: JSON object, v, type.

    A wrong version raises ProtocolError("protocol_version"); the header is still
    readable via `decode_header` for error replies that carry `req`.
    """
    if not frames:
        raise ProtocolError("bad_header", "The message is empty; send a JSON header frame first.")
    header = decode_header(frames[0])
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "protocol_version",
            f"This peer speaks Understudy protocol version {PROTOCOL_VERSION} but the message "
            f"uses version {version!r}; update the older side.",
        )
    if not isinstance(header.get("type"), str):
        raise ProtocolError("bad_header", "The header has no 'type'; say what the message is.")
    return header, list(frames[1:])


def decode_header(frame: bytes) -> dict[str, Any]:
    """The JSON header frame → dict, or ProtocolError("bad_header")."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(
            "bad_header", f"The header is {len(frame)} bytes; keep it under {MAX_HEADER_BYTES}.")
    try:
        header = json.loads(bytes(frame).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(
            "bad_header", "The first frame is not UTF-8 JSON; send a JSON object header.") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "The header must be a JSON object.")
    return header


def check_job_id(value: Any) -> str:
    """Return a valid job id or raise ProtocolError("bad_job_id")."""
    if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            "bad_job_id",
            f"The job id {value!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
        )
    return value


def require(header: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """header[name] if present with the right JSON type, else ProtocolError("bad_request")."""
    value = header.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(
            "bad_request", f"The {header.get('type')!r} message needs a field {name!r} "
            f"of type {_type_name(kind)}.")
    return value


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
             bool: "boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def is_png(frame: bytes) -> bool:
    """True when the bytes start with the PNG signature (a cheap first check)."""
    return bytes(frame[:8]) == PNG_SIGNATURE


def request_digest(settings: dict[str, Any], frames: list[bytes]) -> str:
    """SHA-256 over canonical settings JSON and every frame: same request, same digest."""
    digest = hashlib.sha256()
    digest.update(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for frame in frames:
        digest.update(len(frame).to_bytes(8, "big"))
        digest.update(frame)
    return digest.hexdigest()


def payload_size(frames: list[bytes]) -> int:
    """Total bytes of a message's frames."""
    return sum(len(frame) for frame in frames)


def check_submit_limits(settings: dict[str, Any], frames: list[bytes], header_bytes: int,
                        limits: dict[str, int]) -> None:
    """Refuse a submit over the server's limits, before anything is stored or sent.

    Shared by the client (to fail early with a clear sentence) and the server (to enforce).
    """
    total = header_bytes + payload_size(frames)
    if total > limits["max_message_bytes"]:
        raise ProtocolError(
            "too_large", f"The job is {total / 2**20:.1f} MiB; the server accepts at most "
            f"{limits['max_message_bytes'] / 2**20:.0f} MiB, so send fewer or smaller frames.")
    if len(frames) > limits["max_frames"]:
        raise ProtocolError(
            "too_many_frames", f"The job has {len(frames)} frames; the server accepts at most "
            f"{limits['max_frames']}, so send a shorter range.")
    if not frames:
        raise ProtocolError("bad_frames", "The job has no frames; send the clip as PNG frames.")
    for name in ("prompt", "source_prompt", "negative_prompt", "prompt_prefix"):
        text = settings.get(name)
        if isinstance(text, str) and len(text) > limits["max_prompt_chars"]:
            raise ProtocolError(
                "bad_settings", f"Setting {name!r} is {len(text)} characters long; keep it "
                f"under {limits['max_prompt_chars']}.")


def error_header(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """An error reply or event header."""
    return {"type": ERROR, "code": code, "message": message, **fields}
