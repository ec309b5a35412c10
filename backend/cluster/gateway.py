"""What `serve --ray ADDRESS` adds to the server: Ray, the workers, and their engines.

    workers = start_cluster_workers(ClusterOptions("local:2"), spec, state_dir)
    Server(config, workers.engines[0], pool_engines=workers.engines)
    ...
    workers.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from backend.cluster.connect import RayConnection, connect, parse_ray_target
from backend.cluster.pool import DEFAULT_CANCEL_GRACE_S, WorkerPool
from backend.cluster.remote import ActorEngine
from backend.cluster.worker import WorkerSpec

log = logging.getLogger("understudy.cluster")


@dataclass(frozen=True)
class ClusterOptions:
    """The `serve` flags for Ray."""

    address: str  # --ray
    shared_cache: bool = False  # --shared-cache
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S  # --cancel-grace


@dataclass
class ClusterWorkers:
    """A running pool: one engine per actor for the gateway's worker threads."""

    connection: RayConnection
    pool: WorkerPool
    engines: list[ActorEngine]

    def summary(self) -> str:
        """For the start-up line: "2 workers on Ray local:2 (2 worker slots on CPU)"."""
        return (f"{len(self.engines)} worker{'s' if len(self.engines) != 1 else ''} on Ray "
                f"{self.connection.target.label} ({self.connection.placement.description})")

    def close(self) -> None:
        self.pool.close()
        self.connection.close()


def start_cluster_workers(options: ClusterOptions, spec: WorkerSpec, token_dir: Path
                          ) -> ClusterWorkers:
    """Start or join Ray and wait until every worker holds a warm engine."""
    target = parse_ray_target(options.address)
    spec = replace(spec, shared_cache=options.shared_cache)
    connection = connect(target, token_dir)
    try:
        pool = WorkerPool(connection, spec, options.cancel_grace_s)
        identities = pool.wait_ready()
    except BaseException:
        connection.close()
        raise
    for identity in identities:
        log.info("Worker %s ready on %s (pid %d%s).", identity["actor"], identity["host"],
                 identity["pid"], f", GPU {identity['gpu']['name']}" if identity["gpu"] else "")
    return ClusterWorkers(connection, pool, pool.engines())
