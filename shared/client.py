"""Client for an Understudy job server (docs/protocol.md).

    client = Client("tcp://127.0.0.1:5555", **load_client_keys("keys"))  # keys optional
    client.hello()                                  # version, model, device, limits
    client.submit("job-1", {"prompt": "a bear"}, png_frames)
    client.submit("job-2", {"prompt": "a bear"}, png_frames, masks=[subject_pngs])  # a region
    client.submit("job-3", {"prompt": "a bear", "seed": 4}, png_frames, takes=2,
                  prompts=["a bear", "a wolf"])   # four takes, each fetched as it is ready
    result = client.wait("job-1", on_event=print)   # or poll() from a UI timer
    result.frames, result.sidecar                   # PNG bytes, JSON metadata
    client.fetch("job-3", take=2)                   # take 2's frames and its own sidecar
    client.close()

Every failure is a ClientError (an UnderstudyError, shared/errors.py) whose str() is
one sentence saying what to do. One
Client belongs to one thread. Standard library and pyzmq only: this module rides
inside the Blender extension.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from . import protocol  # relative: the extension vendors this package under its own name
from .errors import ErrorCode, UnderstudyError
from .protocol import EventType, JobState, ProtocolError, ReplyType, RequestType

# --------------------------------------------------------------------------- errors


class ClientError(UnderstudyError):
    """A job-server failure; str() is one sentence saying what to do; `code` is the
    server's error code (docs/protocol.md §10) or a client-side one, all in ErrorCode."""

    code = ErrorCode.CLIENT_ERROR


class ServerUnavailable(ClientError):
    """No answer from the server within the timeout (not running, wrong address, gone)."""

    code = ErrorCode.SERVER_UNAVAILABLE


class PlanPending(ServerUnavailable):
    """The server answers, but the memory plan a submit or plan request waits for did not
    come within the wait; the server keeps the plan it is making, so asking again later
    is quick."""


class ProtocolMismatch(ClientError):
    """The server speaks another protocol version."""

    code = ErrorCode.PROTOCOL_VERSION


class AuthenticationFailed(ClientError):
    """The CURVE handshake failed: unknown client key, missing keys, or a key mismatch."""

    code = ErrorCode.AUTHENTICATION_FAILED


class KeyFileError(ClientError):
    """A key file is missing or is not a pyzmq certificate."""

    code = ErrorCode.BAD_KEY_FILE


class JobRejected(ClientError):
    """The server refused a submit (limits, bad settings, bad frames, queue full, …)."""

    code = ErrorCode.REJECTED


class UnknownJob(ClientError):
    """The server has no such job (never submitted, pruned, or another key's)."""

    code = ErrorCode.UNKNOWN_JOB


class JobNotReady(ClientError):
    """fetch() of a job that has not finished."""

    code = ErrorCode.NOT_READY


class JobFailed(ClientError):
    """The job ended in an error; the message is the server's sentence."""

    code = ErrorCode.JOB_FAILED


class JobCancelledError(ClientError):
    """The job was cancelled."""

    code = ErrorCode.JOB_CANCELLED


class WaitTimeout(ClientError):
    """wait() gave up; the job still runs on the server."""

    code = ErrorCode.WAIT_TIMEOUT


ERROR_CLASSES: dict[str, type[ClientError]] = {
    ErrorCode.PROTOCOL_VERSION: ProtocolMismatch,
    ErrorCode.UNKNOWN_JOB: UnknownJob,
    ErrorCode.NOT_READY: JobNotReady,
    ErrorCode.JOB_FAILED: JobFailed,
    ErrorCode.JOB_CANCELLED: JobCancelledError,
}


def error_from_reply(header: dict[str, Any]) -> ClientError:
    """An `error` or `rejected` header → the matching ClientError subclass."""
    code = str(header.get("code", ErrorCode.ERROR))
    message = str(header.get("message", "The server reported an error without a message."))
    if header.get("type") == ReplyType.REJECTED:
        return JobRejected(message, code)
    return ERROR_CLASSES.get(code, ClientError)(message, code)


# --------------------------------------------------------------------------- keys


def load_client_keys(keys_dir: str | os.PathLike) -> dict[str, bytes]:
    """Client keyword arguments from a `python -m backend keys DIR` folder."""
    keys_dir = Path(keys_dir)
    return load_client_key_files(keys_dir / "server.key", keys_dir / "client.key_secret")


def load_client_key_files(server_public_key_file: str | os.PathLike,
                          client_secret_key_file: str | os.PathLike) -> dict[str, bytes]:
    """Client keyword arguments from the server's public key file (server.key) and
    this client's secret key file (client.key_secret)."""
    server_public, _ = _load_certificate(server_public_key_file, "the server's public key")
    client_public, client_secret = _load_certificate(client_secret_key_file,
                                                     "the client's secret key")
    if client_secret is None:
        raise KeyFileError(
            f"{client_secret_key_file} holds only a public key; give the client's secret key "
            "file (client.key_secret).")
    return {"server_public_key": server_public, "client_public_key": client_public,
            "client_secret_key": client_secret}


def _load_certificate(path: str | os.PathLike, what: str) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not Path(path).is_file():
        raise KeyFileError(f"There is no key file at {path} ({what}); create keys with "
                           "`python -m backend keys DIR` and copy the file here.")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"{path} is not a ZeroMQ key file ({what}): {error}.") from None


# --------------------------------------------------------------------------- client


@dataclass
class JobResult:
    """A finished job (or one take of it): the result frames as PNG bytes and the JSON
    sidecar. `take`: the take fetched (None: the job's result)."""

    job_id: str
    frames: list[bytes] = field(default_factory=list)
    sidecar: dict[str, Any] = field(default_factory=dict)
    take: int | None = None


EventCallback = Callable[[dict[str, Any]], None]
"""on_event(header): one `progress` event as the server sent it (job_id, phase, step,
total, attempt; take and takes while a take of several is made), or a `take_ready`
(job_id, take, takes, frame_count, sidecar). Layers that run an edit report progress as progress(phase, step,
total) instead (backend/results.py); backend/edit.py turns one into the other."""

SLICE_S = 0.05  # how often waits look at the auth monitor
SEND_RATE_BYTES_PER_S = 5e6  # extra reply time for big submits: transfer + server disk


class Client:
    """A connection to one Understudy server (a ZeroMQ DEALER socket).

    Requests (hello, submit, status, cancel, fetch) block up to `timeout_s` for their
    reply. A submit or plan may wait for the server's memory plan: it waits on while the
    server answers heartbeats, up to protocol.PLAN_WAIT_S more, and gives up after
    `timeout_s` of silence. Events for this client's jobs are kept until `poll()`
    returns them. ZeroMQ
    reconnects by itself; the client's id stays the same, so events keep coming after
    a reconnect or a server restart.
    """

    def __init__(self, address: str, *, server_public_key: bytes | None = None,
                 client_public_key: bytes | None = None, client_secret_key: bytes | None = None,
                 timeout_s: float = 10.0, client_id: str | None = None,
                 heartbeat_s: float = protocol.HEARTBEAT_INTERVAL_S) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s
        self.client_id = client_id or f"c-{uuid.uuid4().hex}"
        self.secure = server_public_key is not None
        self.server_info: dict[str, Any] | None = None
        self._events: deque[dict[str, Any]] = deque()
        self._next_req = 1
        self._last_sent = 0.0
        self._last_heard = time.monotonic()
        self._handshake_failure: str | None = None
        self._closed = False

        if self.secure and (client_public_key is None or client_secret_key is None):
            raise KeyFileError("A server key was given without this client's key pair; "
                               "load both with load_client_keys(DIR).")
        self._keys = (server_public_key, client_public_key, client_secret_key)
        self._socket, self._monitor = self._open_socket()

    def _open_socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        """A DEALER socket connected to the server under this client's id, and the PAIR
        socket that reads its handshake monitor."""
        context = zmq.Context.instance()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # no queueing while disconnected
        socket.setsockopt(zmq.ROUTING_ID, self.client_id.encode("ascii"))
        socket.setsockopt(zmq.HEARTBEAT_IVL, protocol.ZMTP_HEARTBEAT_IVL_MS)
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, protocol.ZMTP_HEARTBEAT_TIMEOUT_MS)
        if self.secure:
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = self._keys
        monitor_address = f"inproc://understudy-monitor-{uuid.uuid4().hex}"
        socket.monitor(monitor_address, zmq.EVENT_HANDSHAKE_SUCCEEDED
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                       | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        monitor = context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(monitor_address)
        try:
            socket.connect(self.address)
        except zmq.ZMQError as error:
            self._close_sockets(socket, monitor)
            raise ClientError(f"Cannot connect to {self.address!r} ({error}); give an address "
                              "like tcp://HOST:5555.") from None
        return socket, monitor

    def _reopen(self) -> None:
        """Drop the connection and make a new one under the same id (the ZeroMQ guide's
        Lazy Pirate). A request that went unanswered may sit on a connection the server
        will never read: a ROUTER ignores a connection whose id was still held by an
        older one (this client restarted before the server saw the old socket go), and
        keeps ignoring it after the old one is gone. A new connection is read."""
        self._close_sockets(self._socket, self._monitor)
        self._socket, self._monitor = self._open_socket()

    @staticmethod
    def _close_sockets(socket: zmq.Socket, monitor: zmq.Socket) -> None:
        try:
            socket.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(0)
        socket.close(0)

    # ----------------------------------------------------------------- public API

    def hello(self) -> dict[str, Any]:
        """Check the server: protocol version, model, device, limits (the welcome header)."""
        reply, _ = self._request({"type": RequestType.HELLO, "client": "understudy-client"})
        self.server_info = reply
        return reply

    @property
    def limits(self) -> dict[str, int]:
        """The server's limits (asks hello once)."""
        if self.server_info is None:
            self.hello()
        return {**protocol.DEFAULT_LIMITS, **self.server_info.get("limits", {})}

    @property
    def takes_regions(self) -> bool:
        """Whether the server reads a submit's regions (its welcome names max_regions);
        an older one would take the mask frames for more clip frames."""
        if self.server_info is None:
            self.hello()
        return "max_regions" in (self.server_info.get("limits") or {})

    @property
    def max_references(self) -> int:
        """How many reference images the server's model takes (its welcome's
        `max_references`; 0 for one that takes none, or a server older than them)."""
        if self.server_info is None:
            self.hello()
        return int(self.server_info.get("max_references") or 0)

    @property
    def makes_takes(self) -> bool:
        """Whether the server makes several takes of a job (its welcome names
        max_takes); an older one would ignore `takes` and `prompts` and make one."""
        if self.server_info is None:
            self.hello()
        return "max_takes" in (self.server_info.get("limits") or {})

    def submit(self, job_id: str, settings: dict[str, Any], frames: list[bytes],
               masks: list[list[bytes]] | None = None, takes: int = 1,
               prompts: list[str] | None = None,
               references: list[bytes] | None = None) -> dict[str, Any]:
        """Send a job (PNG-encoded frames, in order). Returns the accepted header
        (state, queue_position, duplicate); raises JobRejected or another ClientError.

        `masks`: the edit's regions, each a list of greyscale PNGs (white = subject), one
        per frame; the server edits inside them and keeps the rest of the picture.
        `takes`, `prompts`: `takes` seeds (settings' seed, seed + 1, …) of each prompt
        (None: the settings' prompt), from one inversion; each take's take_ready event
        says when fetch(job_id, take=k) has it (docs/protocol.md §4, Takes).
        `references`: PNGs of the new subject's look, for a server whose model takes
        them (`max_references`); refused here, before anything is sent, otherwise.
        Safe to repeat: the same job id with the same request is never run twice.
        """
        masks = [list(region) for region in masks or []]
        asked = protocol.TakesRequest(takes, None if prompts is None else tuple(prompts))
        references = list(references or [])
        try:
            protocol.check_job_id(job_id)
            if not isinstance(settings, dict):
                raise ProtocolError("Settings must be a dict of setting names.", "bad_settings")
            if not all(isinstance(f, bytes | bytearray | memoryview) for f in frames):
                raise ProtocolError("Frames must be PNG-encoded bytes.", "bad_frames")
            if not all(isinstance(f, bytes | bytearray | memoryview)
                       for region in masks for f in region):
                raise ProtocolError("Mask frames must be PNG-encoded bytes.", "bad_mask")
            if masks and not self.takes_regions:
                raise ProtocolError(f"The server at {self.address} does not take "
                                    "regions (it is older than this client); update it, or "
                                    "edit the whole frame without a mask.", "bad_mask")
            if asked.asked and not self.makes_takes:
                raise ProtocolError(f"The server at {self.address} makes one take a job (it "
                                    "is older than this client); update it, or ask for one "
                                    "take of one prompt.", ErrorCode.BAD_REQUEST)
            protocol.check_takes(asked.fields(), self.limits)
            if not all(isinstance(image, bytes | bytearray | memoryview) for image in references):
                raise ProtocolError("Reference images must be PNG-encoded bytes.",
                                    "bad_reference")
            if len(references) > self.max_references:
                raise ProtocolError(protocol.references_refused(len(references),
                                                                self.max_references),
                                    "bad_reference")
            protocol.check_submit_limits(settings, list(frames), protocol.MAX_HEADER_BYTES,
                                         self.limits, masks, references)
        except ProtocolError as error:
            raise JobRejected(error.message, error.code) from None
        payload = [*frames, *(frame for region in masks for frame in region), *references]
        header = {"type": RequestType.SUBMIT, "job_id": job_id, "settings": settings,
                  **asked.fields()}  # one take of the settings' prompt: no field, as before
        if masks:  # an older server reads no regions, and a job without them is as before
            header["regions"] = len(masks)
        if references:  # likewise references, after the clip's and the masks' frames
            header["references"] = len(references)
        extra_s = protocol.payload_size(payload) / SEND_RATE_BYTES_PER_S
        try:
            timeout_s = self.timeout_s + extra_s
            reply, _ = self._request(header, payload, timeout_s=timeout_s,
                                     plan_wait_s=timeout_s + protocol.PLAN_WAIT_S)
        except ProtocolError as error:  # settings that are not strict JSON (NaN, surrogates)
            raise JobRejected(error.message, error.code) from None
        return reply

    def plan(self, settings: dict[str, Any], frame_count: int, frame_size: tuple[int, int],
             wait_s: float | None = None, regions: int = 0, takes: int = 1) -> dict[str, Any]:
        """The server's memory plan of a job not sent (docs/protocol.md §4, `plan`): its
        GPU (`gpu`, null without one), whether the job fits (`fits`), the savers
        `--memory auto` would turn on, the predicted peak with them, and the refusal
        sentence (`message`) when it cannot fit.

        `regions`: how many regions (masks) the job would have; `takes`: how many takes
        in all (the reply's `batch` says how many of them sample together).
        `wait_s`: how long to wait in all for a plan the server is still making while it
        answers (then PlanPending); by default the client's timeout plus PLAN_WAIT_S. An
        interface that must not freeze gives a few seconds and asks again later."""
        if wait_s is None:
            wait_s = self.timeout_s + protocol.PLAN_WAIT_S
        header = {"type": RequestType.PLAN, "settings": settings, "frame_count": frame_count,
                  "frame_size": list(frame_size)}
        if regions:  # the masks the job would carry (an older server reads none)
            header["regions"] = regions
        if takes != 1:
            header["takes"] = takes
        reply, _ = self._request(header, plan_wait_s=wait_s)
        return reply

    def poll(self, timeout_s: float = 0.0) -> list[dict[str, Any]]:
        """Events that arrived (progress, result_ready, error, cancelled headers, each
        with "job_id" and "type"), waiting at most `timeout_s` for the first one.

        Sends a heartbeat when due. Raises ServerUnavailable when the server has been
        silent for 3 heartbeats and no events are waiting, AuthenticationFailed when
        the handshake is refused. Never blocks longer than timeout_s.
        """
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._heartbeat_if_due()
        while not self._events:
            self._check_handshake()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._receive(min(remaining, SLICE_S))
            self._heartbeat_if_due()
        while self._receive(0):  # everything else already here
            pass
        if not self._events:
            self._check_alive(self.heartbeat_s * protocol.HEARTBEAT_LIVENESS)
        events = list(self._events)
        self._events.clear()
        return events

    def status(self, job_id: str | None = None) -> dict[str, Any]:
        """One job's state (the job object), or {"jobs": [...]} for all of this client's."""
        header: dict[str, Any] = {"type": RequestType.STATUS}
        if job_id is not None:
            header["job_id"] = job_id
        reply, _ = self._request(header)
        return reply["job"] if job_id is not None else {"jobs": reply.get("jobs", [])}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the server to stop a job; returns the job object (a running job stops
        at its next step and then reports state "cancelled")."""
        reply, _ = self._request({"type": RequestType.CANCEL, "job_id": job_id})
        return reply["job"]

    def fetch(self, job_id: str, take: int | None = None) -> JobResult:
        """A finished job's result; JobNotReady / JobFailed / JobCancelledError otherwise.
        `take` (from 1): that take's frames and its own sidecar, as soon as it is made
        (its take_ready event), also while the job runs or after it was cancelled; a job
        of several takes' result (no `take`) is take 1 with the sidecar listing them all."""
        extra_s = 60.0  # results can be large; the server sends them straight away
        header: dict[str, Any] = {"type": RequestType.FETCH, "job_id": job_id}
        if take is not None:
            header["take"] = take
        reply, payload = self._request(header, timeout_s=self.timeout_s + extra_s)
        return JobResult(job_id=job_id, frames=[bytes(f) for f in payload],
                         sidecar=reply.get("sidecar") or {}, take=take)

    def wait(self, job_id: str, on_event: EventCallback | None = None,
             timeout_s: float | None = None) -> JobResult:
        """Block until the job finishes and return its result.

        on_event(event) is called with each progress and take_ready event. Also asks for the job's
        status every few heartbeats, so a missed event (reconnect, server restart)
        cannot hang it. Raises JobFailed, JobCancelledError, WaitTimeout, or
        ServerUnavailable once the server has been silent for the client's timeout.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_status = time.monotonic()
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(f"Job {job_id} did not finish within {timeout_s:.0f} s; it "
                                  "is still on the server, fetch it later by its id.")
            try:
                events = self.poll(self.heartbeat_s)
            except ServerUnavailable:
                self._check_alive(self.timeout_s)
                events = []
            for event in events:
                if event.get("job_id") != job_id:
                    continue
                if (event["type"] in (EventType.PROGRESS, EventType.TAKE_READY)
                        and on_event is not None):
                    on_event(event)
                elif event["type"] == EventType.RESULT_READY:
                    return self.fetch(job_id)
                elif event["type"] in (EventType.ERROR, EventType.CANCELLED):
                    raise self._finished_error(job_id, event)
            if time.monotonic() - last_status >= 2 * self.heartbeat_s:
                last_status = time.monotonic()
                try:
                    job = self.status(job_id)
                except ServerUnavailable:
                    self._check_alive(self.timeout_s)
                    continue
                if job["state"] == JobState.DONE:
                    return self.fetch(job_id)
                if job["state"] in protocol.FINISHED_STATES:
                    raise self._finished_error(job_id, job)

    def close(self) -> None:
        """Close the sockets (unsent messages are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._close_sockets(self._socket, self._monitor)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- internals

    def _request(self, header: dict[str, Any], payload: list[bytes] | None = None,
                 timeout_s: float | None = None, plan_wait_s: float | None = None
                 ) -> tuple[dict[str, Any], list[bytes]]:
        """Send one request and wait for its reply; events meanwhile are kept.

        `plan_wait_s`: the reply may wait for the server's memory plan (submit, plan).
        Then heartbeats go out while waiting, and the wait goes on up to plan_wait_s in
        all as long as the server answers something within `timeout_s`."""
        if self._closed:
            raise ClientError("This client is closed; make a new one.")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        sent_at = time.monotonic()
        self._send({**header, "req": (req := self._take_req())}, payload, sent_at + timeout_s)
        planned = plan_wait_s is not None
        latest = sent_at + (plan_wait_s if planned else timeout_s)
        while True:
            self._check_handshake()
            now = time.monotonic()
            silent_s = now - max(sent_at, self._last_heard)
            if now >= latest or silent_s >= timeout_s:
                self._reopen()  # the next request goes over a connection the server reads
                if planned and self._last_heard > sent_at and silent_s < timeout_s:
                    raise PlanPending(  # alive, but the plan did not come
                        f"The server at {self.address} answered other requests but not this "
                        f"{header['type']} within {latest - sent_at:.0f} s (it is still making "
                        "the memory plan, which it keeps); send it again in a moment (a "
                        "submit with the same job id is never run twice).")
                raise ServerUnavailable(
                    f"The server at {self.address} did not answer within {timeout_s:.0f} s; "
                    "check that `python -m backend serve` is running there.")
            if planned:
                self._heartbeat_if_due()
            remaining = min(latest - now, timeout_s - silent_s)
            reply = self._receive(min(remaining, SLICE_S), wanted_req=req)
            if isinstance(reply, tuple):
                reply_header, reply_payload = reply
                if reply_header["type"] in (ReplyType.ERROR, ReplyType.REJECTED):
                    raise error_from_reply(reply_header)
                return reply_header, reply_payload

    def _take_req(self) -> int:
        """The next request number (replies carry it back)."""
        req = self._next_req
        self._next_req += 1
        return req

    def _send(self, header: dict[str, Any], payload: list[bytes] | None, deadline: float) -> None:
        """Send once the connection is up (IMMEDIATE: nothing queues while it is down)."""
        frames = protocol.encode(header, payload)
        if len(frames[0]) > protocol.MAX_HEADER_BYTES:
            raise ClientError(
                f"The request's header is {len(frames[0])} bytes; the server reads at most "
                f"{protocol.MAX_HEADER_BYTES}, so shorten the prompts.", ErrorCode.BAD_HEADER)
        while True:
            self._check_handshake()
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self._last_sent = time.monotonic()
                return
            except zmq.Again:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailable(
                    f"Could not reach a server at {self.address}; check that `python -m "
                    "backend serve` is running there and the address and port are right.")
            self._socket.poll(int(min(remaining, SLICE_S) * 1000), zmq.POLLOUT)

    def _receive(self, timeout_s: float, wanted_req: int | None = None):
        """Take one message if one arrives within timeout_s. Events are queued.

        Returns (header, payload) for the reply to `wanted_req`, True for anything
        else received, False when nothing came.
        """
        if not self._socket.poll(int(timeout_s * 1000), zmq.POLLIN):
            return False
        frames = self._socket.recv_multipart()
        self._last_heard = time.monotonic()
        try:
            header, payload = protocol.decode(frames)
        except ProtocolError as error:
            if error.code == "protocol_version":
                raise self._version_error(frames[0]) from None
            return True  # a broken message from the server: ignore it, keep serving
        if "req" in header:
            if header["req"] == wanted_req:
                return header, payload
            return True  # a late reply (heartbeat, timed-out request)
        if header["type"] == ReplyType.ERROR and "job_id" not in header and wanted_req:
            return header, payload  # an error the server could not tie to a request: ours
        if header["type"] in protocol.EVENT_TYPES and "job_id" in header:
            self._events.append(header)
        return True

    def _version_error(self, header_frame: bytes) -> ProtocolMismatch:
        try:
            theirs = protocol.decode_header(header_frame).get("v")
        except ProtocolError:
            theirs = "unknown"
        return ProtocolMismatch(
            f"The server at {self.address} speaks Understudy protocol version {theirs} and "
            f"this client version {protocol.PROTOCOL_VERSION}; install matching versions.")

    def _heartbeat_if_due(self) -> None:
        if time.monotonic() - self._last_sent < self.heartbeat_s:
            return
        try:
            self._socket.send_multipart(protocol.encode(
                {"type": RequestType.HEARTBEAT, "req": self._take_req()}), flags=zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            pass  # not connected: try again next time; the liveness check reports it

    def _check_alive(self, silence_s: float) -> None:
        silent = time.monotonic() - self._last_heard
        if silent > silence_s:
            raise ServerUnavailable(
                f"The server at {self.address} has not answered for {silent:.0f} s; check that "
                "it is running (jobs it accepted are kept and can be fetched later).")

    def _check_handshake(self) -> None:
        """Read the socket monitor; raise AuthenticationFailed on a refused handshake."""
        from zmq.utils.monitor import parse_monitor_message

        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failure = None
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._handshake_failure = (
                    f"The server at {self.address} does not accept this client's key; add the "
                    "client's public key file to the server's authorized_clients folder.")
            else:
                self._handshake_failure = (
                    f"The secure handshake with {self.address} failed; the server uses CURVE "
                    "keys and this client has none or the wrong server key — load them with "
                    "--keys / the key files."
                    if not self.secure else
                    f"The secure handshake with {self.address} failed; the server does not use "
                    "these keys (or no keys at all) — check the server public key file.")
        if self._handshake_failure is not None:
            raise AuthenticationFailed(self._handshake_failure)

    @staticmethod
    def _finished_error(job_id: str, info: dict[str, Any]) -> ClientError:
        """The error for a job event/object in state failed or cancelled."""
        if info.get("type") == EventType.CANCELLED or info.get("state") == JobState.CANCELLED:
            return JobCancelledError(f"Job {job_id} was cancelled.")
        error = info.get("error") if "error" in info else info
        error = error if isinstance(error, dict) else {}
        return JobFailed(str(error.get("message") or f"Job {job_id} failed on the server."),
                         str(error.get("code") or ErrorCode.JOB_FAILED))
