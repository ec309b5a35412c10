"""Jobs on Ray actors: a real private Ray instance (`local:3`) with the tiny model.

One Ray instance serves the module (starting Ray and its workers is the slow part).
Two workers form the main pool; the third slot is for a worker that ignores cancels.
The pool is driven the way the gateway drives it: a FIFO job book, a hand-off thread
per worker. Every wait ends on an event (a job's outcome, its first progress event,
an actor answering again); the timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import pytest

from backend.cluster.connect import (
    ClusterConfigError,
    RayTarget,
    _cluster_placement,
    _local_placement,
    connect,
    parse_ray_target,
    refuses_strangers,
)
from backend.cluster.pool import HandOff, WorkerPool
from backend.cluster.runner import ActorRunner, RemoteJobError, WorkerLost
from backend.cluster.worker import WorkerSpec
from backend.errors import JobCancelled
from shared.settings import TransferSettings
from tests.server_support import clip_pngs, settings

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
STEP_DELAY_S = 0.02  # as the server tests' --test-step-delay: long jobs can be caught mid-run
# About a hundred progress steps: long enough to be caught mid-run, short enough to re-run.
MEDIUM = {"steps": 40, "inversion_steps": 40, "guided_steps": 0}
LONG = {"steps": 1000, "inversion_steps": 1000, "guided_steps": 0}


@pytest.fixture(scope="module")
def connection(tmp_path_factory):
    connection = connect(RayTarget(address=None, local_slots=3),
                         tmp_path_factory.mktemp("ray-token"))
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def pool(connection, cache_dir):
    pool = WorkerPool(connection, WorkerSpec("tiny", device="cpu", cache_dir=cache_dir,
                                             step_delay_s=STEP_DELAY_S), count=2)
    pool.wait_ready()
    yield pool
    pool.close()


# --------------------------------------------------------------------------- a job book


@dataclass
class Job:
    job_id: str
    settings: dict
    inputs: list[bytes]
    attempts: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)


class FifoBook:
    """The least the hand-off needs from a job book: a FIFO queue, outcomes, and the
    gateway's crash rule for a lost worker (run the job again once, at the head)."""

    def __init__(self, jobs: list[Job]) -> None:
        self.queue = deque(jobs)
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.taken: list[str] = []
        self.outcomes: dict[str, tuple[str, object]] = {}
        self.lost: list[tuple[str, bool]] = []
        # job id → [(receipt time, worker name, (phase, step, total))]
        self.events: dict[str, list] = defaultdict(list)
        self.first_event = defaultdict(threading.Event)

    def add(self, job: Job) -> None:
        with self.changed:
            self.queue.append(job)
            self.changed.notify_all()

    def take(self) -> Job | None:
        with self.changed:
            while not self.queue and not self.stopping.is_set():
                self.changed.wait()
            if self.stopping.is_set():
                return None
            job = self.queue.popleft()
            job.attempts += 1
            self.taken.append(job.job_id)
            return job

    def run(self, job: Job, runner: ActorRunner) -> None:
        def progress(*event) -> None:
            self.events[job.job_id].append((time.monotonic(), runner.name, event))
            self.first_event[job.job_id].set()

        try:
            output = runner.run(job.job_id, job.settings, job.inputs, progress, job.cancel.is_set)
            outcome = ("done", output)
        except JobCancelled:
            outcome = ("cancelled", None)
        except RemoteJobError as error:
            outcome = ("failed", error)
        except WorkerLost as error:
            with self.changed:
                self.lost.append((job.job_id, error.started))
                if job.attempts < 2:
                    self.queue.appendleft(job)
                    self.changed.notify_all()
                    return
            outcome = ("failed", error)
        with self.changed:
            self.outcomes[job.job_id] = outcome
            self.changed.notify_all()

    def wait_for(self, job_ids: list[str]) -> dict[str, tuple[str, object]]:
        deadline = time.monotonic() + WAIT_S
        with self.changed:
            while not all(job_id in self.outcomes for job_id in job_ids):
                assert self.changed.wait(timeout=deadline - time.monotonic()), self.outcomes
            return {job_id: self.outcomes[job_id] for job_id in job_ids}

    def wait_first_event(self, job_id: str) -> str:
        """Block until the job reports progress; the name of the worker running it."""
        assert self.first_event[job_id].wait(WAIT_S), f"{job_id} never started"
        return self.events[job_id][0][1]

    def stop(self) -> None:
        with self.changed:
            self.stopping.set()
            self.changed.notify_all()


@pytest.fixture
def serve_jobs(pool):
    """Start hand-off threads over a FifoBook of these jobs; stopped after the test."""
    started = []

    def start(jobs: list[Job], target_pool: WorkerPool = pool) -> FifoBook:
        book = FifoBook(jobs)
        hand_off = HandOff(target_pool, book.take, book.run, book.stopping)
        hand_off.start()
        started.append((book, hand_off))
        return book

    yield start
    for book, hand_off in started:
        book.stop()
        hand_off.join(timeout_s=WAIT_S)


def job(job_id: str, **overrides) -> Job:
    return Job(job_id, settings(job_id, seed=1, **overrides), clip_pngs(6))


def pid_of(pool: WorkerPool, worker_name: str) -> int:
    return next(runner.identity["pid"] for runner in pool.runners if runner.name == worker_name)


# --------------------------------------------------------------------------- tests


def test_workers_hold_a_warm_engine_and_ray_refuses_clients_without_the_token(
        connection, pool):
    identities = [runner.identity for runner in pool.runners]
    assert [identity["actor"] for identity in identities] == ["worker-0", "worker-1"]
    assert len({identity["pid"] for identity in identities}) == 2
    assert all(identity["engine"] == {"model": "tiny", "device": "cpu", "dtype": "float32"}
               for identity in identities)
    assert pool.describe()["workers"] == 2 and pool.describe()["model"] == "tiny"
    assert connection.placement.description == "3 worker slots on CPU"
    assert os.stat(connection.token_path).st_mode & 0o077 == 0  # the token is the user's only
    assert refuses_strangers(connection.gcs_address)


def test_settings_are_checked_on_a_worker(pool):
    pool.check_settings(TransferSettings.from_dict(settings()), 6)
    with pytest.raises(RemoteJobError) as caught:
        pool.check_settings(TransferSettings.from_dict(settings(steps=2, inversion_steps=3)), 6)
    assert caught.value.code == "bad_settings" and str(caught.value).endswith(".")


def test_jobs_run_on_different_workers_at_the_same_time(serve_jobs):
    jobs = [job(f"parallel-{index}", **MEDIUM) for index in range(4)]
    book = serve_jobs(jobs)
    outcomes = book.wait_for([item.job_id for item in jobs])
    assert {state for state, _ in outcomes.values()} == {"done"}
    assert book.taken == [item.job_id for item in jobs]  # first come, first served
    ran_on = {job_id: output.sidecar["worker"]["actor"] for job_id, (_, output) in outcomes.items()}
    assert set(ran_on.values()) == {"worker-0", "worker-1"}
    # each job's events came from the worker its sidecar names
    for job_id, events in book.events.items():
        assert {name for _, name, _ in events} == {ran_on[job_id]}
    # two jobs on different workers were running at once: each one's first event
    # arrived before the other's last
    spans = {job_id: (events[0][0], events[-1][0]) for job_id, events in book.events.items()}
    assert any(spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
               for a in spans for b in spans if ran_on[a] != ran_on[b])
    for job_id, (_, output) in outcomes.items():
        assert len(output.frames) == 4 and output.sidecar["settings"]["prompt"] == job_id


def test_cancel_a_job_running_on_a_worker(pool, serve_jobs):
    victim = job("cancel-me", **LONG)
    book = serve_jobs([victim])
    worker = book.wait_first_event("cancel-me")
    pid = pid_of(pool, worker)
    victim.cancel.set()
    assert book.wait_for(["cancel-me"])["cancel-me"][0] == "cancelled"
    # cooperative: the engine stopped between steps, the worker was not killed
    runner = next(runner for runner in pool.runners if runner.name == worker)
    assert runner.wait_ready()["pid"] == pid
    book.add(job("after-cancel"))
    assert book.wait_for(["after-cancel"])["after-cancel"][0] == "done"


def test_worker_killed_mid_job_is_restarted_and_the_job_runs_again(pool, serve_jobs):
    jobs = [job("killed-mid-job", **MEDIUM), job("alongside", **MEDIUM)]
    book = serve_jobs(jobs)
    worker = book.wait_first_event("killed-mid-job")
    pid = pid_of(pool, worker)
    os.kill(pid, signal.SIGKILL)
    outcomes = book.wait_for(["killed-mid-job", "alongside"])
    assert {state for state, _ in outcomes.values()} == {"done"}  # 0 lost
    assert book.lost == [("killed-mid-job", True)]
    assert jobs[0].attempts == 2 and jobs[1].attempts == 1
    assert book.taken.count("killed-mid-job") == 2
    runner = next(runner for runner in pool.runners if runner.name == worker)
    back = runner.wait_ready()
    assert back["pid"] != pid and back["restarted"] is True
    assert back["engine"]["model"] == "tiny"


def test_a_worker_that_ignores_a_cancel_is_killed_and_comes_back(connection, cache_dir,
                                                                 serve_jobs):
    # Each progress step sleeps for ten minutes, so the engine never reaches the
    # cancel check: only the hard kill after the grace period can stop the job.
    stuck = WorkerPool(connection, WorkerSpec("tiny", device="cpu", cache_dir=cache_dir,
                                              step_delay_s=600), cancel_grace_s=1.0, count=1,
                       name_prefix="stuck")
    try:
        first = stuck.wait_ready()[0]
        victim = job("ignores-cancel")
        book = serve_jobs([victim], target_pool=stuck)
        book.wait_first_event("ignores-cancel")
        victim.cancel.set()
        assert book.wait_for(["ignores-cancel"])["ignores-cancel"][0] == "cancelled"
        back = stuck.runners[0].wait_ready()
        assert back["pid"] != first["pid"] and back["restarted"] is True
    finally:
        stuck.close()


# --------------------------------------------------------------------------- set-up errors


def test_ray_addresses():
    assert parse_ray_target("auto") == RayTarget(address="auto")
    assert parse_ray_target("local:3") == RayTarget(address=None, local_slots=3)
    assert parse_ray_target("10.0.0.5:6379") == RayTarget(address="10.0.0.5:6379")
    for bad in ("local:0", "local:x", "gpu-box", "", "ray start"):
        with pytest.raises(ClusterConfigError) as caught:
            parse_ray_target(bad)
        assert str(caught.value).endswith(".") and "--ray" in str(caught.value)


def test_placement_one_worker_per_gpu_or_slot():
    assert _cluster_placement({"GPU": 4.0, "CPU": 64.0}, "auto").actor_options == {"num_gpus": 1}
    assert _cluster_placement({"GPU": 4.0}, "auto").count == 4
    slots = _cluster_placement({"CPU": 8.0, "understudy_slot": 2.0}, "auto")
    assert slots.count == 2 and slots.actor_options["resources"] == {"understudy_slot": 1}
    with pytest.raises(ClusterConfigError, match="has no GPUs; run `ray start` on GPU machines"):
        _cluster_placement({"CPU": 8.0}, "auto")
    with pytest.raises(ClusterConfigError, match="this machine has 1 GPU; use local:1"):
        _local_placement({"GPU": 1.0, "CPU": 8.0}, 3)
    assert _local_placement({"CPU": 2.0}, 2).torch_threads == 1
