"""Answers to requests: one method per request type, each returning its reply.

Runs in the main thread. Validation happens here, before the book is asked to keep
anything; the book decides what a caller may see.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backend.errors import UnderstudyError
from backend.server.book import JobBook
from backend.server.engine_api import TransferEngine
from backend.server.frames import check_mask_frames, check_pixel_budget, check_png_frames
from backend.server.store import Job, StoreUnavailable
from backend.server.transport import Incoming, client_name, printable
from shared import protocol
from shared.protocol import ErrorCode, ProtocolError, ReplyType, RequestType

if TYPE_CHECKING:
    from backend.memory_savers import MemoryPlanner

log = logging.getLogger("understudy.server")

@dataclass
class Answer:
    """The reply to one request, and what it changed for others: a queued job it
    cancelled (whose client is told, and the queue behind it moved)."""

    reply: dict[str, Any]
    payload: list[bytes] = field(default_factory=list)
    cancelled: Job | None = None


class Requests:
    """Turns one Incoming message into exactly one Answer (never raises)."""

    def __init__(self, book: JobBook, engine: TransferEngine, limits: dict[str, int],
                 heartbeat_s: float, secure: Callable[[], bool],
                 dropped: Callable[[], int], memory: MemoryPlanner | None = None) -> None:
        self.book = book
        self.engine = engine
        self.memory = memory  # `--memory auto`: plans jobs before they are queued
        self.limits = limits
        self.heartbeat_s = heartbeat_s
        self.secure = secure
        self.dropped = dropped

    def answer(self, message: Incoming) -> Answer:
        """The answer to one message; every failure becomes an error reply with its req."""
        req = protocol.peek_req(message.frames[0]) if message.frames else None
        try:
            if message.refusal is not None:
                raise message.refusal
            header, payload = protocol.decode(message.frames)
            answer = self._dispatch(message, header, payload)
        except ProtocolError as error:
            answer = Answer(protocol.error_header(error.code, error.message))
        except StoreUnavailable as error:
            answer = Answer(protocol.error_header(error.code, str(error)))
        except Exception:  # a server bug must not take the other clients down
            log.error("Request from %s failed:\n%s", printable(message.routing_id),
                      traceback.format_exc())
            answer = Answer(protocol.error_header(
                ErrorCode.INTERNAL, "The server failed on this request; see the server log."))
        if req is not None:
            answer.reply["req"] = req
        return answer

    def _dispatch(self, message: Incoming, header: dict[str, Any], payload: list[bytes]
                  ) -> Answer:
        kind = header["type"]
        client, owner = client_name(message.routing_id), message.owner
        if kind == RequestType.HEARTBEAT:
            return Answer({"type": ReplyType.HEARTBEAT, "queue_length": self.book.queue_length(),
                           "time": time.time()})
        if kind == RequestType.HELLO:
            return Answer(self._welcome())
        if kind == RequestType.SUBMIT:
            return Answer(self._submit(client, owner, header, payload))
        if kind == RequestType.STATUS:
            if header.get("job_id") is None:
                return Answer({"type": ReplyType.STATUS, "jobs": self.book.jobs_of(client, owner)})
            job_id = protocol.check_job_id(header.get("job_id"))
            return Answer({"type": ReplyType.STATUS, "job": self.book.view(job_id, owner)})
        if kind == RequestType.CANCEL:
            info, cancelled = self.book.cancel(protocol.check_job_id(header.get("job_id")), owner)
            return Answer({"type": ReplyType.STATUS, "job": info}, cancelled=cancelled)
        if kind == RequestType.PLAN:
            return Answer(self._plan(header))
        if kind == RequestType.FETCH:
            job_id = protocol.check_job_id(header.get("job_id"))
            sidecar, frames = self.book.result(job_id, owner)
            return Answer({"type": ReplyType.RESULT, "job_id": job_id, "sidecar": sidecar,
                           "frame_count": len(frames)}, frames)
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"Unknown message type {kind!r}; this "
                            f"server understands {', '.join(sorted(protocol.REQUEST_TYPES))}.")

    def _welcome(self) -> dict[str, Any]:
        from backend import __version__

        described = self.engine.describe()
        problem = self.book.health()
        return {"type": ReplyType.WELCOME, "server": "understudy", "version": __version__,
                "model": described.get("model"), "device": described.get("device"),
                "engine": described, "limits": self.limits, "heartbeat_s": self.heartbeat_s,
                "queue_length": self.book.queue_length(), "secure": self.secure(),
                "degraded": problem, "dropped_messages": self.dropped(), **self._gpu()}

    def _gpu(self) -> dict[str, Any]:
        """The hello's GPU fields: `gpu` (name, total_bytes, free_bytes, budget_bytes,
        assumed; null without one) and the savers `--memory auto` may turn on."""
        from shared.settings import MEMORY_SAVERS

        gpu = self.memory.gpu() if self.memory is not None else None
        return {"gpu": gpu, "memory_savers": list(MEMORY_SAVERS) if gpu is not None else []}

    def _decide_memory(self, settings: Any, clip_length: int, size: tuple[int, int]) -> Any:
        """The savers a job needs on this GPU (None: nothing planned); TooBigForGpuError
        with one sentence when it cannot fit even with every saver."""
        if self.memory is None:
            return None
        return self.memory.decide(self.engine.backbone, settings, clip_length, size)

    def _plan(self, header: dict[str, Any]) -> dict[str, Any]:
        """The memory plan of a job described, not sent (docs/protocol.md §4, `plan`)."""
        from backend.errors import TooBigForGpuError
        from shared.settings import TransferSettings

        settings = protocol.require(header, "settings", dict)
        frame_count = protocol.require(header, "frame_count", int)
        frame_size = protocol.require(header, "frame_size", list)
        if (isinstance(frame_count, bool) or not 1 <= frame_count <= self.limits["max_frames"]
                or len(frame_size) != 2 or not all(
                    isinstance(side, int) and not isinstance(side, bool)
                    and 1 <= side <= self.limits["max_side"] for side in frame_size)):
            raise ProtocolError(ErrorCode.BAD_REQUEST, (
                f"A plan request needs frame_count (1 to {self.limits['max_frames']}) and "
                f"frame_size [width, height] (1 to {self.limits['max_side']} px)."))
        size = (frame_size[0], frame_size[1])
        try:
            parsed = TransferSettings.from_dict({"frame_limit": self.limits["max_frames"], **settings})
            self.engine.check_settings(parsed, frame_count, size)
            reply: dict[str, Any] = {"type": ReplyType.PLAN, **self._gpu(), "fits": True,
                                     "savers": [], "predicted_peak_bytes": None, "message": None}
            if self.memory is None or reply["gpu"] is None or parsed.memory == "off":
                return reply
            from backend.method.engine import frames_to_edit

            resolved = self.engine.resolve(parsed)
            plan = self.memory.plan(self.engine.backbone, resolved,
                                    frames_to_edit(resolved, frame_count), size)  # decide's, cached
            reply["peak_bytes"] = plan.peak_bytes
            try:
                decision = self._decide_memory(parsed, frame_count, size)
                reply.update(savers=list(decision.savers),
                             predicted_peak_bytes=decision.predicted_peak_bytes)
            except TooBigForGpuError as refusal:
                reply.update(fits=False, message=str(refusal), savers=[s["name"] for s in plan.savers],
                             predicted_peak_bytes=min([plan.peak_bytes,
                                                       *(s["peak_bytes"] for s in plan.savers)]))
            return reply
        except TypeError as error:
            raise ProtocolError(ErrorCode.BAD_SETTINGS, f"The settings are not valid ({error}).") from None
        except UnderstudyError as error:
            raise ProtocolError(error.code, str(error)) from None

    def _with_model_size(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings with the model's width and height where they are left to it, so the
        result's size bound (protocol.check_reply_size) is checked for them too."""
        defaults = (self.engine.describe().get("backbone") or {}).get("defaults") or {}
        sizes = {name: defaults[name] for name in ("width", "height") if name in defaults}
        return {**sizes, **{name: value for name, value in settings.items() if value is not None}}

    def _submit(self, client: str, owner: str | None, header: dict[str, Any],
                payload: list[bytes]) -> dict[str, Any]:
        from shared.settings import TransferSettings

        job_id = protocol.check_job_id(header.get("job_id"))
        try:
            settings = protocol.require(header, "settings", dict)
            regions = protocol.check_regions(header.get("regions"))
            clip, masks = protocol.split_payload(payload, regions)
            header_bytes = len(protocol.json_text(header))
            protocol.check_submit_limits(self._with_model_size(settings), clip, header_bytes,
                                         self.limits, masks)
            digest = protocol.request_digest(settings, payload, regions)
            repeated = self.book.existing(job_id, client, owner, digest)
            if repeated is not None:
                return {"type": ReplyType.ACCEPTED, **repeated}
            # Unless the client says otherwise, a job may edit every frame this server takes.
            settings = {"frame_limit": self.limits["max_frames"], **settings}
            try:
                parsed = TransferSettings.from_dict(settings)
            except TypeError as error:  # from_dict passes values to the dataclass
                raise ProtocolError(ErrorCode.BAD_SETTINGS,
                                    f"The settings are not valid ({error}).") from None
            size = check_png_frames(clip, self.limits["max_side"])
            frames_used = len(clip) if parsed.num_frames is None else min(parsed.num_frames,
                                                                          len(clip))
            check_pixel_budget(frames_used, size, self.limits["max_job_pixels"],
                               regions * len(clip))
            check_mask_frames(masks, len(clip), size)
            self.engine.check_settings(parsed, len(clip), size)
            self._decide_memory(parsed, len(clip), size)  # before queueing: too_big_for_gpu
            job = Job(job_id=job_id, seq=-1, client=client, owner=owner, digest=digest,
                      submitted_at=time.time(), frames_in=len(clip))
            accepted = self.book.add(job, settings, clip, masks)
        except UnderstudyError as error:  # bad settings or clip, store unavailable
            return _rejected(job_id, error.code, str(error))
        except ProtocolError as error:
            return _rejected(job_id, error.code, error.message)
        log.info("Accepted job %s from %s (%d frames, %d regions, queue position %s).", job_id,
                 printable(client.encode("latin-1")), len(clip), regions,
                 accepted["queue_position"])
        return {"type": ReplyType.ACCEPTED, **accepted}


def _rejected(job_id: str, code: str, message: str) -> dict[str, Any]:
    return {"type": ReplyType.REJECTED, "job_id": job_id, "code": code, "message": message}
