"""The server assembled: store, book, worker thread and socket loop, and `serve`.

Two threads. The main thread owns the ROUTER socket: it reads requests, answers them
and forwards the worker's events. The worker thread runs jobs; it reaches the main
thread only through an inproc PUSH socket, and the book (under its lock) is the only
state both threads touch.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from backend.server.book import JobBook, Retention
from backend.server.engine_api import TransferEngine
from backend.server.requests import Requests
from backend.server.security import check_bind_allowed, is_loopback
from backend.server.store import JobStore
from backend.server.transport import Transport
from backend.server.worker import QUEUE_CHANGED, Worker
from shared import protocol
from shared.protocol import EventType

log = logging.getLogger("understudy.server")

WORKER_EVENTS = "inproc://understudy-worker-events"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "understudy" / "server"


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


class Server:
    """Wires the parts together and runs the main loop."""

    def __init__(self, config: ServerConfig, engine: TransferEngine) -> None:
        self.config = config
        self.engine = engine
        self.store = JobStore(config.state_dir)
        self.book = JobBook(self.store, config.limits["max_queue"],
                            Retention(config.keep_hours, config.keep_jobs))
        self.worker = Worker(self.book, self.store, engine, config.test_step_delay_s)
        self.context = zmq.Context.instance()
        self.transport = Transport(self.context, config.bind, config.keys_dir, config.insecure,
                                   config.limits)
        self.requests = Requests(self.book, engine, config.limits, config.heartbeat_s,
                                 secure=lambda: self.transport.secure,
                                 dropped=lambda: self.transport.dropped)
        self.stopping = threading.Event()

    def recover(self) -> None:
        counts = self.book.recover()
        if counts["jobs"]:
            log.info("Recovered %d jobs: %d to re-run, %d queued.", counts["jobs"],
                     counts["rerun"], counts["queued"])

    def bind(self) -> str:
        return self.transport.bind()

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM. The running job goes back to the queue on a clean stop."""
        events = self.context.socket(zmq.PULL)
        events.bind(WORKER_EVENTS)
        worker = threading.Thread(target=self._worker_thread, name="understudy-worker",
                                  daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self.transport.router, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), lambda *_: self.stopping.set())
        try:
            while not self.stopping.is_set():
                ready = dict(poller.poll(int(self.config.heartbeat_s * 1000)))
                if self.transport.router in ready:
                    self._answer_waiting()
                if events in ready:
                    while events.poll(0):
                        self._forward(json.loads(events.recv()))
                self.transport.forget_silent(
                    self.config.heartbeat_s * protocol.CLIENT_EXPIRY_INTERVALS)
        finally:
            log.info("Stopping; a running job goes back to the queue.")
            self.stopping.set()
            self.book.wake()
            worker.join(timeout=60)
            events.close(0)
            self.transport.close()

    def close(self) -> None:
        self.transport.close()

    def _worker_thread(self) -> None:
        events = self.context.socket(zmq.PUSH)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(WORKER_EVENTS)
        try:
            self.worker.run(self.stopping,
                            lambda header: events.send(protocol.json_text(header).encode()))
        finally:
            events.close(0)

    def _answer_waiting(self) -> None:
        while (message := self.transport.receive()) is not None:
            answer = self.requests.answer(message)
            self.transport.send(message.routing_id, answer.reply, answer.payload)
            if answer.cancelled is not None:
                job = answer.cancelled
                self.transport.send_event(job.client, job.owner, {
                    "type": EventType.CANCELLED, "job_id": job.job_id})
                self._send_queue_positions()

    def _forward(self, event: dict) -> None:
        """Route an event the worker produced to the job's client (main thread only)."""
        if event["type"] == QUEUE_CHANGED:
            self._send_queue_positions()
            return
        recipient = self.book.client_of(event["job_id"])
        if recipient is not None:
            self.transport.send_event(*recipient, event)

    def _send_queue_positions(self) -> None:
        """Tell each queued job's client where it now stands."""
        for job_id, client, owner, position in self.book.queue_positions():
            self.transport.send_event(client, owner, {
                "type": EventType.PROGRESS, "job_id": job_id, "phase": "queued", "step": 0,
                "total": 0, "queue_position": position})


def serve(config: ServerConfig, model: str, device: str | None = None, dtype: str | None = None,
          cache_dir: Path | None = None, upscale_model: str | None = None) -> None:
    """Check the options, load the model (and the upscaler, if named) once, recover the
    store, serve until stopped."""
    from backend.engine import load_engine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    check_bind_allowed(config.bind, config.keys_dir, config.insecure)
    if config.keys_dir is None and not is_loopback(config.bind):
        log.warning("Serving %s without encryption (--insecure): anyone who can reach it can "
                    "submit jobs and read results.", config.bind)
    JobStore(config.state_dir)  # a state folder that cannot be written: say so before loading
    engine = load_engine(model, device=device, dtype=dtype, cache_dir=cache_dir,
                         upscale_model=upscale_model)
    server = Server(config, engine)
    server.recover()
    address = server.bind()
    described = engine.describe()
    print(f"Understudy server ready on {address} (model {described.get('model')} on "
          f"{described.get('device')}, {'CURVE' if server.transport.secure else 'no encryption'}, "
          f"state in {config.state_dir}).", flush=True)
    server.serve_forever()
