"""The job server: one warm model, a FIFO queue, one GPU worker, many clients.

    python -m backend serve --model tiny --bind tcp://127.0.0.1:5555

The wire protocol, job states and store guarantees are in docs/protocol.md. Two
threads: the main thread owns the ROUTER socket (every message in and out), the
worker thread runs one job at a time on the engine and tells the main thread about
progress over an inproc socket. Job records live in memory under one lock and on
disk in the JobStore, which is written before anything is acknowledged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import signal
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from backend.errors import JobCancelled, UnderstudyError
from shared import protocol
from shared.protocol import ProtocolError

log = logging.getLogger("understudy.server")

WORKER_EVENTS = "inproc://understudy-worker-events"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "understudy" / "server"


class ServerConfigError(UnderstudyError):
    """The server cannot start with these options."""

    code = "server_config"


@dataclass
class ServerConfig:
    """Everything `serve` can set."""

    bind: str = protocol.DEFAULT_ADDRESS
    state_dir: Path = DEFAULT_STATE_DIR
    keys_dir: Path | None = None
    insecure: bool = False
    limits: dict[str, int] = field(default_factory=lambda: dict(protocol.DEFAULT_LIMITS))
    keep_hours: float = 72.0
    keep_jobs: int = 200
    heartbeat_s: float = protocol.HEARTBEAT_INTERVAL_S
    test_step_delay_s: float = 0.0  # testing only: sleep per progress step (see cli help)


# --------------------------------------------------------------------------- addresses


def is_loopback(address: str) -> bool:
    """True for addresses no other machine can reach: 127.x, ::1, localhost, ipc, inproc."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = urlsplit(f"//{rest}").hostname or ""
    return host == "localhost" or host == "::1" or host.startswith("127.")


def check_bind_allowed(address: str, keys_dir: Path | None, insecure: bool) -> None:
    """Refuse an unencrypted server on a network address unless asked for explicitly."""
    if keys_dir is None and not insecure and not is_loopback(address):
        raise ServerConfigError(
            f"Refusing to serve {address} without encryption; create keys with `python -m "
            "backend keys DIR` and pass --keys DIR, or bind 127.0.0.1, or add --insecure.")


# --------------------------------------------------------------------------- job store


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def fsync_dir(path: Path) -> None:
    """Make renames and new files in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, indent=1).encode("utf-8")


@dataclass
class Job:
    """One job's record. Persistent fields go to status.json; the rest is live."""

    job_id: str
    seq: int
    client: str
    owner: str | None
    digest: str
    submitted_at: float
    state: str = protocol.QUEUED
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: dict[str, str] | None = None
    frame_count: int | None = None
    # live only
    phase: str | None = None
    step: int | None = None
    total: int | None = None

    PERSISTENT = ("state", "attempts", "started_at", "finished_at", "cancel_requested",
                  "error", "frame_count", "client")

    def status_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTENT}

    def public(self, queue_position: int | None) -> dict[str, Any]:
        """The job object of docs/protocol.md §8."""
        info = {"job_id": self.job_id, "state": self.state, "submitted_at": self.submitted_at,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "attempts": self.attempts, "cancel_requested": self.cancel_requested}
        if self.state == protocol.QUEUED:
            info["queue_position"] = queue_position
        if self.state == protocol.RUNNING:
            info.update(phase=self.phase, step=self.step, total=self.total)
        if self.error is not None:
            info["error"] = self.error
        if self.frame_count is not None:
            info["frame_count"] = self.frame_count
        return info


class JobStore:
    """Jobs on disk: STATE_DIR/jobs/<job_id>/{request.json, input/, status.json, result/}.

    status.json is written last when a job is created, so a folder without it was never
    accepted; result files are written before status.json says "done".
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = Path(state_dir) / "jobs"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, job: Job, settings: dict[str, Any], frames: list[bytes]) -> None:
        """Store inputs, request, then status (queued): after this the job is accepted."""
        folder = self.folder(job.job_id)
        if folder.exists():  # leftovers of a submit that never got acknowledged
            shutil.rmtree(folder)
        (folder / "input").mkdir(parents=True)
        for index, frame in enumerate(frames):
            atomic_write(folder / "input" / f"{index:05d}.png", frame)
        fsync_dir(folder / "input")
        request = {"job_id": job.job_id, "seq": job.seq, "owner": job.owner,
                   "digest": job.digest, "submitted_at": job.submitted_at,
                   "frames_in": len(frames), "settings": settings}
        atomic_write(folder / "request.json", json_bytes(request))
        self.write_status(job)
        fsync_dir(self.root)

    def write_status(self, job: Job) -> None:
        folder = self.folder(job.job_id)
        atomic_write(folder / "status.json", json_bytes(job.status_record()))
        fsync_dir(folder)

    def read_request(self, job_id: str) -> dict[str, Any]:
        return json.loads((self.folder(job_id) / "request.json").read_text())

    def read_inputs(self, job_id: str) -> list[bytes]:
        return [path.read_bytes() for path in sorted((self.folder(job_id) / "input").glob("*.png"))]

    def write_result(self, job_id: str, frames: list[bytes], sidecar: dict[str, Any]) -> None:
        result = self.folder(job_id) / "result"
        if result.exists():
            shutil.rmtree(result)
        result.mkdir()
        for index, frame in enumerate(frames):
            atomic_write(result / f"{index:05d}.png", frame)
        atomic_write(result / "sidecar.json", json_bytes(sidecar))
        fsync_dir(result)

    def read_result(self, job_id: str) -> tuple[dict[str, Any], list[bytes]]:
        result = self.folder(job_id) / "result"
        sidecar = json.loads((result / "sidecar.json").read_text())
        return sidecar, [path.read_bytes() for path in sorted(result.glob("*.png"))]

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    def load_all(self) -> list[Job]:
        """Every accepted job, by submission order; half-written submits are deleted."""
        jobs = []
        for folder in self.root.iterdir():
            if not folder.is_dir():
                continue
            try:
                request = json.loads((folder / "request.json").read_text())
                status = json.loads((folder / "status.json").read_text())
            except (OSError, ValueError):
                log.warning("Deleting %s: a submit that was never acknowledged.", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            job = Job(job_id=request["job_id"], seq=request["seq"], client=status["client"],
                      owner=request["owner"], digest=request["digest"],
                      submitted_at=request["submitted_at"])
            for name in Job.PERSISTENT:
                setattr(job, name, status[name])
            jobs.append(job)
        return sorted(jobs, key=lambda job: job.seq)


# --------------------------------------------------------------------------- frames


def check_png_frames(frames: list[bytes], max_side: int) -> tuple[int, int]:
    """Check every payload frame is a PNG of one size within max_side; return (w, h).

    Reads headers and verifies checksums without decoding pixels, so a submit is
    answered quickly; the worker decodes.
    """
    from PIL import Image

    size = None
    for index, frame in enumerate(frames):
        if not protocol.is_png(frame):
            raise ProtocolError("bad_frames", f"Frame {index} is not a PNG; send PNG-encoded frames.")
        try:
            with Image.open(io.BytesIO(frame)) as image:
                image.verify()
                frame_size = image.size
        except Exception as error:  # Pillow raises many types for broken images
            raise ProtocolError(
                "bad_frames", f"Frame {index} is a damaged PNG ({type(error).__name__}); "
                "send it again.") from None
        if max(frame_size) > max_side:
            raise ProtocolError(
                "bad_frames", f"Frame {index} is {frame_size[0]}×{frame_size[1]}; the server "
                f"accepts at most {max_side} pixels a side, so scale the clip down.")
        if size is not None and frame_size != size:
            raise ProtocolError(
                "bad_frames", f"Frame {index} is {frame_size[0]}×{frame_size[1]} but frame 0 is "
                f"{size[0]}×{size[1]}; send frames of one size.")
        size = frame_size
    return size or (0, 0)


# --------------------------------------------------------------------------- server


class Server:
    """The ROUTER loop (main thread) plus the worker thread."""

    def __init__(self, config: ServerConfig, engine: Any) -> None:
        self.config = config
        self.engine = engine
        self.store = JobStore(config.state_dir)
        self.lock = threading.Lock()
        self.jobs: dict[str, Job] = {}
        self.pending: deque[str] = deque()  # queued job ids, FIFO
        self.running: str | None = None
        self.work_ready = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self.clients: dict[str, float] = {}  # client id → last heard (monotonic)
        self.next_seq = 0
        self.context = zmq.Context.instance()
        self.authenticator = None
        self.router: zmq.Socket | None = None
        self.address = config.bind

    # ----------------------------------------------------------------- start-up

    def recover(self) -> None:
        """Load the store: re-queue queued jobs, re-run an interrupted job once, prune."""
        interrupted, queued = [], []
        for job in self.store.load_all():
            self.jobs[job.job_id] = job
            self.next_seq = max(self.next_seq, job.seq + 1)
            if job.state == protocol.RUNNING:
                if job.cancel_requested:
                    self._finish(job, protocol.JOB_CANCELLED)
                elif job.attempts >= 2:
                    self._finish(job, protocol.FAILED, {
                        "code": "interrupted",
                        "message": "The server stopped twice while running this job; check "
                                   "the server log and submit it again with a new id."})
                else:
                    job.state = protocol.QUEUED
                    self.store.write_status(job)
                    interrupted.append(job.job_id)
            elif job.state == protocol.QUEUED:
                queued.append(job.job_id)
        self.pending.extend(interrupted + queued)
        self._prune()
        if self.jobs:
            log.info("Recovered %d jobs: %d to re-run, %d queued.", len(self.jobs),
                     len(interrupted), len(queued))

    def bind(self) -> str:
        """Create the ROUTER socket (CURVE when keys are given) and bind it."""
        check_bind_allowed(self.config.bind, self.config.keys_dir, self.config.insecure)
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise; we drop them
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client takes its id back
        router.setsockopt(zmq.MAXMSGSIZE, self.config.limits["max_message_bytes"])
        router.setsockopt(zmq.HEARTBEAT_IVL, protocol.ZMTP_HEARTBEAT_IVL_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, protocol.ZMTP_HEARTBEAT_TIMEOUT_MS)
        if self.config.keys_dir is not None:
            self._enable_curve(router, Path(self.config.keys_dir))
        try:
            router.bind(self.config.bind)
        except zmq.ZMQError as error:
            router.close()
            raise ServerConfigError(f"Cannot bind {self.config.bind} ({error}); pick another "
                                    "address or port, or stop the server using it.") from None
        self.router = router
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.address

    def _enable_curve(self, router: zmq.Socket, keys_dir: Path) -> None:
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        secret_file = keys_dir / "server.key_secret"
        allowed = keys_dir / "authorized_clients"
        if not secret_file.is_file():
            raise ServerConfigError(f"There is no {secret_file}; create keys with `python -m "
                                    f"backend keys {keys_dir}`.")
        if not allowed.is_dir() or not zmq.auth.load_certificates(allowed):
            raise ServerConfigError(f"{allowed} holds no client public keys; copy each "
                                    "client's client.key there.")
        public, secret = zmq.auth.load_certificate(secret_file)
        self.authenticator = ThreadAuthenticator(self.context, log=log)
        self.authenticator.start()
        self.authenticator.configure_curve(domain="*", location=str(allowed))
        router.curve_server = True
        router.curve_publickey = public
        router.curve_secretkey = secret

    # ----------------------------------------------------------------- main loop

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM. The running job goes back to the queue on a clean stop."""
        events = self.context.socket(zmq.PULL)
        events.bind(WORKER_EVENTS)
        worker = threading.Thread(target=self._worker_loop, name="understudy-worker", daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), lambda *_: self.stopping.set())
        try:
            while not self.stopping.is_set():
                ready = dict(poller.poll(int(self.config.heartbeat_s * 1000)))
                if self.router in ready:
                    self._receive_all()
                if events in ready:
                    while events.poll(0):
                        self._forward_worker_event(json.loads(events.recv()))
                self._forget_silent_clients()
        finally:
            log.info("Stopping; a running job goes back to the queue.")
            with self.work_ready:
                self.work_ready.notify_all()
            worker.join(timeout=60)
            events.close(0)
            self.close()

    def close(self) -> None:
        if self.router is not None:
            self.router.close(0)
            self.router = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def _receive_all(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            routing_id = frames[0].bytes
            owner = _user_id(frames[1]) if len(frames) > 1 and self.authenticator else None
            self.clients[client_name(routing_id)] = time.monotonic()
            self._handle(routing_id, owner, [frame.bytes for frame in frames[1:]])

    def _handle(self, routing_id: bytes, owner: str | None, frames: list[bytes]) -> None:
        """Answer one request; every failure becomes an error reply, never a crash."""
        req = None
        try:
            header = protocol.decode_header(frames[0]) if frames else {}
            req = header.get("req") if isinstance(header.get("req"), int) else None
            header, payload = protocol.decode(frames)
            reply, reply_payload = self._dispatch(routing_id, owner, header, payload)
        except ProtocolError as error:
            reply, reply_payload = protocol.error_header(error.code, error.message), []
        except Exception:  # a server bug must not take the other clients down
            log.error("Request failed:\n%s", traceback.format_exc())
            reply, reply_payload = protocol.error_header(
                "internal", "The server failed on this request; see the server log."), []
        if req is not None:
            reply["req"] = req
        self._send(routing_id, reply, reply_payload)

    def _dispatch(self, routing_id: bytes, owner: str | None, header: dict[str, Any],
                  payload: list[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        kind = header["type"]
        client = client_name(routing_id)
        if kind == protocol.HEARTBEAT:
            return {"type": protocol.HEARTBEAT, "queue_length": self._queue_length(),
                    "time": time.time()}, []
        if kind == protocol.HELLO:
            return self._welcome(), []
        if kind == protocol.SUBMIT:
            return self._submit(client, owner, header, payload), []
        if kind == protocol.STATUS:
            if header.get("job_id") is None:
                return {"type": protocol.STATUS, "jobs": self._jobs_of(client, owner)}, []
            job = self._find(header, owner)
            return {"type": protocol.STATUS, "job": self._public(job)}, []
        if kind == protocol.CANCEL:
            return {"type": protocol.STATUS, "job": self._cancel(self._find(header, owner))}, []
        if kind == protocol.FETCH:
            return self._fetch(self._find(header, owner))
        raise ProtocolError("unknown_type", f"Unknown message type {kind!r}; this server "
                            f"understands {', '.join(sorted(protocol.REQUEST_TYPES))}.")

    def _welcome(self) -> dict[str, Any]:
        from backend import __version__

        described = self.engine.describe()
        return {"type": protocol.WELCOME, "server": "understudy", "version": __version__,
                "model": described.get("model"), "device": described.get("device"),
                "engine": described, "limits": self.config.limits,
                "heartbeat_s": self.config.heartbeat_s, "queue_length": self._queue_length(),
                "secure": self.authenticator is not None}

    # ----------------------------------------------------------------- requests

    def _submit(self, client: str, owner: str | None, header: dict[str, Any],
                payload: list[bytes]) -> dict[str, Any]:
        from shared.settings import TransferSettings

        job_id = protocol.check_job_id(header.get("job_id"))
        try:
            settings = protocol.require(header, "settings", dict)
            header_bytes = len(json.dumps(header))
            protocol.check_submit_limits(settings, payload, header_bytes, self.config.limits)
            digest = protocol.request_digest(settings, payload)
            with self.lock:
                existing = self.jobs.get(job_id)
                if existing is not None:
                    return self._resubmitted(existing, client, owner, digest)
            try:
                parsed = TransferSettings.from_dict(settings)
            except TypeError as error:  # from_dict passes values to the dataclass
                raise ProtocolError("bad_settings", f"The settings are not valid ({error}).") from None
            check_png_frames(payload, self.config.limits["max_side"])
            self.engine.check_settings(parsed, len(payload))
        except UnderstudyError as error:
            return self._rejected(job_id, error.code, str(error))
        except ProtocolError as error:
            return self._rejected(job_id, error.code, error.message)
        with self.lock:
            if self._queue_length() >= self.config.limits["max_queue"]:
                return self._rejected(job_id, "queue_full", (
                    f"The server already has {self.config.limits['max_queue']} jobs queued or "
                    "running; submit again when one finishes."))
            job = Job(job_id=job_id, seq=self.next_seq, client=client, owner=owner,
                      digest=digest, submitted_at=time.time())
            self.next_seq += 1
            self.store.create(job, settings, payload)
            self.jobs[job_id] = job
            self.pending.append(job_id)
            position = self._position(job)
            self.work_ready.notify()
        log.info("Accepted job %s from %s (%d frames, queue position %d).", job_id, client,
                 len(payload), position)
        return {"type": protocol.ACCEPTED, "job_id": job_id, "state": job.state,
                "queue_position": position, "duplicate": False}

    def _resubmitted(self, job: Job, client: str, owner: str | None, digest: str) -> dict[str, Any]:
        """The same job id again: the same request is acknowledged, never run twice."""
        if job.owner != owner or job.digest != digest:
            return self._rejected(job.job_id, "job_exists", (
                f"A different job with the id {job.job_id} exists; choose a new job id."))
        if job.client != client:
            job.client = client  # events now go to whoever resubmitted
            self.store.write_status(job)
        return {"type": protocol.ACCEPTED, "job_id": job.job_id, "state": job.state,
                "queue_position": self._position(job), "duplicate": True}

    @staticmethod
    def _rejected(job_id: str, code: str, message: str) -> dict[str, Any]:
        return {"type": protocol.REJECTED, "job_id": job_id, "code": code, "message": message}

    def _find(self, header: dict[str, Any], owner: str | None) -> Job:
        job_id = protocol.check_job_id(header.get("job_id"))
        job = self.jobs.get(job_id)
        if job is None or (job.owner is not None and job.owner != owner):
            raise ProtocolError("unknown_job", f"The server has no job {job_id}; it was never "
                                "accepted, or its result was pruned after the retention time.")
        return job

    def _cancel(self, job: Job) -> dict[str, Any]:
        with self.lock:
            if job.state == protocol.QUEUED:
                self.pending.remove(job.job_id)
                self._finish(job, protocol.JOB_CANCELLED)
                cancelled_now = True
            else:
                cancelled_now = False
                if job.state == protocol.RUNNING and not job.cancel_requested:
                    job.cancel_requested = True  # the worker's cancelled() sees it
                    self.store.write_status(job)
            info = self._public_locked(job)
        if cancelled_now:
            self._send_event(job, {"type": protocol.CANCELLED, "job_id": job.job_id})
            self._send_queue_positions()
        return info

    def _fetch(self, job: Job) -> tuple[dict[str, Any], list[bytes]]:
        if job.state == protocol.FAILED:
            error = job.error or {}
            raise ProtocolError("job_failed", error.get("message", f"Job {job.job_id} failed."))
        if job.state == protocol.JOB_CANCELLED:
            raise ProtocolError("job_cancelled", f"Job {job.job_id} was cancelled; there is "
                                "no result.")
        if job.state != protocol.DONE:
            raise ProtocolError("not_ready", f"Job {job.job_id} is {job.state}; fetch it "
                                "after its result_ready event.")
        sidecar, frames = self.store.read_result(job.job_id)
        return {"type": protocol.RESULT, "job_id": job.job_id, "sidecar": sidecar,
                "frame_count": len(frames)}, frames

    def _jobs_of(self, client: str, owner: str | None) -> list[dict[str, Any]]:
        with self.lock:
            mine = [job for job in self.jobs.values()
                    if job.client == client or (owner is not None and job.owner == owner)]
            return [self._public_locked(job) for job in sorted(mine, key=lambda j: j.seq)]

    # ----------------------------------------------------------------- queue helpers

    def _queue_length(self) -> int:
        return len(self.pending) + (1 if self.running else 0)

    def _position(self, job: Job) -> int | None:
        """Jobs that run before this one (the running one included); None unless queued."""
        if job.state != protocol.QUEUED or job.job_id not in self.pending:
            return None
        return self.pending.index(job.job_id) + (1 if self.running else 0)

    def _public(self, job: Job) -> dict[str, Any]:
        with self.lock:
            return self._public_locked(job)

    def _public_locked(self, job: Job) -> dict[str, Any]:
        return job.public(self._position(job))

    def _finish(self, job: Job, state: str, error: dict[str, str] | None = None,
                frame_count: int | None = None) -> None:
        """Record a final state on disk (caller holds the lock or is single-threaded)."""
        job.state, job.error, job.frame_count = state, error, frame_count
        job.finished_at = time.time()
        job.phase = job.step = job.total = None
        self.store.write_status(job)

    def _prune(self) -> None:
        """Delete finished jobs past the retention time, and the oldest beyond the count."""
        finished = sorted((job for job in self.jobs.values()
                           if job.state in protocol.FINISHED_STATES),
                          key=lambda job: job.finished_at or 0.0)
        too_old = time.time() - self.config.keep_hours * 3600
        excess = max(0, len(finished) - self.config.keep_jobs)
        for index, job in enumerate(finished):
            if index < excess or (job.finished_at or 0.0) < too_old:
                self.store.delete(job.job_id)
                del self.jobs[job.job_id]
                log.info("Pruned finished job %s.", job.job_id)

    # ----------------------------------------------------------------- sending

    def _send(self, routing_id: bytes, header: dict[str, Any], payload: list[bytes] | None = None
              ) -> bool:
        """Send to one client; a client that is gone or not reading loses the message."""
        try:
            self.router.send_multipart([routing_id, *protocol.encode(header, payload)],
                                       flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as error:  # EHOSTUNREACH (gone) or EAGAIN (not reading)
            log.debug("Dropped a %s for %r: %s", header.get("type"), routing_id, error)
            return False

    def _send_event(self, job: Job, header: dict[str, Any]) -> None:
        if job.client in self.clients:
            self._send(routing_id_of(job.client), header)

    def _send_queue_positions(self) -> None:
        """Tell each queued job's client where it now stands."""
        with self.lock:
            updates = [(self.jobs[job_id], self._position(self.jobs[job_id]))
                       for job_id in self.pending]
        for job, position in updates:
            self._send_event(job, {"type": protocol.PROGRESS, "job_id": job.job_id,
                                   "phase": "queued", "step": 0, "total": 0,
                                   "queue_position": position})

    def _forward_worker_event(self, event: dict[str, Any]) -> None:
        """Route an event the worker produced to the job's client (main thread only)."""
        if event["type"] == "queue_changed":
            self._send_queue_positions()
            return
        job = self.jobs.get(event["job_id"])
        if job is not None:
            self._send_event(job, event)

    def _forget_silent_clients(self) -> None:
        limit = self.config.heartbeat_s * protocol.CLIENT_EXPIRY_INTERVALS
        now = time.monotonic()
        for client, last_heard in list(self.clients.items()):
            if now - last_heard > limit:
                del self.clients[client]
                log.info("Forgot silent client %s (its jobs are kept).", client)

    # ----------------------------------------------------------------- worker thread

    def _worker_loop(self) -> None:
        """Run queued jobs one at a time until the server stops."""
        events = self.context.socket(zmq.PUSH)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(WORKER_EVENTS)
        notify = lambda header: events.send(json.dumps(header).encode("utf-8"))  # noqa: E731
        try:
            while True:
                with self.work_ready:
                    while not self.pending and not self.stopping.is_set():
                        self.work_ready.wait()
                    if self.stopping.is_set():
                        return
                    job = self.jobs[self.pending.popleft()]
                    self.running = job.job_id
                    job.state, job.attempts, job.started_at = protocol.RUNNING, job.attempts + 1, time.time()
                    job.phase, job.step, job.total = "start", 0, 0
                    self.store.write_status(job)
                notify({"type": "queue_changed"})
                log.info("Running job %s (attempt %d).", job.job_id, job.attempts)
                self._run_job(job, notify)
                with self.lock:
                    self.running = None
                    self._prune()
        finally:
            events.close(0)

    def _run_job(self, job: Job, notify) -> None:
        """Run one job on the engine and record how it ended (worker thread)."""
        from backend.video import check_frames, decode_pngs, encode_png
        from shared.settings import TransferSettings

        def progress(phase: str, step: int, total: int) -> None:
            job.phase, job.step, job.total = phase, step, total
            notify({"type": protocol.PROGRESS, "job_id": job.job_id, "phase": phase,
                    "step": step, "total": total, "attempt": job.attempts})
            if self.config.test_step_delay_s:
                time.sleep(self.config.test_step_delay_s)

        def cancelled() -> bool:
            return job.cancel_requested or self.stopping.is_set()

        try:
            request = self.store.read_request(job.job_id)
            source = f"the clip of job {job.job_id}"
            frames = check_frames(decode_pngs(self.store.read_inputs(job.job_id), source), source)
            settings = TransferSettings.from_dict(request["settings"])
            result = self.engine.transfer(frames, settings, progress=progress,
                                          cancelled=cancelled)
            images = [encode_png(frame) for frame in result.frames]
            self.store.write_result(job.job_id, images, result.metadata)
            progress("save", len(images), len(images))
        except JobCancelled:
            if self.stopping.is_set() and not job.cancel_requested:
                with self.lock:  # a clean stop: run it again after the restart
                    job.state, job.attempts = protocol.QUEUED, job.attempts - 1
                    self.store.write_status(job)
                return
            with self.lock:
                self._finish(job, protocol.JOB_CANCELLED)
            notify({"type": protocol.CANCELLED, "job_id": job.job_id})
            log.info("Cancelled job %s.", job.job_id)
            return
        except UnderstudyError as error:
            self._fail(job, error.code, str(error), notify)
            return
        except Exception as error:  # an engine bug fails this job, not the server
            log.error("Job %s failed:\n%s", job.job_id, traceback.format_exc())
            self._fail(job, "internal", f"The server failed on this job ({type(error).__name__}); "
                       "see the server log.", notify)
            return
        with self.lock:
            self._finish(job, protocol.DONE, frame_count=len(images))
        notify({"type": protocol.RESULT_READY, "job_id": job.job_id,
                "frame_count": len(images), "sidecar": result.metadata})
        log.info("Finished job %s (%d frames).", job.job_id, len(images))

    def _fail(self, job: Job, code: str, message: str, notify) -> None:
        with self.lock:
            self._finish(job, protocol.FAILED, {"code": code, "message": message})
        notify(protocol.error_header(code, message, job_id=job.job_id))
        log.info("Job %s failed: %s", job.job_id, message)


def client_name(routing_id: bytes) -> str:
    """A routing id as text for job records (latin-1: any bytes, round trip exact)."""
    return routing_id.decode("latin-1")


def routing_id_of(client: str) -> bytes:
    return client.encode("latin-1")


def _user_id(frame: zmq.Frame) -> str | None:
    """The CURVE client's public key (z85), as set by the authenticator."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


# --------------------------------------------------------------------------- entry point


def serve(config: ServerConfig, model: str, device: str | None = None, dtype: str | None = None,
          cache_dir: Path | None = None) -> None:
    """Check the options, load the model once, recover the store, serve until stopped."""
    from backend.engine import load_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    check_bind_allowed(config.bind, config.keys_dir, config.insecure)
    if config.keys_dir is None and not is_loopback(config.bind):
        log.warning("Serving %s without encryption (--insecure): anyone who can reach it can "
                    "submit jobs and read results.", config.bind)
    engine = load_engine(model, device=device, dtype=dtype, cache_dir=cache_dir)
    server = Server(config, engine)
    server.recover()
    address = server.bind()
    described = engine.describe()
    print(f"Understudy server ready on {address} (model {described.get('model')} on "
          f"{described.get('device')}, {'CURVE' if server.authenticator else 'no encryption'}, "
          f"state in {config.state_dir}).", flush=True)
    server.serve_forever()


def write_keys(keys_dir: Path) -> list[Path]:
    """Write a server and a client CURVE key pair plus the server's allowlist folder."""
    import zmq.auth

    keys_dir = Path(keys_dir)
    existing = [name for name in ("server.key_secret", "client.key_secret")
                if (keys_dir / name).exists()]
    if existing:
        raise ServerConfigError(f"{keys_dir} already holds keys ({existing[0]}); use another "
                                "folder or delete the old keys first.")
    keys_dir.mkdir(parents=True, exist_ok=True)
    server_public, server_secret = zmq.auth.create_certificates(keys_dir, "server")
    client_public, client_secret = zmq.auth.create_certificates(keys_dir, "client")
    allowed = keys_dir / "authorized_clients"
    allowed.mkdir(exist_ok=True)
    shutil.copy(client_public, allowed / "client.key")
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    return [Path(server_public), Path(server_secret), Path(client_public), Path(client_secret),
            allowed / "client.key"]
