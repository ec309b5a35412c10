"""Jobs on Ray workers: real private Ray instances (`local:N`) and the tiny model.

Three parts, each paying for its own Ray start-up once:
- the worker pool in this process (`local:2`): warm engines, Ray's token
  authentication, the hard kill of a worker that ignores a cancel;
- a real gateway, `python -m backend serve --ray local:2`, shared by its tests: jobs
  from several clients at once, cancel, a worker SIGKILLed mid-job;
- a gateway SIGKILLed with jobs in flight and started again.

Every wait ends on an event (a reply, a job's state, a process exit, an actor answering
again); the timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

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
from backend.cluster.engine_actor import ActorSpec
from backend.cluster.gateway import smallest_gpu
from backend.cluster.pool import ActorPool
from backend.errors import JobCancelled, UnderstudyError
from backend.server.book import WORKER_LOST_TWICE, JobBook, Retention
from backend.server.store import Job, JobStore
from shared.client import Client, JobCancelledError, JobRejected, UnknownJob
from shared.settings import MEMORY_SAVERS, TransferSettings
from tests.conftest import REPO_ROOT
from tests.delivery import SCENARIOS
from tests.server_support import (
    LONG,
    ServerProcess,
    clip_pngs,
    mask_pngs,
    settings,
    subprocess_env,
    wait_for_event,
    wait_until,
)

# Every test of the modules that share one local Ray instance runs in one test process
# when the suite runs in parallel (build.py test): two Ray heads at once would compete
# for the CPU their start-up timeouts assume.
pytestmark = pytest.mark.xdist_group("ray")

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
STEP_DELAY = "0.02"  # as in the server tests: a job with many steps can be caught mid-run
# About seventy progress steps (1.5 s at the step delay): long enough to overlap another
# job, short enough to run twice. VICTIM: a few seconds, so it is still running when the
# test, having seen it report progress, kills its worker.
MEDIUM = {"steps": 24, "inversion_steps": 24, "guided_steps": 0}
VICTIM = {"steps": 60, "inversion_steps": 60, "guided_steps": 0}
# A job that only has to run through (queued behind the victims, say).
QUICK = {"steps": 3, "inversion_steps": 3, "guided_steps": 0}


@pytest.fixture
def connect_client():
    """Make clients that are closed after the test."""
    clients = []

    def make(address: str) -> Client:
        client = Client(address, timeout_s=30.0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# --------------------------------------------------------------------------- the pool


# Class scope: this Ray instance is gone before the gateways below start theirs.
@pytest.fixture(scope="class")
def connection(tmp_path_factory):
    # connect() turns token mode on for this process and its children; the servers
    # started by later tests must not inherit this instance's token.
    saved = {name: value for name, value in os.environ.items() if name.startswith("RAY_AUTH")}
    connection = connect(RayTarget(address=None, local_slots=2),
                         tmp_path_factory.mktemp("ray-token"))
    yield connection
    connection.close()
    for name in [name for name in os.environ if name.startswith("RAY_AUTH")]:
        del os.environ[name]
    os.environ.update(saved)


@pytest.fixture(scope="class")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="class")
def pool(connection, cache_dir):
    pool = ActorPool(connection, ActorSpec("tiny", device="cpu", cache_dir=cache_dir),
                      count=1)
    pool.wait_ready()
    yield pool
    pool.close()


class TestActorPool:
    """The pool driven directly, in this process, on a private `local:2` instance."""

    def test_a_worker_holds_a_warm_engine_and_ray_refuses_clients_without_the_token(
            self, connection, pool):
        identity = pool.runners[0].identity
        assert identity["actor"] == "worker-0" and identity["pid"] != os.getpid()
        engine = {"model": "tiny", "device": "cpu", "dtype": "float32", "upscaler": None}
        assert identity["engine"].items() >= engine.items()
        assert identity["engine"]["backbone"]["name"] == "zeroscope"
        assert identity["gpu"] is None and identity["restarted"] is False
        assert pool.describe().items() >= {**engine, "workers": 1, "cluster": "local:2"}.items()
        assert connection.placement.description == "2 worker slots on CPU"
        assert os.stat(connection.token_path).st_mode & 0o077 == 0  # the token is ours only
        assert os.environ["RAY_AUTH_MODE"] == "token"
        assert refuses_strangers(connection.gcs_address)

    def test_settings_are_checked_on_a_worker(self, pool):
        pool.check_settings(TransferSettings.from_dict(settings()), 6)
        with pytest.raises(UnderstudyError) as caught:
            pool.check_settings(TransferSettings.from_dict(settings(steps=2, inversion_steps=3)),
                                6)
        assert caught.value.code == "bad_settings" and str(caught.value).endswith(".")

    def test_a_worker_loads_the_wan_backbone_and_runs_its_job(self, connection, cache_dir,
                                                              tiny_wan_dir):
        wan = ActorPool(connection, ActorSpec(str(tiny_wan_dir), device="cpu", cache_dir=cache_dir),
                        count=1, name_prefix="wan")
        try:
            identity = wan.wait_ready()[0]
            assert identity["engine"]["backbone"]["name"] == "wan"
            assert wan.describe()["backbone"]["window_frames"] == 81
            [outcome] = wan.runners[0].run("wan-on-ray", settings(num_frames=5, seed=2),
                                           clip_pngs(6), lambda *step: None, lambda: False)
            assert outcome.frames.shape[0] == 5 and outcome.sidecar.backbone == "wan"
        finally:
            wan.close()

    def test_a_worker_that_ignores_a_cancel_is_killed_and_comes_back(self, connection,
                                                                     cache_dir):
        # Every progress step sleeps ten minutes, so the engine never reaches its
        # cancel check: only the kill after the grace period can end the job.
        stuck = ActorPool(connection, ActorSpec("tiny", device="cpu", cache_dir=cache_dir,
                                                  step_delay_s=600),
                           cancel_grace_s=1.0, count=1, name_prefix="stuck")
        try:
            runner = stuck.runners[0]
            before = stuck.wait_ready()[0]
            running, cancel, ended = threading.Event(), threading.Event(), []

            def run() -> None:
                try:
                    runner.run("ignores-cancel", settings(), clip_pngs(6),
                               lambda *step: running.set(), cancel.is_set)
                    ended.append("done")
                except JobCancelled:
                    ended.append("cancelled")

            thread = threading.Thread(target=run)
            thread.start()
            assert running.wait(WAIT_S)
            cancel.set()
            thread.join(WAIT_S)
            assert ended == ["cancelled"]
            after = runner.wait_ready()
            assert after["pid"] != before["pid"] and after["restarted"] is True
            assert after["engine"]["model"] == "tiny"
        finally:
            stuck.close()


# --------------------------------------------------------------------------- the gateway


def engine_workers(gateway: ServerProcess) -> list[int]:
    """The pids of the gateway's Ray worker actors (processes titled ray::EngineActor)."""
    return [pid for pid in descendants(gateway.process.pid)
            if command_line(pid).startswith("ray::EngineActor")]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc)."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[parent].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children[todo.pop()]:
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def ray_cluster(token_auth: bool = True):
    """A Ray cluster started as the README says (`ray start --head`), on this machine.

    Yields the environment a gateway needs to join it with `--ray auto`; its own
    RAY_TMPDIR keeps `auto` from finding any other Ray instance on the machine. It runs
    in a session of its own, which is how its processes are found and ended afterwards
    (`ray stop` would end every Ray instance of this user).
    """
    folder = Path(tempfile.mkdtemp(prefix="us-ray-"))  # short: Ray's socket paths must fit
    token = folder / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (folder / "home").mkdir()
    env = {**subprocess_env(), "RAY_TMPDIR": str(folder / "tmp"), "RAY_AUTH_TOKEN_PATH": str(token)}
    ray_env = {**env, "RAY_AUTH_MODE": "token"} if token_auth else {
        **{name: value for name, value in env.items() if name != "RAY_AUTH_TOKEN_PATH"},
        "RAY_AUTH_MODE": "disabled", "HOME": str(folder / "home")}
    start = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--port=0",
         "--num-cpus=1", "--num-gpus=0", '--resources={"understudy_slot": 2}',
         "--include-dashboard=false", "--disable-usage-stats"],
        env=ray_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        output, _ = start.communicate(timeout=WAIT_S)
        assert start.returncode == 0, output
        yield env
    finally:
        ours = in_session(start.pid)
        for pid in ours:
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in ours), "the Ray cluster stopped")
        shutil.rmtree(folder, ignore_errors=True)


def in_session(session: int) -> list[int]:
    """Live processes of this session (Linux /proc: field 6 of stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == session:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return [pid for pid in found if alive(pid)]


def running_jobs(client: Client, job_ids: list[str]) -> list[str]:
    """The jobs a worker is running now: they have reported progress from it."""
    running = []
    for job_id in job_ids:
        job = client.status(job_id)
        if job["state"] == "running" and job["phase"] not in (None, "start"):
            running.append(job_id)
    return running


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("gateway") / "state", "--ray", "local:2",
                            "--test-step-delay", STEP_DELAY).start()
    yield process
    process.stop()


def test_jobs_from_several_clients_run_on_different_workers_at_once(gateway, connect_client):
    clients = [connect_client(gateway.address) for _ in range(3)]
    assert clients[0].hello()["engine"]["workers"] == 2
    job_ids = [f"client-{index}" for index in range(3)]
    events = defaultdict(list)

    def run(index: int):
        clients[index].submit(job_ids[index], settings(f"prompt {index}", seed=index, **MEDIUM),
                              clip_pngs(6, shade=40 * index))
        return clients[index].wait(job_ids[index], timeout_s=WAIT_S,
                                   on_event=lambda event: events[index].append(time.monotonic()))

    with ThreadPoolExecutor(max_workers=3) as submitters:  # one thread per editor
        results = dict(enumerate(submitters.map(run, range(3))))
    ran_on = {index: result.sidecar["worker"]["actor"] for index, result in results.items()}
    assert set(ran_on.values()) == {"worker-0", "worker-1"}
    for index, result in results.items():
        assert result.sidecar["settings"]["prompt"] == f"prompt {index}"
        assert result.sidecar["worker"]["host"] and result.sidecar["worker"]["gpu"] is None
        assert [job["job_id"] for job in clients[index].status()["jobs"]] == [job_ids[index]]
    # each worker keeps its own inversion cache (no --shared-cache)
    per_worker = gateway.state_dir.parent / "cache" / "workers"
    assert {folder.name for folder in per_worker.iterdir() if any(folder.iterdir())} == {
        "worker-0", "worker-1"}
    # Two jobs on different workers ran at the same time: each one's first progress
    # event reached its client before the other's last, and the gateway's own start
    # and finish times overlap the same way.
    status = {index: clients[index].status(job_ids[index]) for index in results}
    pairs = [(a, b) for a in results for b in results if a < b and ran_on[a] != ran_on[b]]
    assert any(events[a][0] < events[b][-1] and events[b][0] < events[a][-1]
               and status[a]["started_at"] < status[b]["finished_at"]
               and status[b]["started_at"] < status[a]["finished_at"] for a, b in pairs)


def test_a_job_with_a_region_keeps_the_plate_on_a_worker(gateway, connect_client):
    """The masks travel to the Ray worker with the clip, and the feathered region comes
    back as the result's alpha, as on one box (tests/test_server.py)."""
    import io

    import numpy as np
    from PIL import Image

    from backend.video import decode_pngs

    client = connect_client(gateway.address)
    clip = clip_pngs(6)
    client.submit("region-ray", settings(region_grow=2, region_feather=2), clip,
                  masks=[mask_pngs(6)])
    result = client.wait("region-ray", timeout_s=WAIT_S)
    assert result.sidecar["worker"]["actor"] in ("worker-0", "worker-1")
    assert result.sidecar["regions"]["composited"]
    source = decode_pngs(clip)[result.sidecar["input_frame_indices"]]
    outside = np.ones((32, 48), bool)
    outside[8 - 2:24 + 2, 16 - 2:32 + 2] = False  # the mask's box, grown by 2 px
    for frame, plate in zip(result.frames, source, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(frame)))
        assert (pixels[..., :3][outside] == plate[outside]).all()
        assert (pixels[..., 3][outside] == 0).all() and pixels[..., 3].max() == 255


def test_a_job_of_several_takes_runs_whole_on_one_worker_and_its_takes_pass_through(
        gateway, connect_client):
    """Issue 27: the takes go to one worker (one inversion there); each take's
    take_ready event and its fetch pass through the gateway as on one box."""
    client = connect_client(gateway.address)
    client.submit("takes-ray", settings(seed=3), clip_pngs(6), takes=2)
    ready = [wait_for_event(client, "takes-ray", "take_ready", take=take) for take in (1, 2)]
    assert [(event["takes"], event["frame_count"]) for event in ready] == [(2, 4), (2, 4)]
    result = client.wait("takes-ray", timeout_s=WAIT_S)
    fetched = [client.fetch("takes-ray", take=take) for take in (1, 2)]
    assert [take.sidecar["seed"] for take in fetched] == [3, 4]
    workers = {(take.sidecar["worker"]["actor"], take.sidecar["worker"]["pid"])
               for take in fetched}
    assert len(workers) == 1  # one worker made both, from the one inversion it holds
    assert fetched[0].sidecar["inversion_from_cache"] == fetched[1].sidecar["inversion_from_cache"]
    assert result.frames == fetched[0].frames  # the job's result is take 1
    assert [take["seed"] for take in result.sidecar["takes"]] == [3, 4]
    assert client.status("takes-ray")["takes_done"] == [1, 2]


def test_a_job_with_a_reference_runs_on_a_wan_vace_worker(tmp_path, connect_client):
    """Issue 28: the gateway announces its workers' max_references (Wan VACE's 3), and the
    reference images travel to the worker with the clip; the sidecar records them."""
    import numpy as np

    from backend.video import encode_png

    vace = ServerProcess(tmp_path / "state", "--model", "wan-vace-tiny", "--ray", "local:1").start()
    try:
        client = connect_client(vace.address)
        assert client.hello()["max_references"] == 3
        look = encode_png(np.full((40, 48, 3), (250, 220, 30), np.uint8))
        client.submit("look-ray", settings(), clip_pngs(5), references=[look])
        result = client.wait("look-ray", timeout_s=WAIT_S)
        assert result.sidecar["worker"]["actor"] == "worker-0"
        assert result.sidecar["backbone"] == "wan-vace"
        assert [(entry["width"], entry["height"]) for entry in result.sidecar["references"]] \
            == [(48, 40)]
    finally:
        vace.stop()


def test_cancel_a_job_running_on_a_worker(gateway, connect_client):
    client = connect_client(gateway.address)
    client.submit("cancel-me", settings(**LONG), clip_pngs(6))
    wait_for_event(client, "cancel-me", "progress")  # running on a worker
    assert client.cancel("cancel-me")["cancel_requested"] is True
    with pytest.raises(JobCancelledError):
        client.wait("cancel-me", timeout_s=WAIT_S)
    assert client.status("cancel-me")["state"] == "cancelled"
    client.submit("after-cancel", settings(), clip_pngs(6))
    assert len(client.wait("after-cancel", timeout_s=WAIT_S).frames) == 4


def test_a_worker_killed_mid_job_is_restarted_and_its_job_runs_again(gateway,
                                                                     connect_client):
    client = connect_client(gateway.address)
    job_ids = ["victim-a", "victim-b"]
    for index, job_id in enumerate(job_ids):
        client.submit(job_id, settings(job_id, seed=index, **VICTIM), clip_pngs(6, shade=index))
    # both running: each holds one of the two workers
    wait_until(lambda: running_jobs(client, job_ids) == job_ids, "both jobs running")
    workers = engine_workers(gateway)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    results = {job_id: client.wait(job_id, timeout_s=WAIT_S) for job_id in job_ids}
    attempts = sorted(client.status(job_id)["attempts"] for job_id in job_ids)
    assert attempts == [1, 2]  # the killed worker's job ran once more; 0 lost
    assert all(len(result.frames) == 4 for result in results.values())
    assert workers[0] not in {result.sidecar["worker"]["pid"] for result in results.values()}
    # Ray brought the worker back: two workers again, one of them new
    wait_until(lambda: len(engine_workers(gateway)) == 2 and workers[0] not in
               engine_workers(gateway), "the killed worker restarted")
    assert gateway.log().count("was lost while holding job") == 1


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_every_reply_arrives_and_every_result_is_fetched_behind_the_gateway(gateway, scenario):
    """Issue 17.1 on two Ray workers: the scenarios of tests/delivery.py."""
    clients: list[Client] = []

    def make_client(address: str) -> Client:
        clients.append(Client(address))  # the default timeout: a lost reply fails the test
        return clients[-1]

    try:
        scenario(gateway.address, make_client, "ray-" + scenario.__name__.replace("_", "-")[:36])
    finally:
        for client in clients:
            client.close()


def test_the_gateway_killed_with_jobs_in_flight_finishes_every_job_exactly_once(
        tmp_path, connect_client):
    with ray_cluster() as env:  # the studio's cluster: it outlives the gateway
        gateway = ServerProcess(tmp_path / "state", "--ray", "auto", "--test-step-delay",
                                STEP_DELAY, env=env).start()
        try:
            client = connect_client(gateway.address)
            assert client.hello()["engine"]["cluster"] == "auto"
            job_ids = [f"in-flight-{index}" for index in range(4)]
            for index, job_id in enumerate(job_ids):
                client.submit(job_id, settings(job_id, seed=index,
                                               **(VICTIM if index < 2 else QUICK)),
                              clip_pngs(6, shade=30 * index))
            wait_until(lambda: len(running_jobs(client, job_ids)) == 2, "two jobs running")
            running = running_jobs(client, job_ids)
            old_workers = engine_workers(gateway)
            gateway.kill()
            # the workers die with the gateway that owns them: no job runs on unattended
            wait_until(lambda: not any(alive(pid) for pid in old_workers), "the workers ended")
            gateway.start()  # same address, same state folder, same cluster
            assert client.hello()["engine"]["workers"] == 2  # the same client id reconnects
            results = {job_id: client.wait(job_id, timeout_s=WAIT_S) for job_id in job_ids}
            for job_id in job_ids:
                job = client.status(job_id)
                assert job["state"] == "done"
                assert job["attempts"] == (2 if job_id in running else 1)
                assert results[job_id].sidecar["settings"]["prompt"] == job_id
                assert results[job_id].sidecar["worker"]["pid"] not in old_workers
            # delivered exactly once: one "done" across both gateways' logs (a job's
            # status says done as soon as it is recorded, a moment before its log line)
            def done_lines() -> dict[str, int]:
                log = gateway.log()
                return {job_id: len(re.findall(rf"Job {job_id} done\.", log))
                        for job_id in job_ids}

            wait_until(lambda: all(done_lines().values()), "every job's done line logged")
            assert done_lines() == {job_id: 1 for job_id in job_ids}
        finally:
            gateway.stop()


def test_a_gateway_plans_each_job_for_its_workers_gpus(tmp_path, connect_client):
    """`--memory auto` behind `--ray`: the worker reports the GPU it was told it has, the
    gateway plans for it, refuses before queueing what cannot fit, and the savers it
    chose reach the worker and the sidecar (as on one box, tests/test_memory_server.py)."""
    from backend.memory.planner import choose_savers
    from tests.test_memory_server import BIG, CLIP_SIZE, tiny_plan

    quick = tiny_plan()
    budget = min(c["peak_bytes"] for c in quick.combinations) + 256  # the quick job fits
    chosen = choose_savers(quick, budget)
    gateway = ServerProcess(tmp_path / "state", "--ray", "local:1", "--assume-gpu-memory-gb",
                            repr(budget / 2**30)).start()
    try:
        client = connect_client(gateway.address)
        hello = client.hello()
        assert (hello["gpu"]["budget_bytes"], hello["gpu"]["assumed"]) == (budget, True)
        assert hello["memory_savers"] == list(MEMORY_SAVERS)
        planned = client.plan(settings(), 6, CLIP_SIZE)
        assert (planned["fits"], planned["savers"]) == (True, list(chosen.savers))
        assert planned["predicted_peak_bytes"] == chosen.peak_bytes
        # BIG cannot fit with any savers (the gateway's plan, which its submit finds made).
        big = client.plan(settings(**BIG), 6, CLIP_SIZE)
        assert big["fits"] is False and big["predicted_peak_bytes"] > budget
        with pytest.raises(JobRejected) as refused:
            client.submit("too-big-for-every-worker", settings(**BIG), clip_pngs())
        assert refused.value.code == "too_big_for_gpu"
        assert str(refused.value).startswith("This edit needs about ")
        with pytest.raises(UnknownJob):
            client.status("too-big-for-every-worker")  # nothing was queued
        client.submit("fits-the-workers", settings(), clip_pngs())
        result = client.wait("fits-the-workers", timeout_s=WAIT_S)
        assert result.sidecar["worker"]["actor"] == "worker-0"
        assert result.sidecar["memory"] == {"savers": list(chosen.savers),
                                            "predicted_peak_bytes": chosen.peak_bytes,
                                            "budget_bytes": budget}
    finally:
        gateway.stop()


def test_the_gateway_plans_for_the_smallest_gpu_among_its_workers():
    def worker(name: str, budget: int) -> dict:
        return {"memory": {"name": name, "total_bytes": budget + 10, "free_bytes": budget,
                           "budget_bytes": budget, "assumed": False}}

    workers = [worker("A", 24 * 10**9), worker("B", 16 * 10**9), worker("C", 80 * 10**9)]
    assert smallest_gpu(workers)["name"] == "B"
    # a worker not heard from yet, or on a CPU, sets no bound; none with a GPU: no plan
    assert smallest_gpu([None, {"memory": None}, *workers]) == workers[1]["memory"]
    assert smallest_gpu([None, {"memory": None}]) is None


def test_a_job_whose_worker_dies_twice_fails_and_a_try_that_never_began_is_free(tmp_path):
    """The job book's rule for a lost worker, as the gateway's worker threads use it."""
    store = JobStore(tmp_path)
    book = JobBook(store, max_queue=4, retention=Retention())
    book.add(Job(job_id="lost", seq=0, client="c-1", owner=None, digest="d",
                 submitted_at=time.time()), {"prompt": "p"}, [b"png"])
    never_stop = threading.Event()

    def lose(attempt_counts: bool) -> tuple[bool, dict]:
        assert book.claim_next(never_stop, wait_s=0).job_id == "lost"
        failed = book.worker_lost("lost", attempt_counts)
        return failed, book.view("lost", None)

    failed, job = lose(attempt_counts=False)  # the worker died before the edit began
    assert not failed and job["state"] == "queued" and job["attempts"] == 0
    failed, job = lose(attempt_counts=True)
    assert not failed and job["state"] == "queued" and job["attempts"] == 1
    assert json.loads((store.folder("lost") / "status.json").read_text())["state"] == "queued"
    failed, job = lose(attempt_counts=True)
    assert failed and job["state"] == "failed" and job["attempts"] == 2
    assert job["error"] == {"code": "interrupted", "message": WORKER_LOST_TWICE}


# --------------------------------------------------------------------------- set-up errors


def serve(*arguments: str, **env: str) -> subprocess.CompletedProcess:
    """`serve` expected to stop at once with an error."""
    return subprocess.run([sys.executable, "-m", "backend", "serve", "--model", "tiny",
                           *arguments], cwd=REPO_ROOT, env={**subprocess_env(), **env},
                          capture_output=True, text=True, timeout=WAIT_S)


def test_ray_errors_a_user_can_cause_are_one_sentence(tmp_path):
    refused = serve("--ray", "gpu-box", "--state-dir", str(tmp_path / "state"))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: --ray 'gpu-box' is not a Ray address; give `auto` (the cluster started on "
        "this machine with `ray start`), HOST:PORT of the head node, or local:N for a "
        "private instance with N workers."]
    no_env_token = {name: "" for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    tokenless = serve("--ray", "127.0.0.1:9", "--state-dir", str(tmp_path / "state"),
                      HOME=str(tmp_path), **no_env_token)
    assert tokenless.returncode == 1
    assert tokenless.stderr.strip().splitlines() == [
        "error: Understudy joins Ray clusters with token authentication and this machine has "
        "no Ray token; copy the cluster's token (`ray get-auth-token` on the head) to "
        "~/.ray/auth_token or point RAY_AUTH_TOKEN_PATH at it."]
    stray = serve("--shared-cache", "--state-dir", str(tmp_path / "state"))
    assert stray.returncode == 1 and "only makes sense with --ray" in stray.stderr


def test_a_ray_cluster_without_token_authentication_is_refused(tmp_path):
    with ray_cluster(token_auth=False) as env:
        refused = serve("--ray", "auto", "--state-dir", str(tmp_path / "state"), **env)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: The Ray cluster at auto accepts clients without a token; restart it with "
        "token authentication (`ray get-auth-token --generate`, then `RAY_AUTH_MODE=token "
        "ray start ...` on every node with that token).")


def test_without_ray_installed_serve_ray_says_what_to_install(tmp_path):
    # sys.modules["ray"] = None makes `import ray` fail as on a machine without Ray
    code = ("import sys\nsys.modules['ray'] = None\nfrom backend.cli import main\n"
            f"sys.exit(main(['serve', '--model', 'tiny', '--ray', 'local:1', '--state-dir', "
            f"{str(tmp_path / 'state')!r}]))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --ray needs Ray, which is not installed here; install the cluster extra "
        "(`pip install '.[cluster]'` in the project, or `pip install 'ray>=2.60'`).")


def test_the_single_box_server_never_imports_ray():
    code = ("import sys, backend.cli, backend.server, backend.server.app\n"
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=WAIT_S)
    assert result.stdout.strip() == "False", result.stderr


def test_the_inversion_cache_is_per_worker_unless_shared(tmp_path):
    assert ActorSpec("tiny", cache_dir=tmp_path).cache_for("worker-1") == (
        tmp_path / "workers" / "worker-1")
    assert ActorSpec("tiny", cache_dir=tmp_path, shared_cache=True).cache_for("worker-1") == (
        tmp_path)


def test_ray_addresses():
    assert parse_ray_target("auto") == RayTarget(address="auto")
    assert parse_ray_target("local:3") == RayTarget(address=None, local_slots=3)
    assert parse_ray_target("10.0.0.5:6379") == RayTarget(address="10.0.0.5:6379")
    for bad in ("local:0", "local:x", "gpu-box", "", "ray start"):
        with pytest.raises(ClusterConfigError) as caught:
            parse_ray_target(bad)
        assert str(caught.value).endswith(".") and "local:" in str(caught.value)


def test_placement_one_worker_per_gpu_or_slot():
    gpus = _cluster_placement({"GPU": 4.0, "CPU": 64.0}, "auto")
    assert gpus.count == 4 and gpus.actor_options == {"num_gpus": 1}
    slots = _cluster_placement({"CPU": 8.0, "understudy_slot": 2.0}, "auto")
    assert slots.count == 2 and slots.actor_options["resources"] == {"understudy_slot": 1}
    with pytest.raises(ClusterConfigError, match="has no GPUs; run `ray start` on GPU machines"):
        _cluster_placement({"CPU": 8.0}, "auto")
    assert _local_placement({"GPU": 2.0, "CPU": 8.0}, 2).actor_options == {"num_gpus": 1}
    with pytest.raises(ClusterConfigError, match="this machine has 1 GPU; use local:1"):
        _local_placement({"GPU": 1.0, "CPU": 8.0}, 3)
    assert _local_placement({"CPU": 2.0}, 2).torch_threads == 1
