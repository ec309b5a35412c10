"""Answers to requests: one method per request type, each returning its reply.

Runs in the main thread. Validation happens here, before the book is asked to keep
anything; the book decides what a caller may see. A `submit` or `plan` that needs a
memory plan is answered later: its answer is `deferred` to the planning thread
(backend/server/planning.py) and `complete` gives the reply once the plan is made.
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
from backend.server.frames import (
    check_mask_frames,
    check_pixel_budget,
    check_png_frames,
    check_reference_images,
)
from backend.server.planning import PlanDesk, PlanWork, ServerMemory, log_planning_bug
from backend.server.store import Job, StoreUnavailable
from backend.server.transport import Incoming, client_name, printable
from shared import protocol
from shared.errors import ErrorCode
from shared.protocol import ProtocolError, ReplyType, RequestType

if TYPE_CHECKING:
    from shared.settings import TransferSettings

log = logging.getLogger("understudy.server")

PLANNING_BUG = "The server failed planning this job's GPU memory; see the server log."
REQUEST_BUG = "The server failed on this request; see the server log."


@dataclass
class Answer:
    """The reply to one request, and what it changed for others: a queued job it
    cancelled (whose client is told, and the queue behind it moved). `deferred`: no
    reply now; the request waits on the planning desk for its plan."""

    reply: dict[str, Any]
    payload: list[bytes] = field(default_factory=list)
    cancelled: Job | None = None
    deferred: bool = False


class Requests:
    """Turns one Incoming message into exactly one Answer (never raises)."""

    def __init__(self, book: JobBook, engine: TransferEngine, limits: dict[str, int],
                 heartbeat_s: float, secure: Callable[[], bool],
                 dropped: Callable[[], int], memory: ServerMemory | None = None,
                 desk: PlanDesk | None = None) -> None:
        self.book = book
        self.engine = engine
        self.memory = memory  # `--memory auto`: plans jobs before they are queued
        self.desk = desk or PlanDesk(limits["max_queue"])  # where plans wait for the thread
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
            answer = self._dispatch(message, req, header, payload)
        except ProtocolError as error:
            answer = Answer(protocol.error_header(error.code, error.message))
        except StoreUnavailable as error:
            answer = Answer(protocol.error_header(error.code, str(error)))
        except Exception:  # a server bug must not take the other clients down
            log.error("Request from %s failed:\n%s", printable(message.routing_id),
                      traceback.format_exc())
            answer = Answer(protocol.error_header(
                ErrorCode.INTERNAL, REQUEST_BUG))
        if req is not None:
            answer.reply["req"] = req
        return answer

    def complete(self, work: PlanWork) -> Answer:
        """The reply to a request whose plan the planning thread has made (or failed to
        make); like `answer`, never raises."""
        try:
            if isinstance(work.failure, UnderstudyError):  # too big, a bad clip: its sentence
                reply = work.refuse(work.failure.code, str(work.failure))
            elif work.failure is not None:
                log_planning_bug(work.failure)
                reply = work.refuse(ErrorCode.INTERNAL, PLANNING_BUG)
            else:
                reply = work.finish(work.outcome)
        except Exception:  # a server bug must not take the other clients down
            log.error("Finishing a planned request from %s failed:\n%s",
                      printable(work.routing_id), traceback.format_exc())
            reply = protocol.error_header(
                ErrorCode.INTERNAL, REQUEST_BUG)
        if work.req is not None:
            reply["req"] = work.req
        return Answer(reply)

    def _dispatch(self, message: Incoming, req: int | None, header: dict[str, Any],
                  payload: list[bytes]) -> Answer:
        kind = header["type"]
        client, owner = client_name(message.routing_id), message.owner
        if kind == RequestType.HEARTBEAT:
            return Answer({"type": ReplyType.HEARTBEAT, "queue_length": self.book.queue_length(),
                           "time": time.time()})
        if kind == RequestType.HELLO:
            return Answer(self._welcome())
        if kind == RequestType.SUBMIT:
            reply = self._submit(message, req, header, payload)
            return Answer({}, deferred=True) if reply is None else Answer(reply)
        if kind == RequestType.STATUS:
            if header.get("job_id") is None:
                return Answer({"type": ReplyType.STATUS, "jobs": self.book.jobs_of(client, owner)})
            job_id = protocol.check_job_id(header.get("job_id"))
            return Answer({"type": ReplyType.STATUS, "job": self.book.view(job_id, owner)})
        if kind == RequestType.CANCEL:
            info, cancelled = self.book.cancel(protocol.check_job_id(header.get("job_id")), owner)
            return Answer({"type": ReplyType.STATUS, "job": info}, cancelled=cancelled)
        if kind == RequestType.PLAN:
            reply = self._plan(message, req, header)
            return Answer({}, deferred=True) if reply is None else Answer(reply)
        if kind == RequestType.FETCH:
            job_id = protocol.check_job_id(header.get("job_id"))
            take = header.get("take")
            if take is None:
                sidecar, frames = self.book.result(job_id, owner)
                return Answer({"type": ReplyType.RESULT, "job_id": job_id, "sidecar": sidecar,
                               "frame_count": len(frames)}, frames)
            if type(take) is not int or take < 1:
                raise ProtocolError(f"The fetch's 'take' is {take!r}; send a take number from "
                                    "1, or none for the job's result.", ErrorCode.BAD_REQUEST)
            sidecar, frames = self.book.take_result(job_id, take, owner)
            return Answer({"type": ReplyType.RESULT, "job_id": job_id, "take": take,
                           "sidecar": sidecar, "frame_count": len(frames)}, frames)
        raise ProtocolError(f"Unknown message type {kind!r}; this server understands "
                            f"{', '.join(sorted(protocol.REQUEST_TYPES))}.",
                            ErrorCode.UNKNOWN_TYPE)

    def _welcome(self) -> dict[str, Any]:
        from backend import __version__

        described = self.engine.describe()
        problem = self.book.health()
        return {"type": ReplyType.WELCOME, "server": "understudy", "version": __version__,
                "model": described.get("model"), "device": described.get("device"),
                "engine": described, "limits": self.limits, "heartbeat_s": self.heartbeat_s,
                "queue_length": self.book.queue_length(), "secure": self.secure(),
                "degraded": problem, "dropped_messages": self.dropped(),
                "plans_waiting": self.desk.waiting(), "max_references": self._max_references(),
                **self._gpu()}

    def _max_references(self) -> int:
        """The reference images a job may carry: the backbone's (0: it takes none)."""
        return int((self.engine.describe().get("backbone") or {}).get("max_references") or 0)

    def _gpu(self) -> dict[str, Any]:
        """The hello's GPU fields: `gpu` (name, total_bytes, free_bytes, budget_bytes,
        assumed; null without one) and the savers `--memory auto` may turn on."""
        from shared.settings import MEMORY_SAVERS

        gpu = self.memory.gpu() if self.memory is not None else None
        return {"gpu": gpu, "memory_savers": list(MEMORY_SAVERS) if gpu is not None else []}

    def _planned(self, settings: TransferSettings) -> bool:
        """Whether `--memory auto` plans this job: a planner, a GPU to fit, memory "auto"."""
        return (self.memory is not None and settings.memory == "auto"
                and self.memory.gpu() is not None)

    def _defer(self, message: Incoming, req: int | None, make: Callable[[], Any],
               finish: Callable[[Any], dict[str, Any]],
               refuse: Callable[[str, str], dict[str, Any]], replaceable: bool = False) -> None:
        """Hand a request's plan to the planning thread; queue_full when too many wait.
        `replaceable`: a plan request, which the same client's next one replaces."""
        if not self.desk.put(PlanWork(message.routing_id, req, make, finish, refuse,
                                      replaceable)):
            raise ProtocolError(
                f"The server is already planning {self.desk.capacity} jobs; send this again "
                "when one of them is answered.", ErrorCode.QUEUE_FULL)

    def _plan(self, message: Incoming, req: int | None, header: dict[str, Any]
              ) -> dict[str, Any] | None:
        """The memory plan of a job described, not sent (docs/protocol.md §4, `plan`);
        None when the reply waits for the planning thread."""
        from shared.settings import TransferSettings

        settings = protocol.require(header, "settings", dict)
        frame_count = protocol.require(header, "frame_count", int)
        frame_size = protocol.require(header, "frame_size", list)
        if (isinstance(frame_count, bool) or not 1 <= frame_count <= self.limits["max_frames"]
                or len(frame_size) != 2 or not all(
                    isinstance(side, int) and not isinstance(side, bool)
                    and 1 <= side <= self.limits["max_side"] for side in frame_size)):
            raise ProtocolError(
                f"A plan request needs frame_count (1 to {self.limits['max_frames']}) and "
                f"frame_size [width, height] (1 to {self.limits['max_side']} px).",
                ErrorCode.BAD_REQUEST)
        size = (frame_size[0], frame_size[1])
        regions = protocol.check_regions(header.get("regions"))  # masks the job would carry
        takes = protocol.check_takes(header, self.limits).count  # sampled as the plan allows
        try:
            parsed = TransferSettings.from_dict({"frame_limit": self.limits["max_frames"], **settings})
            self.engine.check_settings(parsed, frame_count, size)
        except TypeError as error:
            raise ProtocolError(f"The settings are not valid ({error}).",
                                ErrorCode.BAD_SETTINGS) from None
        except UnderstudyError as error:
            raise ProtocolError(str(error), error.code) from None
        if not self._planned(parsed):
            return {"type": ReplyType.PLAN, **self._gpu(), "fits": True, "savers": [],
                    "predicted_peak_bytes": None, "message": None, "batch": takes}
        self._defer(message, req, lambda: self._plan_reply(parsed, frame_count, size, regions,
                                                           takes),
                    finish=lambda reply: reply,
                    refuse=lambda code, sentence: protocol.error_header(code, sentence),
                    replaceable=True)
        return None

    def _plan_reply(self, settings: TransferSettings, frame_count: int,
                    size: tuple[int, int], regions: int, takes: int = 1) -> dict[str, Any]:
        """The `plan` reply of a planned job (planning thread): the plan without savers,
        and what `--memory auto` turns on, from the same cache a submit's decision uses;
        for several takes, of the batch they sample in (`batch`)."""
        from backend.errors import TooBigForGpuError
        from backend.memory.planner import lowest_combination
        from backend.video import frames_to_edit

        batch = self.memory.largest_batch(settings, frame_count, size, takes, regions)
        reply: dict[str, Any] = {"type": ReplyType.PLAN, **self._gpu(), "fits": True,
                                 "savers": [], "predicted_peak_bytes": None, "message": None,
                                 "batch": batch}
        plan = self.memory.plan(settings, frames_to_edit(settings, frame_count), size, regions,
                                batch)
        reply["peak_bytes"] = plan.peak_bytes
        if self.memory.gang > 1:  # ServerMemory.gang says why one GPU's peak bounds a rank's
            reply["gang"] = {"size": self.memory.gang, "peak": "per rank, at most"}
        try:
            decision = self.memory.decide(settings, frame_count, size, regions, batch)  # cached above
            reply.update(savers=list(decision.savers),
                         predicted_peak_bytes=decision.predicted_peak_bytes)
        except TooBigForGpuError as refusal:
            lowest = lowest_combination(plan)  # the lowest it reaches, and with which savers
            reply.update(fits=False, message=str(refusal), savers=list(lowest["savers"]),
                         predicted_peak_bytes=lowest["peak_bytes"])
        return reply

    def _with_model_size(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings with the model's width and height where they are left to it, so the
        result's size bound (protocol.check_reply_size) is checked for them too."""
        defaults = (self.engine.describe().get("backbone") or {}).get("defaults") or {}
        sizes = {name: defaults[name] for name in ("width", "height") if name in defaults}
        return {**sizes, **{name: value for name, value in settings.items() if value is not None}}

    def _submit(self, message: Incoming, req: int | None, header: dict[str, Any],
                payload: list[bytes]) -> dict[str, Any] | None:
        """Check a submit and queue it: now, or (None) once its memory plan says it fits."""
        from shared.settings import TransferSettings

        client, owner = client_name(message.routing_id), message.owner
        job_id = protocol.check_job_id(header.get("job_id"))
        try:
            settings = protocol.require(header, "settings", dict)
            regions = protocol.check_regions(header.get("regions"))
            takes = protocol.check_takes(header, self.limits)
            count = protocol.check_references(header.get("references"), self._max_references())
            inputs, references = protocol.split_references(payload, count)
            clip, masks = protocol.split_payload(inputs, regions)
            header_bytes = len(protocol.json_text(header))
            protocol.check_submit_limits(self._with_model_size(settings), clip, header_bytes,
                                         self.limits, masks, references)
            digest = protocol.request_digest(settings, payload, regions, takes, count)
            repeated = self.book.existing(job_id, client, owner, digest)
            if repeated is not None:
                return {"type": ReplyType.ACCEPTED, **repeated}
            # Unless the client says otherwise, a job may edit every frame this server takes.
            settings = {"frame_limit": self.limits["max_frames"], **settings}
            settings, stored_takes = takes_settings(settings, takes)
            try:
                parsed = TransferSettings.from_dict(settings)
                for prompt in takes.prompts or ():  # each prompt refused in its own sentence
                    TransferSettings.from_dict({**settings, "prompt": prompt})
            except TypeError as error:  # from_dict passes values to the dataclass
                raise ProtocolError(f"The settings are not valid ({error}).",
                                    ErrorCode.BAD_SETTINGS) from None
            size = check_png_frames(clip, self.limits["max_side"])
            frames_used = len(clip) if parsed.num_frames is None else min(parsed.num_frames,
                                                                          len(clip))
            check_pixel_budget(frames_used, size, self.limits["max_job_pixels"],
                               regions * len(clip), check_reference_images(references))
            check_mask_frames(masks, len(clip), size)
            self.engine.check_settings(parsed, len(clip), size)
            job = Job(job_id=job_id, seq=-1, client=client, owner=owner, digest=digest,
                      submitted_at=time.time(), frames_in=len(clip),
                      takes=1 if stored_takes is None else takes.count)

            def queue_job(_decision: Any = None) -> dict[str, Any]:
                return self._queue(job, settings, clip, masks, regions, stored_takes,
                                   references)

            if not self._planned(parsed):
                return queue_job()
            # too_big_for_gpu (the plan's sentence) or queued, once the plan is made; the
            # plan of several takes covers the batch they sample in
            self._defer(message, req, lambda: self.memory.decide_takes(
                parsed, len(clip), size, job.takes, regions),
                        finish=queue_job,
                        refuse=lambda code, sentence: _rejected(job_id, code, sentence))
            return None
        except UnderstudyError as error:  # bad settings or clip, store unavailable
            return _rejected(job_id, error.code, str(error))
        except ProtocolError as error:
            return _rejected(job_id, error.code, error.message)

    def _queue(self, job: Job, settings: dict[str, Any], clip: list[bytes],
               masks: list[list[bytes]], regions: int,
               takes: dict[str, Any] | None = None,
               references: list[bytes] | None = None) -> dict[str, Any]:
        """Store and queue a checked job (its plan, if any, says it fits): the reply."""
        try:
            # The same request may have been accepted while this one waited for its plan.
            repeated = self.book.existing(job.job_id, job.client, job.owner, job.digest)
            if repeated is not None:
                return {"type": ReplyType.ACCEPTED, **repeated}
            accepted = self.book.add(job, settings, clip, masks, takes, references)
        except UnderstudyError as error:  # the store unavailable
            return _rejected(job.job_id, error.code, str(error))
        except ProtocolError as error:  # queue full, the id taken meanwhile
            return _rejected(job.job_id, error.code, error.message)
        log.info("Accepted job %s from %s (%d frames, %d regions, %d takes, queue position %s).",
                 job.job_id, printable(job.client.encode("latin-1")), len(clip), regions,
                 job.takes, accepted["queue_position"])
        return {"type": ReplyType.ACCEPTED, **accepted}

def _rejected(job_id: str, code: str, message: str) -> dict[str, Any]:
    return {"type": ReplyType.REJECTED, "job_id": job_id, "code": code, "message": message}


def takes_settings(settings: dict[str, Any], takes: protocol.TakesRequest
                   ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The settings a job of these takes stores, and its request.json `takes` record
    (None: a one-take job, stored as ever). One take of one prompt is that prompt's
    edit. Several takes get their seed now when the request has none, so a re-run after
    a restart makes the same takes (take k's seed is seed + (k − 1) % seeds)."""
    import random

    if takes.count == 1:
        return ({**settings, "prompt": takes.prompts[0]} if takes.prompts else settings), None
    if settings.get("seed") is None:
        settings = {**settings, "seed": random.SystemRandom().randrange(2**31)}
    return settings, {"seeds": takes.seeds,
                      "prompts": None if takes.prompts is None else list(takes.prompts)}
