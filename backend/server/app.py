"""The server assembled: store, book, job threads and socket loop, and `serve`.

The main thread owns the ROUTER socket: it reads requests, answers them and forwards
the job threads' events. A job thread (backend/server/job_thread.py; one, or one per Ray
actor on a gateway) runs jobs; the planning thread (backend/server/planning.py) makes
the memory plans that a submit or plan request waits for. Both reach the main thread
only through an inproc PUSH socket; the book (under its lock) and the planning desk
(under its own) are the only state the threads share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from backend.server.book import JobBook, Retention
from backend.server.engine_api import PooledEngine, TransferEngine
from backend.server.job_thread import QUEUE_CHANGED, JobThread
from backend.server.planning import PLANNED, PlanDesk, ServerMemory
from backend.server.requests import Requests
from backend.server.security import check_bind_allowed, is_loopback
from backend.server.store import JobStore
from backend.server.transport import Transport
from shared import protocol
from shared.protocol import EventType

if TYPE_CHECKING:  # the single-box server never loads the cluster package (nor Ray)
    from backend.cluster.gateway import ClusterOptions

log = logging.getLogger("understudy.server")

JOB_EVENTS = "inproc://understudy-job-events"
DEFAULT_STATE_DIR = Path.home() / ".cache" / "understudy" / "server"
BACKLOG_RETRY_S = 0.01  # how soon to retry a client whose pipe was full


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
    test_plan_gate: Path | None = None  # testing only: each memory plan waits for this file
    test_take_gate: Path | None = None  # testing only: a job waits for it after each take
    test_no_plan_warm_up: bool = False  # testing only: no plan of the model's own clip at start
    cluster: ClusterOptions | None = None  # `--ray`: jobs run on Ray workers
    assume_gpu_memory_gb: float | None = None  # `--memory auto` fits jobs into this (tests, sharing)


class Server:
    """Wires the parts together and runs the main loop."""

    def __init__(self, config: ServerConfig, engine: TransferEngine,
                 pool_engines: Sequence[PooledEngine] = (),
                 memory: ServerMemory | None = None) -> None:
        """`pool_engines`: one per Ray actor (`--ray`), each driven by its own job
        thread; without them one job thread drives `engine` in this process. `memory`:
        what `--memory auto` plans jobs against (None: nothing is planned)."""
        self.config = config
        self.engine = engine
        self.store = JobStore(config.state_dir)
        self.book = JobBook(self.store, config.limits["max_queue"],
                            Retention(config.keep_hours, config.keep_jobs))
        if pool_engines:  # the Ray actors apply the step delay themselves
            self.job_threads = [JobThread(self.book, self.store, pooled, ready=pooled.wait_ready,
                                          memory=memory, take_gate=config.test_take_gate)
                                for pooled in pool_engines]
        else:
            self.job_threads = [JobThread(self.book, self.store, engine,
                                          config.test_step_delay_s, memory=memory,
                                          take_gate=config.test_take_gate)]
        self.context = zmq.Context.instance()
        self.transport = Transport(self.context, config.bind, config.keys_dir, config.insecure,
                                   config.limits)
        self.desk = PlanDesk(config.limits["max_queue"], config.test_plan_gate)
        self.requests = Requests(self.book, engine, config.limits, config.heartbeat_s,
                                 secure=lambda: self.transport.secure,
                                 dropped=lambda: self.transport.dropped,
                                 memory=memory, desk=self.desk)
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
        events.bind(JOB_EVENTS)
        threads = [threading.Thread(target=self._run_job_thread, args=(job_thread,),
                                    name=f"understudy-jobs-{index}", daemon=True)
                   for index, job_thread in enumerate(self.job_threads)]
        threads.append(threading.Thread(target=self._run_planning_thread,
                                        name="understudy-planning", daemon=True))
        for thread in threads:
            thread.start()
        poller = zmq.Poller()
        poller.register(self.transport.router, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        for name in ("SIGINT", "SIGTERM"):
            signal.signal(getattr(signal, name), lambda *_: self.stopping.set())
        try:
            while not self.stopping.is_set():
                # A client's full pipe cannot be polled for room (a ROUTER is always
                # writable), so while something waits for one, look again soon.
                wait_s = BACKLOG_RETRY_S if self.transport.backlog else self.config.heartbeat_s
                ready = dict(poller.poll(int(wait_s * 1000)))
                self.transport.flush()  # what waited goes first, in order
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
            for thread in threads:
                thread.join(timeout=60)
            events.close(0)
            self.transport.close()

    def close(self) -> None:
        self.transport.close()

    def _run_job_thread(self, job_thread: JobThread) -> None:
        with self._events_to_main() as tell:
            job_thread.run(self.stopping, tell)

    def _run_planning_thread(self) -> None:
        with self._events_to_main() as tell:
            self.desk.run(self.stopping, lambda: tell({"type": PLANNED}))

    @contextlib.contextmanager
    def _events_to_main(self) -> Iterator[Callable[[dict], None]]:
        """A thread's way to the main loop: tell(header) over its own inproc PUSH socket
        (ZeroMQ sockets are not shared between threads)."""
        events = self.context.socket(zmq.PUSH)
        events.setsockopt(zmq.LINGER, 0)
        events.connect(JOB_EVENTS)
        try:
            yield lambda header: events.send(protocol.json_text(header).encode())
        finally:
            events.close(0)

    def _answer_waiting(self) -> None:
        while (message := self.transport.receive()) is not None:
            answer = self.requests.answer(message)
            if answer.deferred:  # the planning thread has it; answered in _answer_planned
                continue
            self.transport.send_reply(message.routing_id, answer.reply, answer.payload)
            if answer.cancelled is not None:
                job = answer.cancelled
                self.transport.send_event(job.client, job.owner, {
                    "type": EventType.CANCELLED, "job_id": job.job_id})
                self._send_queue_positions()

    def _forward(self, event: dict) -> None:
        """Route an event a job thread produced to the job's client (main thread only)."""
        if event["type"] == QUEUE_CHANGED:
            self._send_queue_positions()
            return
        if event["type"] == PLANNED:
            self._answer_planned()
            return
        recipient = self.book.client_of(event["job_id"])
        if recipient is not None:
            self.transport.send_event(*recipient, event)

    def _answer_planned(self) -> None:
        """Reply to the requests whose memory plans are made (a submit is queued or
        refused now)."""
        for work in self.desk.made():
            self.transport.send_reply(work.routing_id, self.requests.complete(work).reply)

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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    check_bind_allowed(config.bind, config.keys_dir, config.insecure)
    if config.keys_dir is None and not is_loopback(config.bind):
        log.warning("Serving %s without encryption (--insecure): anyone who can reach it can "
                    "submit jobs and read results.", config.bind)
    JobStore(config.state_dir)  # a state folder that cannot be written: say so before loading
    if config.cluster is None:
        from backend.edit import engine_phases, load_engine
        from backend.memory.planner import MemoryPlanner, gpu_description

        engine, cluster, where = load_engine(model, device=device, dtype=dtype,
                                             cache_dir=cache_dir,
                                             upscale_model=upscale_model), None, ""
        engine_device, assumed = str(engine.backbone.device), config.assume_gpu_memory_gb
        planner = MemoryPlanner(lambda: gpu_description(engine_device, assumed), engine_phases)
        memory = ServerMemory(planner, engine.backbone)
        if not config.test_no_plan_warm_up:
            threading.Thread(target=planner.warm, args=(engine.backbone,), daemon=True,
                             name="understudy-plan-warm-up").start()
    else:  # the models load on the Ray workers; this process needs neither torch nor a GPU
        from backend.cluster.engine_actor import ActorSpec
        from backend.cluster.gateway import start_actors

        cluster = start_actors(config.cluster, ActorSpec(
            model, device, dtype, cache_dir, upscale_model=upscale_model,
            step_delay_s=config.test_step_delay_s,
            assume_gpu_memory_gb=config.assume_gpu_memory_gb),
            token_dir=config.state_dir)
        engine, memory, where = cluster.engines[0], cluster.memory, f", {cluster.summary()}"
        if config.limits["max_queue"] < 2 * len(cluster.engines):  # it counts running jobs
            log.warning("--max-queue %d is under twice the %d workers: raise it, or workers "
                        "sit idle while editors are told queue_full.",
                        config.limits["max_queue"], len(cluster.engines))
    try:
        server = Server(config, engine, cluster.engines if cluster else (), memory)
        server.recover()
        address = server.bind()
        described = engine.describe()
        print(f"Understudy server ready on {address} (model {described.get('model')} on "
              f"{described.get('device')}{where}, "
              f"{'CURVE' if server.transport.secure else 'no encryption'}, "
              f"state in {config.state_dir}).", flush=True)
        server.serve_forever()
    finally:
        if cluster is not None:
            cluster.close()
