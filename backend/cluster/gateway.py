"""What `serve --ray ADDRESS` adds to the server: Ray, the workers, and their engines.

    cluster = start_actors(ClusterOptions("local:2"), spec, state_dir)
    Server(config, cluster.engines[0], pool_engines=cluster.engines, memory=cluster.memory)
    ...
    cluster.close()

The gateway plans GPU memory as one box does (`--memory auto`), for the smallest GPU
among its workers: each worker reports its device's memory (`identity()["memory"]`,
CUDA's free memory or the `--assume-gpu-memory-gb` figure), any worker may take any
job (FIFO), so a job planned for the smallest fits every one. The plan runs here, on
the gateway's CPU, on the workers' model by name (backend/backbones/registry.py plannable_models)
for their device and dtype; no weights are needed. The hello reports that smallest
GPU, a submit or plan request is planned off the socket loop (backend/server/planning.py),
a job that cannot fit is refused before it is queued, and the savers chosen travel
with the job to the worker (backend/cluster/engine_handles.py) and into its sidecar.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.cluster.connect import RayConnection, connect, parse_ray_target
from backend.cluster.engine_actor import ActorSpec
from backend.cluster.engine_handles import ActorEngine, actor_engines
from backend.cluster.gang import GangEngine, GangPool
from backend.cluster.pool import DEFAULT_CANCEL_GRACE_S, ActorPool
from backend.gang import DEFAULT_COLLECTIVE_TIMEOUT_S

if TYPE_CHECKING:
    from backend.server.planning import ServerMemory

log = logging.getLogger("understudy.cluster")


@dataclass(frozen=True)
class ClusterOptions:
    """The `serve` flags for Ray."""

    address: str  # --ray
    shared_cache: bool = False  # --shared-cache
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S  # --cancel-grace
    gang: int = 1  # --gang: GPUs per job (backend/cluster/gang.py); 1: one job per GPU
    gang_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S  # --gang-timeout


@dataclass
class ClusterActors:
    """A running pool: one engine per actor for the gateway's job threads."""

    connection: RayConnection
    pool: ActorPool | GangPool
    engines: list[ActorEngine] | list[GangEngine]
    memory: ServerMemory | None = None  # what `--memory auto` plans against; None: nothing

    def summary(self) -> str:
        """For the start-up line: "2 workers on Ray local:2 (2 worker slots on CPU)", or
        "1 gang of 2 on Ray local:2 (…)"."""
        count = len(self.engines)
        gang = getattr(self.pool, "size", 1)
        what = (f"{count} gang{'s' if count != 1 else ''} of {gang}" if gang > 1
                else f"{count} worker{'s' if count != 1 else ''}")
        return (f"{what} on Ray {self.connection.target.label} "
                f"({self.connection.placement.description})")

    def close(self) -> None:
        self.pool.close()
        self.connection.close()


def start_actors(options: ClusterOptions, spec: ActorSpec, token_dir: Path) -> ClusterActors:
    """Start or join Ray and wait until every worker holds a warm engine."""
    target = parse_ray_target(options.address)
    spec = replace(spec, shared_cache=options.shared_cache)
    connection = connect(target, token_dir)
    try:
        if options.gang > 1:
            pool = GangPool(connection, spec, options.gang, options.gang_timeout_s,
                            options.cancel_grace_s)
        else:
            pool = ActorPool(connection, spec, options.cancel_grace_s)
        identities = pool.wait_ready()
    except BaseException:
        connection.close()
        raise
    for identity in identities:
        log.info("Worker %s ready on %s (pid %d%s).", identity["actor"], identity["host"],
                 identity["pid"], f", GPU {identity['gpu']['name']}" if identity["gpu"] else "")
    memory = gateway_memory(spec, identities,
                            lambda: smallest_gpu([runner.identity for runner in pool.runners]),
                            options.gang)
    engines = pool.engines() if isinstance(pool, GangPool) else actor_engines(pool)
    return ClusterActors(connection, pool, engines, memory)


def smallest_gpu(identities: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The GPU the gateway plans for: the workers' reported memory (gpu_description,
    backend/memory/planner.py) with the smallest `budget_bytes`, the hello's `gpu`. A
    worker not heard from yet, or without a GPU (a CPU worker), sets no bound; None when
    no worker has a GPU: nothing is planned."""
    gpus = [identity["memory"] for identity in identities
            if identity is not None and identity.get("memory") is not None]
    return min(gpus, key=lambda gpu: gpu["budget_bytes"]) if gpus else None


def gateway_memory(spec: ActorSpec, identities: list[dict[str, Any]],
                   gpu: Callable[[], dict[str, Any] | None], gang: int = 1) -> ServerMemory | None:
    """The gateway's planner: for the workers' model by name, on their device in their
    dtype, fitting `gpu()` (one rank's GPU on a gang: ServerMemory.gang); None when no
    worker reports a GPU, or when the model is not one the plan can build by name
    (logged: its jobs run without planned savers)."""
    if gpu() is None:
        return None  # CPU workers: nothing to fit, and no torch needed here
    from backend.backbones.registry import plannable_models
    from backend.edit import engine_phases
    from backend.memory.planner import MemoryPlanner
    from backend.server.planning import ServerMemory

    if spec.model not in plannable_models():
        log.warning("The gateway plans GPU memory by model name and knows %s, not %r; its "
                    "jobs run without --memory auto's savers, so give --model as one of those "
                    "names to plan them.", ", ".join(plannable_models()), spec.model)
        return None
    device = identities[0].get("engine", {}).get("device") or "cuda"
    return ServerMemory(MemoryPlanner(gpu, engine_phases), spec.model, device, spec.dtype, gang)
