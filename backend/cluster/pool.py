"""The worker actors of one gateway, and the hand-off of queued jobs to them.

Ray places the actors (one per GPU or worker slot), restarts a dead one
(`max_restarts=-1`) and never re-runs a job behind the gateway's back
(`max_task_retries=0`): the gateway's job store decides whether a job runs again.

The hand-off is one thread per actor: it waits until its actor is up, takes the next
job from the gateway's FIFO queue, runs it there and goes back for another. A free
actor therefore takes the job at the head of the queue, first come first served
across the pool, one job per actor at a time; there is no other scheduling here.

The actors belong to the gateway process (no `lifetime="detached"`): when the gateway
dies, Ray kills them with it, so a job is never left running with nobody to deliver it;
the restarted gateway re-runs it from its store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Generic, TypeVar

from backend.cluster.connect import ClusterConfigError, RayConnection
from backend.cluster.runner import ActorRunner
from backend.cluster.worker import EngineWorker, WorkerSpec
from shared.settings import TransferSettings

log = logging.getLogger("understudy.cluster")

Job = TypeVar("Job")
DEFAULT_CANCEL_GRACE_S = 30.0
# Submit-time settings checks run on a worker; one that is busy restarting must not
# hold the gateway's socket loop longer than this (the job is then checked when it runs).
CHECK_TIMEOUT_S = 5.0


class WorkerPool:
    """Creates the actors, waits until each holds a warm engine, and closes them."""

    def __init__(self, connection: RayConnection, spec: WorkerSpec,
                 cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S, count: int | None = None,
                 name_prefix: str = "worker") -> None:
        """`count` (default: one per GPU or slot) lets a benchmark or test use fewer."""
        import ray

        self.connection = connection
        placement = connection.placement
        if placement.torch_threads and not spec.torch_threads:
            spec = replace(spec, torch_threads=placement.torch_threads)
        actor_class = ray.remote(EngineWorker)
        self.runners: list[ActorRunner] = []
        for index in range(placement.count if count is None else count):
            name = f"{name_prefix}-{index}"
            actor = actor_class.options(
                max_concurrency=2,  # the job, plus cancel/identity/check while it runs
                max_restarts=-1, max_task_retries=0, **placement.actor_options,
            ).remote(name, spec)
            self.runners.append(ActorRunner(name, actor, cancel_grace_s))
        self._checks = 0

    def wait_ready(self, stopping: Callable[[], bool] = lambda: False) -> list[dict[str, Any]]:
        """Block until every worker has loaded its model; refuse one that could not."""
        identities = []
        for runner in self.runners:
            identity = runner.wait_ready(stopping)
            if identity is None:
                break
            if "load_error" in identity:
                raise ClusterConfigError(f"Worker {runner.name} on {identity['host']} could not "
                                         f"load the model: {identity['load_error']['message']}")
            identities.append(identity)
        return identities

    def engines(self) -> list:
        """One engine-shaped handle per actor, for the gateway's worker threads."""
        from backend.cluster.remote import ActorEngine

        return [ActorEngine(self, runner) for runner in self.runners]

    def close(self) -> None:
        import ray

        for runner in self.runners:
            ray.kill(runner.actor, no_restart=True)
        self.runners = []

    # ----------------------------------------------------------------- the engine's face

    def describe(self) -> dict[str, Any]:
        """What the gateway's welcome reports: the workers' engine, and how many there are."""
        first = self.runners[0].identity or {}
        return {**first.get("engine", {}), "workers": len(self.runners),
                "cluster": self.connection.target.label}

    def check_settings(self, settings: TransferSettings, clip_length: int) -> None:
        """The engine's submit-time check, on the workers in turn (all hold the same model)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        runner = self.runners[self._checks % len(self.runners)]
        self._checks += 1
        try:
            runner.check_settings(settings.to_dict(), clip_length, CHECK_TIMEOUT_S)
        except (GetTimeoutError, RayActorError):
            log.info("Worker %s is busy restarting; the settings are checked when the job runs.",
                     runner.name)


class HandOff(Generic[Job]):
    """One thread per worker: take the next queued job, run it there, repeat.

    `take()` blocks until a job is queued and returns None when the gateway stops;
    `run(job, runner)` runs it on that worker and records how it ended.
    """

    def __init__(self, pool: WorkerPool, take: Callable[[], Job | None],
                 run: Callable[[Job, ActorRunner], None], stopping: threading.Event) -> None:
        self.threads = [threading.Thread(target=self._serve, args=(runner, take, run, stopping),
                                         name=f"understudy-{runner.name}", daemon=True)
                        for runner in pool.runners]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout_s: float) -> None:
        for thread in self.threads:
            thread.join(timeout=timeout_s)

    @staticmethod
    def _serve(runner: ActorRunner, take: Callable[[], Job | None],
               run: Callable[[Job, ActorRunner], None], stopping: threading.Event) -> None:
        while not stopping.is_set():
            # Only a live actor takes a job: one that is restarting leaves the queue to
            # the others until Ray has it back.
            if runner.wait_ready(stopping.is_set) is None:
                return
            job = take()
            if job is None:
                return
            try:
                run(job, runner)
            except Exception:  # the job book's bug must not stop this worker for good
                log.exception("Handing a job to %s failed.", runner.name)
