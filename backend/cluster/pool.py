"""The worker actors of one gateway.

Ray places the actors (one per GPU or worker slot), restarts a dead one
(`max_restarts=-1`) and never re-runs a job behind the gateway's back
(`max_task_retries=0`): the gateway's job store decides whether a job runs again.

The hand-off is the gateway's: one job thread per actor (backend/server/job_thread.py)
waits until its actor is up, claims the job at the head of the FIFO queue, runs it
there and goes back for another. A free actor therefore takes the oldest queued job,
first come first served across the pool, one job per actor at a time; there is no
other scheduling.

The actors belong to the gateway process (no `lifetime="detached"`): when the gateway
dies, Ray kills them with it, so a job is never left running with nobody to deliver it;
the restarted gateway re-runs it from its store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

from backend.cluster.connect import ClusterConfigError, RayConnection
from backend.cluster.engine_actor import ActorSpec, EngineActor
from backend.cluster.runner import ActorRunner
from shared.settings import TransferSettings

log = logging.getLogger("understudy.cluster")

DEFAULT_CANCEL_GRACE_S = 30.0
# Placing the workers and loading their models (a first download included).
START_TIMEOUT_S = 1800.0
# Submit-time settings checks run on a worker; one that is busy restarting must not
# hold the gateway's socket loop longer than this (the job is then checked when it runs).
CHECK_TIMEOUT_S = 5.0


class ActorPool:
    """Creates the actors, waits until each holds a warm engine, and closes them."""

    def __init__(self, connection: RayConnection, spec: ActorSpec,
                 cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S, count: int | None = None,
                 name_prefix: str = "worker") -> None:
        """`count` (default: one per GPU or slot) lets a benchmark or test use fewer."""
        import ray

        self.connection = connection
        placement = connection.placement
        if placement.torch_threads and not spec.torch_threads:
            spec = replace(spec, torch_threads=placement.torch_threads)
        actor_class = ray.remote(EngineActor)
        self.runners: list[ActorRunner] = []
        for index in range(placement.count if count is None else count):
            name = f"{name_prefix}-{index}"
            actor = actor_class.options(
                max_concurrency=2,  # the job, plus cancel/identity/check while it runs
                max_restarts=-1, max_task_retries=0, **placement.actor_options,
            ).remote(name, spec)
            self.runners.append(ActorRunner(name, actor, cancel_grace_s))
        self._checks = 0

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Block until every worker has loaded its model; refuse one that could not, or
        that Ray could not place within `timeout_s` (its GPU is taken)."""
        deadline = time.monotonic() + timeout_s
        identities = []
        for runner in self.runners:
            identity = runner.wait_ready(lambda: time.monotonic() > deadline)
            if identity is None:
                raise ClusterConfigError(
                    f"Worker {runner.name} did not start within {timeout_s:.0f} s; see `ray "
                    "status` for free GPUs (another gateway may hold them) and the workers' "
                    "Ray logs.")
            if "load_error" in identity:
                raise ClusterConfigError(f"Worker {runner.name} on {identity['host']} could not "
                                         f"load the model: {identity['load_error']['message']}")
            identities.append(identity)
        return identities

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

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        """The engine's submit-time check, on the workers in turn (all hold the same model)."""
        from ray.exceptions import GetTimeoutError, RayActorError

        runner = self.runners[self._checks % len(self.runners)]
        self._checks += 1
        try:
            runner.check_settings(settings.to_dict(), clip_length, frame_size, CHECK_TIMEOUT_S)
        except (GetTimeoutError, RayActorError):
            log.info("Worker %s is busy restarting; the settings are checked when the job runs.",
                     runner.name)
