"""What `serve --ray ADDRESS` adds to the server: Ray, the workers, and their engines.

    cluster = start_actors(ClusterOptions("local:2"), spec, state_dir)
    Server(config, cluster.engines[0], pool_engines=cluster.engines)
    ...
    cluster.close()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from backend.cluster.connect import RayConnection, connect, parse_ray_target
from backend.cluster.pool import DEFAULT_CANCEL_GRACE_S, ActorPool
from backend.cluster.remote import ActorEngine, actor_engines
from backend.cluster.worker import ActorSpec

log = logging.getLogger("understudy.cluster")


@dataclass(frozen=True)
class ClusterOptions:
    """The `serve` flags for Ray."""

    address: str  # --ray
    shared_cache: bool = False  # --shared-cache
    cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S  # --cancel-grace


@dataclass
class ClusterActors:
    """A running pool: one engine per actor for the gateway's job threads."""

    connection: RayConnection
    pool: ActorPool
    engines: list[ActorEngine]

    def summary(self) -> str:
        """For the start-up line: "2 workers on Ray local:2 (2 worker slots on CPU)"."""
        return (f"{len(self.engines)} worker{'s' if len(self.engines) != 1 else ''} on Ray "
                f"{self.connection.target.label} ({self.connection.placement.description})")

    def close(self) -> None:
        self.pool.close()
        self.connection.close()


def start_actors(options: ClusterOptions, spec: ActorSpec, token_dir: Path) -> ClusterActors:
    """Start or join Ray and wait until every worker holds a warm engine."""
    target = parse_ray_target(options.address)
    spec = replace(spec, shared_cache=options.shared_cache)
    connection = connect(target, token_dir)
    try:
        pool = ActorPool(connection, spec, options.cancel_grace_s)
        identities = pool.wait_ready()
    except BaseException:
        connection.close()
        raise
    for identity in identities:
        log.info("Worker %s ready on %s (pid %d%s).", identity["actor"], identity["host"],
                 identity["pid"], f", GPU {identity['gpu']['name']}" if identity["gpu"] else "")
    return ClusterActors(connection, pool, actor_engines(pool))
