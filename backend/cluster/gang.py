"""Gangs: N worker actors on one node that run one job together (`serve --ray … --gang N`).

    python -m backend serve --ray local:2 --gang 2 --model wan-tiny   # one gang of 2
    python -m backend serve --ray auto --gang 4                        # 8 GPUs: 2 gangs of 4

A gang is N `GangActor`s in one Ray placement group of N bundles (one GPU each, or one
worker slot on CPU nodes) with the STRICT_PACK strategy, so Ray puts them on one node
(NVLink, shared memory) or not at all. Rank 0 publishes an address (its node's IP and a
free port); every rank joins one torch.distributed group there (backend/gang.py:
"cpu:gloo,cuda:nccl" on GPUs, gloo on CPUs, every collective with `--gang-timeout`) and
then loads the model, split over the gang (backend/edit.py load_engine: Wan under Ulysses
context parallelism, the latent's gradient summed before each Adam step).

The gateway hands a gang one job at a time (one job thread per gang; the gangs share the
FIFO queue as single workers do, backend/cluster/pool.py). Every rank runs the same
edit with the same settings, the seed included: a job without one gets it drawn here,
once, for all ranks. Rank 0 relays its progress, and only rank 0 returns the frames and
the sidecar (which records the gang, shared/sidecar.py `gang`); the other ranks end with
an empty "done". A backbone without a context parallel plan (ZeroScope) runs each job
on rank 0 alone while the other ranks wait.

Faults, as for a single worker (backend/cluster/runner.py) and then some:
- a rank that dies: the job is re-run once (`ActorLost`, as a lost worker's), and the
  whole gang is rebuilt first (a torch.distributed group cannot take a new member);
- a collective that never completes (a rank stopped, a link down): the other ranks'
  collective fails within `--gang-timeout`, the job fails in one sentence
  (GangStalled), and the gang is rebuilt;
- a cancel: sent to every rank; the ranks agree on it at each of the engine's checks
  (an all-reduce of the flag), so they stop at the same step and the gang stays whole;
  should they still end apart, the gang is rebuilt.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from backend.cluster.connect import ClusterConfigError, RayConnection
from backend.cluster.engine_actor import ActorSpec, EngineActor
from backend.cluster.pool import START_TIMEOUT_S
from backend.cluster.runner import CANCEL_POLL_S, ActorLost, check_on_actor
from backend.errors import JobCancelled, UnderstudyError
from backend.gang import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    GangAddress,
    GangMember,
    GangStalled,
    stalls_named,
)
from backend.results import CancelCheck, ProgressCallback, Take, TakeCallback, TransferResult
from shared.errors import ErrorCode
from shared.settings import TransferSettings
from shared.sidecar import Sidecar

log = logging.getLogger("understudy.cluster")

# After one rank's job ends in failure, how long the others have to report theirs (or to
# be found dead: a rank killed mid-collective makes its peers fail at once, and Ray tells
# of the death a moment later; a death means "re-run", a failure alone "fail"). None
# after a collective that ran out its whole timeout: its peers were alive all along.
PEERS_GRACE_S = 10.0


class GangActor(EngineActor):
    """One rank of a gang: joins the gang's process group, then loads the model split
    over it. `ray.remote` is applied by the gang's runner."""

    def __init__(self, name: str, spec: ActorSpec, rank: int, size: int,
                 timeout_s: float) -> None:
        super().__init__(name, spec, load=False)
        self.rank = rank
        self.size = size
        self.timeout_s = timeout_s
        self.member: GangMember | None = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: where the gang meets (this node's address and a port free now)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            return ray.util.get_node_ip_address(), probe.getsockname()[1]

    def join(self, host: str, port: int) -> dict[str, Any]:
        """Join the gang's process group at host:port, load the model over it; identity()."""
        from backend.gang import join_gang

        try:
            self.member = join_gang(GangAddress(host, port), self.rank, self.size,
                                    self.spec.device or _default_device(), self.timeout_s)
        except UnderstudyError as error:
            self._load_error = {"code": error.code, "message": str(error)}
            return self.identity()
        self._load_engine(self.member)
        if self.engine is not None and self._split():
            self.engine.cache = AgreedCache(self.engine.cache, self.member)
        return self.identity()

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "rank": self.rank, "gang": self.size}

    def _split(self) -> bool:
        return self.engine.backbone.gang_size() > 1

    def _idle(self) -> bool:
        """A backbone that cannot split runs on the writing rank alone."""
        return not self._split() and not self.member.writes_result

    def _transfer(self, clip: Any, settings: Any, progress: Any, cancelled: Any, savers: Any,
                  with_masks: dict[str, Any]) -> dict[str, Any]:
        """The edit on this rank (its share of the split model, or, for a backbone that
        cannot split, rank 0's alone); only the writing rank ships the result."""
        if self._idle():
            return _NOTHING
        with stalls_named(self.timeout_s):
            return super()._transfer(clip, settings, self._progress(progress),
                                     self._agreed(cancelled), savers, with_masks)

    def _transfer_takes(self, clip: Any, settings: Any, takes: list[Any], progress: Any,
                        cancelled: Any, savers: Any, batch_size: int | None, on_take: Any,
                        with_masks: dict[str, Any]) -> None:
        if self._idle():
            return
        with stalls_named(self.timeout_s):
            super()._transfer_takes(clip, settings, takes, self._progress(progress),
                                    self._agreed(cancelled), savers, batch_size, on_take,
                                    with_masks)

    def _progress(self, progress: Any) -> Any:
        return progress if self.member.rank == 0 else _quiet

    def _agreed(self, cancelled: Any) -> Any:
        """The cancel check, agreed by every rank of a split edit: a cancel reaching one
        rank first stops them all at the same step (a rank stopping alone would leave
        the others waiting in a collective). The engine checks at the same points of
        the same edit on every rank. An edit on one rank alone checks its own flag."""
        if not self._split():
            return cancelled
        return lambda: self.member.any_rank(cancelled())

    def _failed(self, job_id: str, error: Exception) -> dict[str, Any]:
        """A collective that ran out its timeout says so: its peers were alive throughout,
        so the gateway need not wait to hear of a death (see GangRunner.run)."""
        event = super()._failed(job_id, error)
        if isinstance(error, GangStalled) and error.timed_out:
            event["timed_out"] = True
        return event

    def _shipped(self, result: Any) -> dict[str, Any]:
        """The writing rank's result, its sidecar recording the gang; nothing elsewhere."""
        member = self.member
        if not member.writes_result:
            return _NOTHING
        shipped = super()._shipped(result)
        shipped["sidecar"] = {**shipped["sidecar"], "gang": {
            "size": member.size, "rank": member.rank, "split": self._split()}}
        return shipped


class AgreedCache:
    """A gang rank's inversion cache (each rank has its own folder): a hit only when
    every rank hits. A rank that inverted while another read its cache would wait in
    the inversion's collectives for a peer that never comes."""

    def __init__(self, cache: Any, member: GangMember) -> None:
        self.cache = cache
        self.member = member

    def load(self, key: str, device: Any) -> Any:
        state = self.cache.load(key, device)
        return None if self.member.any_rank(state is None) else state

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


# What a rank that does not write the result ships.
_NOTHING: dict[str, Any] = {"frames": None, "alpha": None, "sidecar": None}


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _quiet(phase: str, step: int, total: int) -> None:
    """A rank other than 0 reports nothing (rank 0 speaks for the gang)."""


class GangRunner:
    """The gateway's handle on one gang: builds it (and rebuilds it after a fault) in
    its placement group, and runs its jobs on every rank."""

    def __init__(self, name: str, connection: RayConnection, spec: ActorSpec, size: int,
                 timeout_s: float, cancel_grace_s: float) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.name = name
        self.spec = spec
        self.size = size
        self.timeout_s = timeout_s
        self.cancel_grace_s = cancel_grace_s
        bundle = _bundle(connection.placement.actor_options)
        self.placement_group = placement_group([dict(bundle) for _ in range(size)],
                                               strategy="STRICT_PACK", name=name)
        self._actor_options = connection.placement.actor_options
        self._actor_class = ray.remote(GangActor)
        self.actors: list[Any] = []
        self.identities: list[dict[str, Any]] = []
        self.identity: dict[str, Any] | None = None  # rank 0's
        self.broken = True  # not built yet
        self.builds = 0

    # ----------------------------------------------------------------- building

    def build(self, stopping: Callable[[], bool] = lambda: False,
              timeout_s: float = START_TIMEOUT_S) -> bool:
        """(Re)create the gang's actors in its placement group, join them and load the
        model on each; False when `stopping` first. ClusterConfigError when Ray cannot
        place the gang on one node, or a rank cannot load the model."""
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.kill()
        deadline = time.monotonic() + timeout_s
        while not stopping():
            try:
                ray.get(self.placement_group.ready(), timeout=CANCEL_POLL_S * 4)
                break
            except GetTimeoutError:
                if time.monotonic() > deadline:
                    raise ClusterConfigError(
                        f"Ray could not place gang {self.name} ({self.size} "
                        f"{'GPUs' if 'num_gpus' in self._actor_options else 'worker slots'} on "
                        "one node) within "
                        f"{timeout_s:.0f} s; see `ray status`, and give --gang at most the "
                        "GPUs of one node.") from None
        else:
            return False
        options = {key: value for key, value in self._actor_options.items()}
        self.builds += 1
        self.actors = [
            self._actor_class.options(
                max_concurrency=2, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank),
                **options,
            ).remote(f"{self.name}-rank{rank}", self.spec, rank, self.size, self.timeout_s)
            for rank in range(self.size)]
        rendezvous = self._awaited([self.actors[0].rendezvous.remote()], stopping, deadline)
        if rendezvous is None:
            return False
        host, port = rendezvous[0]
        joins = self._awaited([actor.join.remote(host, port) for actor in self.actors],
                              stopping, deadline)
        if joins is None:
            return False
        self.identities = joins
        for identity in self.identities:
            if "load_error" in identity:
                raise ClusterConfigError(
                    f"Rank {identity['rank']} of gang {self.name} on {identity['host']} could "
                    f"not start: {identity['load_error']['message']}")
        self.identity = self.identities[0]
        self.broken = False
        return True

    def _awaited(self, refs: list[Any], stopping: Callable[[], bool],
                 deadline: float) -> list[Any] | None:
        """ray.get(refs), looking at `stopping` while the ranks join and load the model (a
        server told to stop during a rebuild stops now, not when the ranks have loaded);
        None when `stopping` came first, GetTimeoutError past `deadline`."""
        import ray
        from ray.exceptions import GetTimeoutError

        pending = list(refs)
        while pending:
            if stopping():
                return None
            if time.monotonic() > deadline:
                raise GetTimeoutError(f"Gang {self.name}'s ranks did not start in time.")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=CANCEL_POLL_S)
        return ray.get(refs)

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self.kill()
        remove_placement_group(self.placement_group)

    def rank_pids(self) -> list[int]:
        """Each rank's process id, rank 0 first (what the sidecar's worker records)."""
        return [identity["pid"] for identity in self.identities]

    # ----------------------------------------------------------------- a job

    def check_settings(self, settings: dict[str, Any], clip_length: int,
                       frame_size: tuple[int, int] | None, timeout_s: float) -> None:
        """The engine's submit-time check, on rank 0 (every rank loads the same engine)."""
        check_on_actor(self.actors[0], settings, clip_length, frame_size, timeout_s)

    def run(self, job_id: str, settings: dict[str, Any], inputs: list[bytes],
            progress: ProgressCallback, cancelled: CancelCheck,
            masks: list[list[bytes]] | None = None, memory: dict[str, Any] | None = None,
            takes: list[dict[str, Any]] | None = None, batch_size: int | None = None,
            on_take: TakeCallback | None = None,
            references: list[bytes] | None = None) -> list[TransferResult]:
        """Run one job on every rank; the writing rank's results (one per take; one for a
        job of one), each take handed to `on_take` as it arrives; `references`: the job's
        reference images' PNGs, which every rank gets. Raises what a single
        worker's run raises (backend/cluster/runner.py), GangStalled's sentence for a
        collective that timed out; after any fault the gang is marked for rebuilding."""
        import ray
        from ray.exceptions import RayError

        if settings.get("seed") is None:  # one seed for every rank, drawn once
            settings = {**settings, "seed": random.SystemRandom().randrange(2**31)}
        streams = {rank: actor.run.options(num_returns="streaming").remote(
                       job_id, settings, inputs, masks, memory, takes, batch_size, references)
                   for rank, actor in enumerate(self.actors)}
        finished: list[TransferResult] = []  # the takes the writing rank has shipped
        ends: dict[int, dict[str, Any]] = {}
        lost: list[str] = []
        started = False
        ended_at: float | None = None  # when the first rank ended badly
        grace = min(PEERS_GRACE_S, self.timeout_s)  # then, how long the others have
        cancel_sent_at: float | None = None
        while streams:
            now = time.monotonic()
            if cancel_sent_at is None and cancelled():
                for actor in self.actors:
                    actor.cancel.remote(job_id)
                cancel_sent_at = now
            if cancel_sent_at is not None and now - cancel_sent_at > self.cancel_grace_s:
                break
            if ended_at is not None and now - ended_at > grace:
                break
            ready, _ = ray.wait(list(streams.values()), num_returns=1, timeout=CANCEL_POLL_S)
            for rank in [rank for rank, stream in streams.items() if stream in ready]:
                try:
                    event = ray.get(next(streams[rank]))
                except StopIteration:
                    event = None
                except RayError as error:
                    lost.append(f"rank {rank} ({type(error).__name__})")
                    del streams[rank]
                    ended_at = ended_at or time.monotonic()
                    continue
                if event is not None and event["event"] == "take":
                    if event["frames"] is not None:  # the writing rank's
                        finished.append(self._result(event))
                        if on_take is not None:
                            try:
                                on_take(event["index"], finished[-1])
                            except BaseException:  # not stored: the gang stops the job too
                                self.broken = True
                                raise
                    continue
                if event is None or event["event"] not in ("started", "progress"):
                    ends[rank] = event or {"event": "failed", "code": ErrorCode.WORKER_LOST,
                                           "message": f"Rank {rank} ended without a result."}
                    del streams[rank]
                    if ends[rank]["event"] != "done":
                        ended_at = ended_at or time.monotonic()
                    if ends[rank].get("timed_out"):
                        # Its peers were alive and silent for a whole --gang-timeout: a
                        # rank that died would have been heard of by now, none will be.
                        grace = 0.0
                elif event["event"] == "started":
                    started = True
                elif rank == 0:
                    progress(event["phase"], event["step"], event["total"])
        return self._outcome(job_id, ends, lost, started, cancel_sent_at is not None,
                             complete=not streams, takes=None if takes is None else finished)

    def _outcome(self, job_id: str, ends: dict[int, dict[str, Any]], lost: list[str],
                 started: bool, cancel_sent: bool, complete: bool,
                 takes: list[TransferResult] | None) -> list[TransferResult]:
        """What the ranks' ends make of the job (see `run`)."""
        kinds = {end["event"] for end in ends.values()}
        stalled = any(end.get("code") == ErrorCode.GANG_STALLED for end in ends.values())
        if lost or not complete or stalled or len(kinds) != 1:
            # A rank may be stuck in a collective, or gone: rebuilt before the next job.
            # (Every rank ending alike, even in a failure they share, leaves it whole.)
            self.broken = True
        if lost:
            raise ActorLost(f"Gang {self.name} lost {', '.join(lost)} while holding job "
                            f"{job_id}; the gang is rebuilt.", started)
        if cancel_sent:
            raise JobCancelled("The edit was cancelled.")
        failures = [end for _, end in sorted(ends.items()) if end["event"] == "failed"]
        if failures:
            # A failure every rank shares (bad settings) is the job's own; a stall's
            # sentence comes before a peer's consequence of it.
            stalled = [end for end in failures if end["code"] == ErrorCode.GANG_STALLED]
            first = (stalled or failures)[0]
            raise UnderstudyError(first["message"], first["code"])
        if not complete:
            from backend.gang import stalled_sentence

            raise UnderstudyError(stalled_sentence(self.timeout_s, TimeoutError()),
                                  ErrorCode.GANG_STALLED)
        if takes is not None:
            return takes
        written = [end for end in ends.values() if end.get("frames") is not None]
        if len(written) != 1:
            raise UnderstudyError(f"Gang {self.name} returned {len(written)} results for one "
                                  "job; see the gateway log.", ErrorCode.INTERNAL)
        return [self._result(written[0])]

    def _result(self, event: dict[str, Any]) -> TransferResult:
        """A rank's "done" or "take" event as a result, its sidecar naming every rank."""
        sidecar = Sidecar.from_dict(event["sidecar"])
        return TransferResult(event["frames"], replace(sidecar, gang={
            **(sidecar.gang or {}), "pids": self.rank_pids()}), event.get("alpha"))


def _bundle(actor_options: dict[str, Any]) -> dict[str, float]:
    """One rank's placement bundle from a single worker's actor options: a GPU, or a slot."""
    if "num_gpus" in actor_options:
        return {"GPU": float(actor_options["num_gpus"])}
    return {name: float(amount) for name, amount in actor_options.get("resources", {}).items()}


class GangEngine:
    """The server's engine interface (backend/server/engine_api.py PooledEngine) served
    by one gang."""

    def __init__(self, runner: GangRunner, describe: Callable[[], dict[str, Any]]) -> None:
        self.runner = runner
        self._describe = describe

    @property
    def name(self) -> str:
        return self.runner.name

    def describe(self) -> dict[str, Any]:
        return self._describe()

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        from ray.exceptions import GetTimeoutError, RayActorError

        from backend.cluster.pool import CHECK_TIMEOUT_S

        if self.runner.broken:
            return  # being rebuilt: checked when the job runs
        try:
            self.runner.check_settings(settings.to_dict(), clip_length, frame_size,
                                       CHECK_TIMEOUT_S)
        except (GetTimeoutError, RayActorError):
            log.info("Gang %s is busy; the settings are checked when the job runs.",
                     self.runner.name)

    def wait_ready(self, stopping: Any) -> bool:
        """Rebuild the gang after a fault before it takes another job."""
        if not self.runner.broken:
            return True
        log.warning("Rebuilding gang %s (build %d).", self.runner.name, self.runner.builds + 1)
        try:
            return self.runner.build(stopping.is_set)
        except Exception as error:  # Ray could not place it, or a rank could not load
            log.error("Gang %s could not be rebuilt (%s); trying again in %.0f s.",
                      self.runner.name, error, PEERS_GRACE_S)
            stopping.wait(PEERS_GRACE_S)
            return False

    def transfer(self, clip_frames: Any, settings: TransferSettings,
                 progress: ProgressCallback | None = None, cancelled: CancelCheck | None = None,
                 masks: Any | None = None, savers: Any = None,
                 references: Any | None = None) -> TransferResult:
        return self.transfer_takes(clip_frames, settings, None, progress, cancelled, masks,
                                   savers, references=references)[0]

    def transfer_takes(self, clip_frames: Any, settings: TransferSettings,
                       takes: list[Take] | None, progress: ProgressCallback | None = None,
                       cancelled: CancelCheck | None = None, masks: Any | None = None,
                       savers: Any = None, batch_size: int | None = None,
                       on_take: TakeCallback | None = None,
                       references: Any | None = None) -> list[TransferResult]:
        """The job on every rank of the gang (`takes` None: a job of one take;
        `references` a PngReferences, its PNGs to every rank)."""
        import uuid

        from backend.cluster.engine_handles import png_frames

        return self.runner.run(f"run-{uuid.uuid4().hex}", settings.to_dict(),
                               png_frames(clip_frames), progress or _quiet,
                               cancelled or (lambda: False),
                               masks.png_bytes() if masks is not None else None,
                               savers.to_dict() if savers is not None else None,
                               None if takes is None else [
                                   {"prompt": take.prompt, "seed": take.seed} for take in takes],
                               batch_size, on_take,
                               references.png_bytes() if references else None)


class GangPool:
    """The gangs of one gateway: `count` GPUs (or slots) in gangs of `size`."""

    def __init__(self, connection: RayConnection, spec: ActorSpec, size: int,
                 timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
                 cancel_grace_s: float = 30.0) -> None:
        placement = connection.placement
        if size > placement.count:
            raise ClusterConfigError(
                f"--gang {size} needs {size} GPUs (or worker slots) on one node; the cluster "
                f"has {placement.count}, so use --gang {placement.count} or fewer.")
        if placement.torch_threads and not spec.torch_threads:
            spec = replace(spec, torch_threads=placement.torch_threads)
        self.connection = connection
        self.size = size
        self.runners = [GangRunner(f"gang{index}", connection, spec, size, timeout_s,
                                   cancel_grace_s)
                        for index in range(placement.count // size)]
        if placement.count % size:
            log.warning("%d GPUs (or slots) in gangs of %d leave %d unused.", placement.count,
                        size, placement.count % size)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Build every gang; every rank's identity."""
        identities = []
        for runner in self.runners:
            runner.build(timeout_s=timeout_s)
            identities += runner.identities
        return identities

    def engines(self) -> list[GangEngine]:
        return [GangEngine(runner, self.describe) for runner in self.runners]

    def describe(self) -> dict[str, Any]:
        """The welcome's engine: rank 0's, the number of gangs as `workers`, and `gang`."""
        first = self.runners[0].identity or {}
        return {**first.get("engine", {}), "workers": len(self.runners), "gang": self.size,
                "cluster": self.connection.target.label}

    def close(self) -> None:
        for runner in self.runners:
            runner.close()
