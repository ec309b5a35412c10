"""Takes through the job server (issue 27, docs/protocol.md §4 Takes): a real `serve`
process on loopback, its takes delivered one by one, a cancel and a kill mid-takes.

The servers here hold each job after every take they announce (`--test-take-gate`)
until the test lets it go on by writing the gate file, so "while the job runs" and
"after the first take, before the second" are states the test reaches for certain,
not by timing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.edit import load_engine
from backend.results import takes_of
from backend.video import decode_pngs
from shared.client import Client, JobCancelledError, JobRejected
from shared.settings import TransferSettings
from tests.server_support import (
    ServerProcess,
    clip_pngs,
    one_reply_server,
    settings,
    wait_for_event,
)

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
LEVELS = 1  # batched arithmetic may round a level apart (tests/test_takes.py)
SEED = 21


def gated(state_dir: Path) -> ServerProcess:
    return ServerProcess(state_dir, "--test-take-gate", str(state_dir.parent / "take-gate"))


def let_go(server: ServerProcess) -> None:
    """Let the held job make its next take."""
    (server.state_dir.parent / "take-gate").write_text("go")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = gated(tmp_path_factory.mktemp("takes") / "state").start()
    yield process
    process.stop()


@pytest.fixture
def client(server):
    with Client(server.address, timeout_s=30.0) as made:
        yield made


@pytest.fixture(scope="module")
def local_takes(tmp_path_factory):
    """The takes made on this machine, by the engine the command line runs: what the
    server's takes must equal. Keyed by (prompt, seed)."""
    engine = load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))
    clip = decode_pngs(clip_pngs(6))
    made = {}
    for prompts, seeds in ((["a red train", "a cat"], 2), (["a bear walking"], 3)):
        parsed = TransferSettings.from_dict(settings(prompts[0], seed=SEED))
        for take, result in zip(takes_of(prompts, SEED, seeds),
                                engine.transfer_takes(clip, parsed, takes_of(prompts, SEED, seeds)),
                                strict=True):
            made[take.prompt, take.seed] = result.frames
    return made


def assert_is_local_take(fetched, local_takes) -> None:
    frames = decode_pngs(fetched.frames)
    expected = local_takes[fetched.sidecar["prompt"], fetched.sidecar["seed"]]
    assert frames.shape == expected.shape
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= LEVELS


def test_takes_arrive_one_by_one_each_fetchable_while_the_job_runs(server, client, local_takes):
    client.submit("four-takes", settings("a red train", seed=SEED), clip_pngs(6), takes=2,
                  prompts=["a red train", "a cat"])
    expected = [("a red train", SEED), ("a red train", SEED + 1), ("a cat", SEED),
                ("a cat", SEED + 1)]
    for number, (prompt, seed) in enumerate(expected, start=1):
        event = wait_for_event(client, "four-takes", "take_ready", take=number)
        assert (event["takes"], event["frame_count"]) == (4, 4)
        assert (event["sidecar"]["prompt"], event["sidecar"]["seed"]) == (prompt, seed)
        job = client.status("four-takes")  # held after this take: the job still runs
        assert job["state"] == "running" and job["takes"] == 4
        assert job["takes_done"] == list(range(1, number + 1))
        take = client.fetch("four-takes", take=number)
        assert take.sidecar == event["sidecar"]
        assert_is_local_take(take, local_takes)
        if number < 4:
            with pytest.raises(Exception, match="not made yet"):
                client.fetch("four-takes", take=number + 1)
        let_go(server)
    result = client.wait("four-takes", timeout_s=WAIT_S)
    assert result.frames == client.fetch("four-takes", take=1).frames  # the result is take 1
    assert [(t["take"], t["prompt"], t["seed"]) for t in result.sidecar["takes"]] == [
        (number, prompt, seed) for number, (prompt, seed) in enumerate(expected, start=1)]
    assert result.sidecar["seed"] == SEED and result.sidecar["settings"]["prompt"] == "a red train"


def test_progress_names_the_take_being_made(server, client):
    client.submit("progress-takes", settings(seed=SEED), clip_pngs(6), takes=2)
    seen = []
    while not any(event["type"] == "take_ready" for event in seen):
        seen += [event for event in client.poll(0.5) if event["job_id"] == "progress-takes"]
    sampling = [event for event in seen if event["type"] == "progress"
                and event["phase"].startswith("sample")]
    assert sampling and all(event["takes"] == 2 and event["take"] == 1 for event in sampling)
    assert all("take" not in event for event in seen
               if event["type"] == "progress" and event["phase"] == "invert")
    let_go(server)
    wait_for_event(client, "progress-takes", "take_ready", take=2, timeout_s=60)
    let_go(server)
    client.wait("progress-takes", timeout_s=60)


def test_a_cancel_after_the_first_take_keeps_it_and_stops_the_rest(server, client, local_takes):
    client.submit("cancel-takes", settings(seed=SEED), clip_pngs(6), takes=3)
    wait_for_event(client, "cancel-takes", "take_ready", take=1)
    assert client.cancel("cancel-takes")["cancel_requested"] is True
    let_go(server)  # the job goes on only now, and stops before take 2
    with pytest.raises(JobCancelledError):
        client.wait("cancel-takes", timeout_s=WAIT_S)
    job = client.status("cancel-takes")
    assert (job["state"], job["takes"], job["takes_done"]) == ("cancelled", 3, [1])
    assert_is_local_take(client.fetch("cancel-takes", take=1), local_takes)
    with pytest.raises(JobCancelledError, match="takes made: 1"):
        client.fetch("cancel-takes", take=2)
    with pytest.raises(JobCancelledError):
        client.fetch("cancel-takes")  # the job has no result: only its finished take


def test_takes_are_refused_beyond_max_takes_and_one_take_is_as_before(server, client):
    assert client.hello()["limits"]["max_takes"] == 8
    with pytest.raises(JobRejected, match="at most 8"):
        client.submit("too-many", settings(), clip_pngs(6), takes=3, prompts=["a", "b", "c"])
    client.submit("one-take", settings(seed=SEED), clip_pngs(6))
    result = client.wait("one-take", timeout_s=WAIT_S)
    assert result.sidecar["takes"] is None
    job = client.status("one-take")
    assert (job["takes"], job["takes_done"]) == (1, [1])
    assert client.fetch("one-take", take=1).frames == result.frames


def test_the_client_refuses_takes_to_a_server_that_does_not_make_them():
    welcome = {"v": 1, "type": "welcome", "req": 1, "limits": {"max_regions": 8}}
    with one_reply_server(lambda header: [json.dumps(welcome).encode()]) as address:
        with Client(address, timeout_s=10.0) as older:
            older.hello()
            with pytest.raises(JobRejected, match="makes one take a job"):
                older.submit("takes", settings(), clip_pngs(6), takes=2)


def test_a_server_killed_mid_takes_keeps_the_finished_take_and_makes_only_the_rest(
        tmp_path, local_takes):
    server = gated(tmp_path / "state").start()
    try:
        with Client(server.address, timeout_s=30.0) as client:
            client.submit("killed-takes", settings(seed=SEED), clip_pngs(6), takes=3)
            wait_for_event(client, "killed-takes", "take_ready", take=1)
            take_folder = tmp_path / "state" / "jobs" / "killed-takes" / "takes" / "1"
            before = {path.name: (path.read_bytes(), path.stat().st_mtime_ns)
                      for path in take_folder.iterdir()}
            server.kill()  # held after take 1: takes 2 and 3 are not made
            server.start()  # the re-run is held again after take 1, before making take 2
            # the new server sends events only to a client it has heard from: the hello
            # answered, take 2's take_ready cannot be made before the client is known
            assert client.hello()["model"] == "tiny"
            for number in (2, 3):  # the re-run makes only these, and announces them
                let_go(server)
                # the next take announced, whichever it is: a re-run that made take 1
                # again fails here at once, not after a wait for take 2 that never comes
                event = wait_for_event(client, "killed-takes", "take_ready")
                assert (event["take"], event["sidecar"]["seed"]) == (number, SEED + number - 1)
            let_go(server)  # held after take 3
            result = client.wait("killed-takes", timeout_s=WAIT_S)
            job = client.status("killed-takes")
            assert (job["attempts"], job["takes_done"]) == (2, [1, 2, 3])
            after = {path.name: (path.read_bytes(), path.stat().st_mtime_ns)
                     for path in take_folder.iterdir()}
            assert after == before  # take 1 was kept, not made again
            for number in (1, 2, 3):
                assert_is_local_take(client.fetch("killed-takes", take=number), local_takes)
            assert [t["seed"] for t in result.sidecar["takes"]] == [SEED, SEED + 1, SEED + 2]
    finally:
        server.stop()
