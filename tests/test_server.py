"""The job server as a real process on loopback, driven through real ZeroMQ sockets.

One server is shared by the module: small limits, and --test-step-delay so that a job
with many steps can be caught mid-run after its first progress event. Fault and
security tests start their own. Each server process pays the model load and a slow
first job (torch warm-up), so the tests start as few as they can.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from PIL import Image
from zmq.utils.monitor import recv_monitor_message

from backend.video import decode_pngs
from shared import protocol
from shared.client import (
    AuthenticationFailed,
    Client,
    ClientError,
    JobCancelledError,
    JobFailed,
    JobNotReady,
    JobRejected,
    ProtocolMismatch,
    ServerUnavailable,
    UnknownJob,
    load_client_key_files,
    load_client_keys,
)
from tests.conftest import REPO_ROOT
from tests.server_support import (
    LONG,
    ServerProcess,
    clip_pngs,
    mask_pngs,
    one_reply_server,
    settings,
    subprocess_env,
    unused_address,
    wait_for_event,
    wait_until,
)

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
OPTIONS = ("--max-message-mb", "1", "--max-frames", "8", "--max-side", "256", "--max-queue", "3",
           "--max-job-megapixels", "0.1", "--test-step-delay", "0.02")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "state", *OPTIONS).start()
    yield process
    process.stop()


@pytest.fixture
def connect():
    """Make clients that are closed after the test."""
    clients = []

    def make(address: str, **keys) -> Client:
        client = Client(address, timeout_s=30.0, **keys)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def raw_socket(address: str) -> zmq.Socket:
    """A bare DEALER socket for sending what the shared client never would."""
    return monitored_socket(address, 0)[0]


def monitored_socket(address: str, events: int) -> tuple[zmq.Socket, zmq.Socket | None]:
    """A bare DEALER socket and, for `events`, its monitor, set up before connecting so
    no event is missed."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    monitor = socket.get_monitor_socket(events) if events else None
    socket.connect(address)
    return socket, monitor


def ask(socket: zmq.Socket, frames: list[bytes]) -> dict:
    socket.send_multipart(frames)
    assert socket.poll(30_000), "no reply"
    return json.loads(socket.recv_multipart()[0])


# --------------------------------------------------------------------------- happy paths


def assert_server_still_serves(client, job_id: str) -> None:
    """A fresh small job after a cancel or failure runs to completion."""
    client.submit(job_id, settings(), clip_pngs(6))
    assert len(client.wait(job_id, timeout_s=WAIT_S).frames) == 4


def test_round_trip(server, connect):
    client = connect(server.address)
    welcome = client.hello()
    assert welcome["v"] == protocol.PROTOCOL_VERSION
    assert welcome["model"] == "tiny" and welcome["device"] == "cpu"
    assert welcome["limits"]["max_frames"] == 8 and welcome["secure"] is False

    accepted = client.submit("round-trip", settings(seed=7), clip_pngs(6))
    assert accepted["type"] == "accepted" and accepted["duplicate"] is False
    progress = []
    result = client.wait("round-trip", on_event=progress.append, timeout_s=WAIT_S)
    assert progress and all(event["job_id"] == "round-trip" for event in progress)
    frames = decode_pngs(result.frames)
    assert frames.shape == (4, 48, 72, 3)  # framing fit: the 48×32 clip's 3:2 in 64×64 pixels
    assert result.sidecar["seed"] == 7 and result.sidecar["settings"]["prompt"] == "a bear walking"

    assert client.status("round-trip")["state"] == "done"
    assert client.fetch("round-trip").frames == result.frames
    assert [job["job_id"] for job in client.status()["jobs"]] == ["round-trip"]


def test_duplicate_submit_never_runs_twice(server, connect):
    client = connect(server.address)
    request = (settings(seed=1), clip_pngs(5))
    client.submit("dup", *request)
    first = client.wait("dup", timeout_s=WAIT_S)
    again = client.submit("dup", *request)
    assert again["duplicate"] is True and again["state"] == "done"
    job = client.status("dup")
    assert job["attempts"] == 1
    assert client.fetch("dup").frames == first.frames
    with pytest.raises(JobRejected) as caught:
        client.submit("dup", settings(seed=2), clip_pngs(5))
    assert caught.value.code == "job_exists"
    assert "new job id" in str(caught.value)


def test_three_clients_at_once_each_get_their_own_result(server, connect):
    clients = [connect(server.address) for _ in range(3)]
    results, errors = {}, []

    def run(index: int) -> None:
        try:
            job_id = f"many-{index}"
            clients[index].submit(job_id, settings(f"prompt {index}", seed=100 + index,
                                                   output_frames=3 + index),
                                  clip_pngs(6, shade=40 * index))
            results[index] = clients[index].wait(job_id, timeout_s=WAIT_S)
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for index, result in results.items():
        assert result.sidecar["settings"]["prompt"] == f"prompt {index}"
        assert result.sidecar["seed"] == 100 + index
        assert len(result.frames) == 3 + index
        # each client sees only its own job
        assert [job["job_id"] for job in clients[index].status()["jobs"]] == [f"many-{index}"]


# --------------------------------------------------------------------------- regions (issue 20)


def test_a_job_with_a_region_is_stored_with_its_masks_and_runs(server, connect):
    client = connect(server.address)
    clip, region = clip_pngs(6), mask_pngs(6)  # the region: x 16-32, y 8-24 of 48×32
    job_settings = settings(region_grow=2, region_feather=2)
    accepted = client.submit("region-1", job_settings, clip, masks=[region])
    assert accepted["state"] in ("queued", "running") and not accepted["duplicate"]
    folder = server.state_dir / "jobs" / "region-1"
    assert [path.read_bytes() for path in sorted((folder / "mask" / "0").glob("*.png"))] == region
    request = json.loads((folder / "request.json").read_text())
    assert request["frames_in"] == 6 and [len(digests) for digests in request["masks"]] == [6]
    # The same request again is a duplicate; the clip without its region is another request.
    assert client.submit("region-1", job_settings, clip, masks=[region])["duplicate"]
    with pytest.raises(JobRejected) as caught:
        client.submit("region-1", job_settings, clip)
    assert caught.value.code == "job_exists"
    result = client.wait("region-1", timeout_s=WAIT_S)
    assert result.sidecar["regions"]["count"] == 1 and result.sidecar["regions"]["composited"]
    # Whole source frames, kept outside the grown region; their alpha is the feathered
    # region: 0 outside it, 255 well inside.
    source = decode_pngs(clip)[result.sidecar["input_frame_indices"]]
    outside = np.ones((32, 48), bool)
    outside[8 - 2:24 + 2, 16 - 2:32 + 2] = False
    assert len(result.frames) == 4
    for frame, plate in zip(result.frames, source, strict=True):
        pixels = np.asarray(Image.open(io.BytesIO(frame)))
        assert pixels.shape == (32, 48, 4)
        assert (pixels[..., :3][outside] == plate[outside]).all()
        assert (pixels[..., 3][outside] == 0).all() and pixels[12:20, 20:28, 3].min() == 255


def test_bad_masks_are_refused_in_one_sentence_before_queueing(server, connect):
    submit = {"v": 1, "type": "submit", "req": 7, "settings": settings()}
    clip = clip_pngs(6)
    cases = [  # (job id, regions field, mask frames, code, words of its sentence)
        ("m-count", 1, mask_pngs(5), "bad_mask", "not 2 equal parts"),
        ("m-field", "one", mask_pngs(6), "bad_request", "'regions'"),
        ("m-many", 9, mask_pngs(6), "bad_request", "from 0 to 8"),
        ("m-size", 1, mask_pngs(6, width=40), "bad_mask", "40×32"),
        ("m-empty", 1, mask_pngs(6, value=0), "bad_mask", "black in every frame"),
        ("m-white", 1, mask_pngs(6, box=(0, 0, 48, 32)), "bad_mask", "white over every pixel"),
        ("m-broken", 1, [b"garbage"] * 6, "bad_mask", "not a readable PNG"),
        # The clip alone fits the pixel budget (0.1 megapixels); with its region it does not.
        ("m-budget", 1, mask_pngs(6, 128, 128), "too_large", "and 6 mask frames"),
    ]
    socket = raw_socket(server.address)
    try:
        for job_id, regions, masks, code, words in cases:
            frames = clip_pngs(6, 128, 128) if job_id == "m-budget" else clip
            header = json.dumps({**submit, "job_id": job_id, "regions": regions}).encode()
            reply = ask(socket, [header, *frames, *masks])
            assert reply["type"] == "rejected" and reply["code"] == code, (job_id, reply)
            assert words in reply["message"] and reply["message"].endswith("."), reply
            assert reply["message"].count(". ") == 0, reply
    finally:
        socket.close()
    client = connect(server.address)
    with pytest.raises(JobRejected, match="Region 1 has 5 mask frames") as caught:
        client.submit("m-client", settings(), clip, masks=[mask_pngs(5)])  # refused here
    assert caught.value.code == "bad_mask"
    stored = {path.name for path in (server.state_dir / "jobs").iterdir()}
    assert not stored & ({case[0] for case in cases} | {"m-client"})


def test_regions_go_only_to_a_server_that_announces_it_takes_them(server, connect):
    assert connect(server.address).hello()["limits"]["max_regions"] == protocol.MAX_REGIONS
    # An older server (no max_regions) would read the masks as more clip frames.
    older = {"type": "welcome", "server": "understudy", "limits": {"max_frames": 8}}
    with one_reply_server(lambda header: protocol.encode({**older, "req": header["req"]})
                          ) as address:
        with Client(address, timeout_s=30.0) as client:
            with pytest.raises(JobRejected, match="does not take regions") as caught:
                client.submit("m-old", settings(), clip_pngs(6), masks=[mask_pngs(6)])
    assert caught.value.code == "bad_mask"


# --------------------------------------------------------------------------- cancel, disconnect


def test_cancel_mid_job_frees_the_worker(server, connect):
    client = connect(server.address)
    client.submit("to-cancel", settings(**LONG), clip_pngs(6))
    wait_for_event(client, "to-cancel", "progress")
    job = client.cancel("to-cancel")
    assert job["cancel_requested"] is True
    with pytest.raises(JobCancelledError):
        client.wait("to-cancel", timeout_s=WAIT_S)
    assert client.status("to-cancel")["state"] == "cancelled"
    with pytest.raises(JobCancelledError):
        client.fetch("to-cancel")
    assert_server_still_serves(client, "after-cancel")


def test_cancel_a_queued_job_and_queue_limit(server, connect):
    """Positions are relative: other tests' jobs may still be in this server's queue."""
    client = connect(server.address)
    client.submit("blocker", settings(**LONG), clip_pngs(6))
    wait_for_event(client, "blocker", "progress")
    first = client.submit("queued-1", settings(), clip_pngs(6))["queue_position"]
    assert first >= 1
    assert client.submit("queued-2", settings(), clip_pngs(6))["queue_position"] == first + 1
    with pytest.raises(JobNotReady, match="queued"):
        client.fetch("queued-1")
    extra = []
    with pytest.raises(JobRejected) as caught:  # the limit is 3 queued or running
        for index in range(3):
            client.submit(f"filler-{index}", settings(), clip_pngs(6))
            extra.append(f"filler-{index}")
    assert caught.value.code == "queue_full" and "submit again" in str(caught.value)
    assert client.hello()["queue_length"] == 3
    assert client.cancel("queued-1")["state"] == "cancelled"
    assert client.status("queued-2")["queue_position"] == first
    for job_id in ["queued-2", *extra]:
        assert client.cancel(job_id)["state"] == "cancelled"
    assert client.cancel("blocker")["cancel_requested"] is True
    with pytest.raises(JobCancelledError):
        client.wait("blocker", timeout_s=WAIT_S)


def test_client_disconnects_mid_job_and_fetches_later(server, connect):
    first = connect(server.address)
    first.submit("orphan", settings(), clip_pngs(6))
    wait_for_event(first, "orphan", "progress")
    first.close()
    later = connect(server.address)  # a new client id: no events, status and fetch only
    result = later.wait("orphan", timeout_s=WAIT_S)
    assert len(result.frames) == 4


def test_a_client_restarted_before_the_server_saw_it_go_is_answered_once_it_has(
        tmp_path, connect):
    """Blender restarted quickly with its keys and client id: the new connection arrives
    while the server still holds the old one under that id. With keys an id in use stays
    with its connection, and ZeroMQ's ROUTER never reads the newcomer, even after the
    old one closes; the client must connect again to be heard."""
    keys = tmp_path / "keys"
    make_keys(keys)
    server = ServerProcess(tmp_path / "state", "--keys", str(keys)).start()
    try:
        old = connect(server.address, **load_client_keys(keys))
        old.hello()
        restarted = Client(server.address, timeout_s=2.0, client_id=old.client_id,
                           **load_client_keys(keys))
        try:
            with pytest.raises(ServerUnavailable):  # the id is still the old connection's
                restarted.hello()
            old.close()
            assert wait_until(lambda: jobs_seen_by(restarted), "the restarted client heard") \
                == {"jobs": []}
        finally:
            restarted.close()
    finally:
        server.stop()


def test_settings_the_engine_cannot_run_are_rejected_at_submit(server, connect):
    client = connect(server.address)
    refused = settings(steps=2, inversion_steps=3)  # inversion must visit the sampling steps
    with pytest.raises(JobRejected) as caught:
        client.submit("refused", refused, clip_pngs(6))
    assert caught.value.code == "bad_settings" and str(caught.value).endswith(".")
    with pytest.raises(UnknownJob):
        client.status("refused")  # nothing was stored
    assert_server_still_serves(client, "after-refused")


def test_a_job_that_fails_while_running_fails_clearly_and_the_server_goes_on(server, connect):
    client = connect(server.address)
    # 12×12 frames pass the submit checks (PNG, one size, under max_side); the worker's
    # clip check refuses them, so the failure happens inside a running job.
    client.submit("too-small", settings(), clip_pngs(6, width=12, height=12))
    with pytest.raises(JobFailed) as caught:
        client.wait("too-small", timeout_s=WAIT_S)
    assert caught.value.code == "bad_clip" and "12×12" in str(caught.value)
    job = client.status("too-small")
    assert job["state"] == "failed" and job["error"]["code"] == "bad_clip"
    with pytest.raises(JobFailed):
        client.fetch("too-small")
    assert_server_still_serves(client, "after-failure")


def test_unknown_job(server, connect):
    client = connect(server.address)
    for call in (client.status, client.cancel, client.fetch):
        with pytest.raises(UnknownJob, match="no job never-submitted"):
            call("never-submitted")


# --------------------------------------------------------------------------- faults


def test_server_killed_mid_job_loses_nothing(tmp_path, connect):
    server = ServerProcess(tmp_path / "state", "--test-step-delay", "0.02").start()
    try:
        client = connect(server.address)
        client.submit("interrupted", settings(**LONG), clip_pngs(6))
        client.submit("waiting", settings(seed=3), clip_pngs(6))
        wait_for_event(client, "interrupted", "progress")
        server.kill()
        with pytest.raises(ServerUnavailable, match="has not answered"):
            while True:  # heartbeats go unanswered: within 3 heartbeats the client knows
                client.poll(0.2)
        server.start()  # same address, same state folder
        # the same client (same id) reconnects by itself and gets the re-run's events
        assert client.hello()["model"] == "tiny"
        wait_for_event(client, "interrupted", "progress", attempt=2)
        job = client.status("interrupted")
        assert job["state"] == "running" and job["attempts"] == 2
        assert client.status("waiting")["state"] == "queued"
        client.cancel("interrupted")
        result = client.wait("waiting", timeout_s=WAIT_S)
        assert result.sidecar["seed"] == 3
        assert {job["job_id"]: job["state"] for job in client.status()["jobs"]} == {
            "interrupted": "cancelled", "waiting": "done"}
    finally:
        server.stop()


def test_a_clean_stop_requeues_the_running_job_and_results_are_pruned_as_jobs_finish(
        tmp_path, connect):
    """Issue 13: SIGTERM puts the running job back without counting the attempt; with
    --keep-jobs 1 the older result goes as soon as the next job finishes."""
    server = ServerProcess(tmp_path / "state", "--keep-jobs", "1",
                           "--test-step-delay", "0.02").start()
    try:
        client = connect(server.address)
        client.submit("older", settings(), clip_pngs(6))
        client.wait("older", timeout_s=WAIT_S)
        client.submit("newer", settings(seed=2), clip_pngs(6))
        client.wait("newer", timeout_s=WAIT_S)
        with pytest.raises(UnknownJob):
            client.status("older")
        assert not (tmp_path / "state" / "jobs" / "older").exists()

        client.submit("stopped", settings(**LONG), clip_pngs(6))
        wait_for_event(client, "stopped", "progress", attempt=1)
        assert server.terminate() == 0
        on_disk = json.loads((tmp_path / "state" / "jobs" / "stopped" / "status.json").read_text())
        assert on_disk["state"] == "queued" and on_disk["attempts"] == 0
        server.start()
        job = wait_until(lambda: (job := client.status("stopped"))["state"] == "running" and job,
                         "the stopped job running again")
        assert job["attempts"] == 1
        client.cancel("stopped")
        with pytest.raises(JobCancelledError):
            client.wait("stopped", timeout_s=WAIT_S)
    finally:
        server.stop()


def test_garbage_gets_error_replies_and_the_server_keeps_serving(server, connect):
    socket = raw_socket(server.address)
    try:
        good_submit = {"v": 1, "type": "submit", "req": 9, "job_id": "g"}
        cases = [
            ([b"not json at all"], "bad_header"),
            ([b'{"v": 1}'], "bad_header"),
            ([b"\x00\xff" * 10, b"x"], "bad_header"),
            ([json.dumps({"v": 1, "type": "launch", "req": 1}).encode()], "unknown_type"),
            ([json.dumps({**good_submit, "settings": "a bear"}).encode(), clip_pngs(1)[0]],
             "bad_request"),
            ([json.dumps({**good_submit, "job_id": "../x", "settings": {}}).encode()],
             "bad_job_id"),
            ([json.dumps({**good_submit, "settings": {"prompt": 5}}).encode(), *clip_pngs(6)],
             "bad_settings"),
            ([json.dumps({**good_submit, "settings": {"prompt": "p", "wings": 2}}).encode(),
              *clip_pngs(6)], "bad_settings"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(), b"garbage"] * 1,
             "bad_frames"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(),
              clip_pngs(1)[0][:50], *clip_pngs(5)], "bad_frames"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(),
              *clip_pngs(6, width=300)], "bad_frames"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(), *clip_pngs(2)],
             "bad_clip"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(), *clip_pngs(9)],
             "too_many_frames"),
            ([json.dumps({**good_submit, "settings": settings(prompt="p" * 2000)}).encode(),
              *clip_pngs(6)], "bad_settings"),
            ([json.dumps({**good_submit, "settings": settings()}).encode(),
              *[b"x" * 400_000] * 3], "too_large"),
            ([json.dumps({"v": 1, "type": "fetch", "req": 3, "job_id": 12}).encode()],
             "bad_job_id"),
        ]
        for frames, code in cases:
            reply = ask(socket, frames)
            assert reply["type"] in ("error", "rejected"), reply
            assert reply["code"] == code, (frames[0][:80], reply)
            assert reply["message"].endswith("."), reply
        assert not any(job["job_id"] == "g" for job in connect(server.address).status()["jobs"])
    finally:
        socket.close()
    assert connect(server.address).hello()["model"] == "tiny"


def test_oversized_frame_drops_only_that_connection(server, connect):
    socket, monitor = monitored_socket(server.address,
                                       zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        socket.send_multipart([json.dumps({"v": 1, "type": "hello", "req": 1}).encode(),
                               b"x" * (2 * 2**20)])  # over ZMQ_MAXMSGSIZE (1 MiB)
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        socket.disable_monitor()
        monitor.close(0)
        socket.close()
    client = connect(server.address)
    assert client.hello()["model"] == "tiny"
    with pytest.raises(JobRejected, match="at most 1 MiB") as caught:  # checked before sending
        client.submit("big", settings(), [b"x" * 2**20] * 2)
    assert caught.value.code == "too_large"
    with pytest.raises(JobRejected) as caught:
        client.submit("many", settings(), clip_pngs(9))
    assert caught.value.code == "too_many_frames"


def test_wrong_protocol_version(server):
    socket = raw_socket(server.address)
    try:
        reply = ask(socket, [json.dumps({"v": 99, "type": "hello", "req": 4}).encode()])
        # JSON true is not the integer 1, though Python's True == 1
        not_one = ask(socket, [b'{"v": true, "type": "hello", "req": 5}'])
    finally:
        socket.close()
    assert reply["code"] == "protocol_version" and reply["req"] == 4
    assert reply["v"] == protocol.PROTOCOL_VERSION
    assert "version 1" in reply["message"] and "99" in reply["message"]
    assert not_one["code"] == "protocol_version" and not_one["req"] == 5


def test_client_against_a_server_of_another_version():
    """A fake server in this process answers in protocol version 2."""
    with one_reply_server(lambda header: [json.dumps(
            {**header, "v": 2, "type": "welcome"}).encode()]) as address:
        with Client(address, timeout_s=30.0) as client:
            with pytest.raises(ProtocolMismatch, match="version 2 and this client version 1"):
                client.hello()


def test_no_server_is_a_clear_error_not_a_hang():
    with unused_address() as address, Client(address, timeout_s=1.0) as client:
        with pytest.raises(ServerUnavailable, match="check that"):
            client.hello()


# --------------------------------------------------------------------------- security


def make_keys(folder) -> None:
    result = subprocess.run([sys.executable, "-m", "backend", "keys", str(folder)], cwd=REPO_ROOT,
                            env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_curve_allows_only_known_keys(tmp_path, connect):
    keys = tmp_path / "keys"
    make_keys(keys)
    again = subprocess.run([sys.executable, "-m", "backend", "keys", str(keys)], cwd=REPO_ROOT,
                           env=subprocess_env(), capture_output=True, text=True)
    assert again.returncode == 1 and "already holds keys" in again.stderr
    server = ServerProcess(tmp_path / "state", "--keys", str(keys)).start()
    try:
        client = connect(server.address, **load_client_keys(keys))
        assert client.hello()["secure"] is True

        # the same keys, loaded from the two files the Blender preferences point at
        by_files = connect(server.address, **load_client_key_files(keys / "server.key",
                                                                   keys / "client.key_secret"))
        assert by_files.hello()["secure"] is True

        stranger_public, stranger_secret = zmq.curve_keypair()
        stranger = connect(server.address, server_public_key=load_client_keys(keys)[
            "server_public_key"], client_public_key=stranger_public,
            client_secret_key=stranger_secret)
        with pytest.raises(AuthenticationFailed, match="authorized_clients"):
            stranger.hello()

        plain = connect(server.address)
        with pytest.raises(AuthenticationFailed, match="CURVE"):
            plain.hello()
    finally:
        server.stop()


def test_with_keys_a_job_belongs_to_the_key_that_submitted_it(tmp_path, connect):
    """Defect 5 / issue 13: a second authorised key sees nothing of the first key's job,
    not even by reusing the first client's routing id."""
    import zmq.auth

    keys = tmp_path / "keys"
    make_keys(keys)
    other_public_file, other_secret_file = zmq.auth.create_certificates(keys, "other")
    (keys / "authorized_clients" / "other.key").write_bytes(Path(other_public_file).read_bytes())
    server = ServerProcess(tmp_path / "state", "--keys", str(keys)).start()
    try:
        mine = connect(server.address, **load_client_keys(keys))
        request = (settings("a private prompt", seed=4), clip_pngs(6))
        mine.submit("owned", *request)
        mine.wait("owned", timeout_s=WAIT_S)
        other_keys = load_client_key_files(keys / "server.key", other_secret_file)
        other = connect(server.address, **other_keys)
        assert other.hello()["secure"] is True
        for call in (other.status, other.cancel, other.fetch):
            with pytest.raises(UnknownJob):
                call("owned")
        with pytest.raises(JobRejected) as caught:
            other.submit("owned", *request)  # even the very same request
        assert caught.value.code == "job_exists"
        assert other.status() == {"jobs": []}

        impostor = Client(server.address, timeout_s=3.0, client_id=mine.client_id, **other_keys)
        try:
            seen = impostor.status()["jobs"]
        except ServerUnavailable:  # the id stays with its own connection
            seen = []
        finally:
            impostor.close()
        assert seen == []
        assert [job["job_id"] for job in mine.status()["jobs"]] == ["owned"]
        assert len(mine.fetch("owned").frames) == 4

        mine.close()  # the owner goes away; its id is free to take now
        impostor = Client(server.address, timeout_s=2.0, client_id=mine.client_id, **other_keys)
        try:
            assert wait_until(lambda: jobs_seen_by(impostor), "the impostor connecting") == {
                "jobs": []}
        finally:
            impostor.close()
    finally:
        server.stop()


def jobs_seen_by(client: Client) -> dict | None:
    """The client's job list, or None while it cannot get an answer."""
    try:
        return client.status()
    except ServerUnavailable:
        return None


def test_bad_key_files_are_clear_errors(tmp_path):
    with pytest.raises(ClientError, match="no key file"):
        load_client_keys(tmp_path)
    make_keys(tmp_path / "keys")
    with pytest.raises(ClientError, match="only a public key"):
        load_client_key_files(tmp_path / "keys" / "server.key", tmp_path / "keys" / "client.key")


def test_network_bind_without_keys_refused(tmp_path):
    bind = "tcp://0.0.0.0:*"  # the check comes first; were it missing, any free port
    result = subprocess.run(
        [sys.executable, "-m", "backend", "serve", "--model", "tiny", "--bind", bind,
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert "Refusing to serve" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("region", [False, True], ids=["whole frame", "region"])
def test_remote_transfer_writes_the_same_files_as_a_local_run(server, tmp_path, region):
    from backend.video import write_frames_dir

    frames = decode_pngs(clip_pngs(8))
    write_frames_dir(frames, tmp_path / "clip")
    common = [sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"),
              "--prompt", "a train", "--seed", "11", "--frames", "4", "--width", "64",
              "--height", "64", "--steps", "1", "--guided-steps", "0", "--iterations", "0",
              "--inversion-steps", "1"]
    if region:  # --mask goes to the server as grey PNGs, and the plate comes back kept
        (tmp_path / "mask").mkdir()
        for index, png in enumerate(mask_pngs(8)):
            (tmp_path / "mask" / f"{index:05d}.png").write_bytes(png)
        common += ["--mask", str(tmp_path / "mask"), "--region-grow", "2",
                   "--region-feather", "2"]
    outputs = {}
    for name, extra in (("local", ["--model", "tiny", "--device", "cpu",
                                   "--cache-dir", str(tmp_path / "cache")]),
                        ("remote", ["--server", server.address])):
        result = subprocess.run(
            [*common, "-o", str(tmp_path / f"{name}.mp4"), "--frames-dir",
             str(tmp_path / f"{name}-frames"), *extra],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S)
        assert result.returncode == 0, result.stderr
        sidecar = json.loads((tmp_path / f"{name}.json").read_text())
        sidecar.pop("timings_s", None)
        # warm or cold depends on which jobs this module's server ran before (so do the
        # cost's inversion passes, and its seconds are the machine's)
        sidecar.pop("inversion_from_cache", None)
        sidecar.pop("cost", None)
        outputs[name] = sidecar, sorted((tmp_path / f"{name}-frames").iterdir())
        outputs[f"{name}-stderr"] = result.stderr
        assert (tmp_path / f"{name}.mp4").stat().st_size > 0
    assert outputs["local"][0] == outputs["remote"][0]
    assert "Job cli-" in outputs["remote-stderr"] and "--job-id cli-" in outputs["remote-stderr"]
    local_frames, remote_frames = outputs["local"][1], outputs["remote"][1]
    assert [p.name for p in local_frames] == [p.name for p in remote_frames]
    for local, remote in zip(local_frames, remote_frames, strict=True):
        assert local.read_bytes() == remote.read_bytes()
    assert (outputs["remote"][0]["regions"] is not None) == region


def test_remote_takes_write_the_same_files_as_local_takes_and_a_take_renders_again(
        server, tmp_path):
    """Issue 27: `transfer --takes` with --server writes what the local takes write, each
    take said as it arrives; `--from-take` through the server renders that take again."""
    from backend.video import write_frames_dir

    write_frames_dir(decode_pngs(clip_pngs(8)), tmp_path / "clip")
    quick = ["--frames", "4", "--width", "64", "--height", "64", "--steps", "1",
             "--guided-steps", "0", "--iterations", "0", "--inversion-steps", "1"]

    def transfer(*arguments: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"),
                               *quick, *arguments], cwd=REPO_ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=WAIT_S)
        assert done.returncode == 0, done.stderr
        return done

    def frames_of(folder: Path) -> np.ndarray:
        return decode_pngs([path.read_bytes() for path in sorted(folder.iterdir())])

    outputs = {}
    for name, where in (("local", ["--model", "tiny", "--device", "cpu",
                                   "--cache-dir", str(tmp_path / "cache")]),
                        ("remote", ["--server", server.address])):
        said = transfer("--prompt", "a train", "--prompt", "a cat", "--takes", "2", "--seed", "11",
                        "-o", str(tmp_path / name / "out.mp4"),
                        "--frames-dir", str(tmp_path / name / "frames"), *where).stdout
        assert [line.split("/")[-1].split(" ")[0] for line in said.splitlines()[:4]] == [
            f"out-take{take}.mp4" for take in (1, 2, 3, 4)]
        sidecar = json.loads((tmp_path / name / "out.json").read_text())
        for record in (sidecar, *sidecar["takes"]):  # the machine's and the cache's
            for field in ("timings_s", "inversion_from_cache", "cost"):
                record.pop(field)
        outputs[name] = sidecar
        assert (tmp_path / name / "out-contact.png").stat().st_size > 0
    assert outputs["local"] == outputs["remote"]
    for take in (1, 2, 3, 4):
        local, remote = (frames_of(tmp_path / name / "frames" / f"take{take}")
                         for name in ("local", "remote"))
        assert np.abs(local.astype(int) - remote.astype(int)).max() <= 1  # a batch's rounding
    transfer("--from-take", str(tmp_path / "remote" / "out.json"), "--take", "3",
             "--server", server.address, "-o", str(tmp_path / "again.mp4"),
             "--frames-dir", str(tmp_path / "again"))
    again = json.loads((tmp_path / "again.json").read_text())
    assert (again["settings"]["prompt"], again["seed"], again["takes"]) == ("a cat", 11, None)
    difference = frames_of(tmp_path / "again").astype(int) - frames_of(
        tmp_path / "remote" / "frames" / "take3").astype(int)
    assert np.abs(difference).max() <= 1


def test_remote_transfer_without_a_server_is_one_line(tmp_path):
    from backend.video import write_frames_dir

    write_frames_dir(np.zeros((4, 32, 32, 3), np.uint8), tmp_path / "clip")
    with unused_address() as address:
        result = subprocess.run(
            [sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"), "--prompt", "x",
             "--frames", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "o.mp4"),
             "--server", address, "--timeout", "1"],
            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: Could not reach a server")


def test_a_remote_transfer_re_attaches_to_its_job_by_id(server, connect, tmp_path):
    """The CLI prints the job id; `--job-id` fetches that job instead of a new run."""
    from backend.video import write_frames_dir

    client = connect(server.address)
    client.submit("earlier-cli-run", settings("a boat", seed=5), clip_pngs(6))
    expected = client.wait("earlier-cli-run", timeout_s=WAIT_S)
    write_frames_dir(decode_pngs(clip_pngs(6, shade=99)), tmp_path / "clip")  # not that clip
    result = subprocess.run(
        [sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"), "--prompt", "x",
         "-o", str(tmp_path / "out.mp4"), "--frames-dir", str(tmp_path / "frames"),
         "--server", server.address, "--job-id", "earlier-cli-run"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 0, result.stderr
    assert "re-attached" in result.stderr
    assert json.loads((tmp_path / "out.json").read_text())["seed"] == 5
    written = sorted((tmp_path / "frames").iterdir())
    assert np.array_equal(decode_pngs([p.read_bytes() for p in written]),
                          decode_pngs(expected.frames))


# --------------------------------------------------------------------------- hostile input (issue 9)


def png_with_broken_pixels(frame: bytes) -> bytes:
    """The same PNG with its pixel data garbled but every checksum right: it passes the
    submit check (headers and CRCs) and fails only when decoded."""
    import struct
    import zlib

    out, position = bytearray(frame[:8]), 8
    while position < len(frame):
        length, kind = struct.unpack(">I4s", frame[position:position + 8])
        data = frame[position + 8:position + 8 + length]
        if kind == b"IDAT":
            data = bytes(byte ^ 0x5A for byte in data)
        out += struct.pack(">I4s", length, kind) + data
        out += struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        position += 12 + length
    return bytes(out)


def test_only_the_frames_a_job_uses_are_decoded(server, connect):
    """Defect 2: frame 1 of 6 is not among the 4 sampled (0, 2, 3, 5), so it is never
    decoded and the job succeeds."""
    client = connect(server.address)
    frames = clip_pngs(6)
    frames[1] = png_with_broken_pixels(frames[1])
    client.submit("unused-frame-broken", settings(), frames)
    assert len(client.wait("unused-frame-broken", timeout_s=WAIT_S).frames) == 4


def test_a_decompression_bomb_is_refused_before_decoding(server, connect):
    """Defect 2: all-zero 256×256 frames are small on the wire; the pixel budget
    (0.1 megapixels a job here) counts what they would decode to."""
    client = connect(server.address)
    bomb = [encode_png_zeros(256, 256)] * 6
    assert sum(map(len, bomb)) < 6000
    with pytest.raises(JobRejected) as caught:
        client.submit("bomb", settings(), bomb)
    assert caught.value.code == "too_large" and "megapixels" in str(caught.value)
    with pytest.raises(UnknownJob):
        client.status("bomb")


def encode_png_zeros(width: int, height: int) -> bytes:
    from backend.video import encode_png

    return encode_png(np.zeros((height, width, 3), np.uint8))


def test_a_flood_of_frames_is_refused_without_being_kept(server, connect):
    """Defect 4: the frame count is checked as frames arrive; the reply carries req."""
    socket = raw_socket(server.address)
    try:
        header = json.dumps({"v": 1, "type": "hello", "req": 41}).encode()
        reply = ask(socket, [header, *[b""] * 300_000])
    finally:
        socket.close()
    assert reply["type"] == "error" and reply["code"] == "too_many_frames"
    assert reply["req"] == 41
    assert connect(server.address).hello()["model"] == "tiny"


def test_a_client_that_never_reads_loses_replies_instead_of_growing_the_server(server, connect):
    """Defect 4: each client's send queue is bounded; the server drops what does not fit."""
    client = connect(server.address)
    client.submit("big-result", settings(width=128, height=128, output_frames=8), clip_pngs(6))
    client.wait("big-result", timeout_s=WAIT_S)
    before = client.hello()["dropped_messages"]
    reader = zmq.Context.instance().socket(zmq.DEALER)
    reader.setsockopt(zmq.LINGER, 0)
    reader.setsockopt(zmq.RCVHWM, 1)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.connect(server.address)
    try:
        fetch = json.dumps({"v": 1, "type": "fetch", "req": 1, "job_id": "big-result"}).encode()
        for _ in range(150):  # ~60 MB of replies if the server buffered them all
            reader.send(fetch)
        wait_until(lambda: client.hello()["dropped_messages"] > before,
                   "the server dropping replies for a reader that does not read")
        assert client.status("big-result")["state"] == "done"  # everyone else is served
    finally:
        reader.close()


def test_numbers_that_are_not_json_and_broken_text_are_refused_with_their_req(server, connect):
    """Defects 6 and 7: NaN, Infinity, lone surrogates, huge and deep headers."""
    socket = raw_socket(server.address)
    submit = '{"v": 1, "type": "submit", "req": %d, "job_id": "strict", "settings": %s}'
    cases = [
        (submit % (1, '{"prompt": "p", "cfg_scale": NaN}'), "bad_header"),
        (submit % (2, '{"prompt": "p", "cfg_scale": Infinity}'), "bad_header"),
        (submit % (3, '{"prompt": "p", "lr_start": 1e999}'), "bad_header"),
        (submit % (4, '{"prompt": "a \\ud800 bear"}'), "bad_request"),
        (submit % (5, json.dumps(settings(output_frames=100_000))), "bad_settings"),
        ('{"v": 1, "type": "hello", "req": 6, "pad": "%s"}' % ("x" * 70_000), "bad_header"),
        ('{"v": 1, "type": "hello", "req": 7, "x": %s}' % ("[" * 5000 + "]" * 5000), "bad_header"),
    ]
    try:
        for number, (header, code) in enumerate(cases, start=1):
            reply = ask(socket, [header.encode(), *clip_pngs(6)])
            assert reply["code"] == code, (header[:90], reply)
            assert reply["req"] == number, reply
            assert reply["message"].endswith("."), reply
    finally:
        socket.close()
    client = connect(server.address)
    with pytest.raises(UnknownJob):
        client.status("strict")
    with pytest.raises(JobRejected, match="finite"):  # the client refuses to send NaN at all
        client.submit("strict", settings(cfg_scale=float("nan")), clip_pngs(6))
    with pytest.raises(ClientError, match="at most 65536") as caught:
        client.status("x" * 70_000)  # not even a job id: the header size is checked first
    assert caught.value.code == "bad_header"


def test_the_client_surfaces_an_error_that_carries_no_req():
    """Defect 7: a server that cannot read our req still answers; the client says what it
    answered instead of "did not answer" when its timeout runs out."""
    with one_reply_server(lambda _: protocol.encode(protocol.error_header(
            "bad_header", "The header is broken; send a JSON object header."))) as address:
        # The reply comes at once; a client ignoring it fails when its timeout runs out.
        with Client(address, timeout_s=10.0) as client:
            with pytest.raises(ClientError, match="header is broken") as caught:
                client.hello()
    assert caught.value.code == "bad_header"


def test_log_lines_cannot_be_forged_through_a_client_id(server):
    """Defect 8: a routing id with a newline is logged escaped."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.ROUTING_ID, b"x\n2026-12-01 00:00:00,000 INFO Accepted job FORGED")
    socket.connect(server.address)
    try:
        header = {"v": 1, "type": "submit", "req": 1, "job_id": "log-forgery", "settings": settings()}
        assert ask(socket, protocol.encode(header, clip_pngs(6)))["type"] == "accepted"
    finally:
        socket.close()
    assert not [line for line in server.log().splitlines() if line.startswith("2026-12-01 00:00")]
    assert "x\\x0a2026-12-01" in server.log()


# --------------------------------------------------------------------------- the Wan backbone


def test_a_wan_server_announces_its_backbone_and_edits_60_frames_with_none_held(
        tmp_path, connect, tiny_wan_dir):
    server = ServerProcess(tmp_path / "state", "--model", str(tiny_wan_dir)).start()
    try:
        client = connect(server.address)
        backbone = client.hello()["engine"]["backbone"]
        assert (backbone["name"], backbone["native_size"], backbone["window_frames"]) == (
            "wan", [832, 480], 81)
        assert (backbone["frame_rate"], backbone["side_multiple"], backbone["pixel_budget"]) == (
            16.0, 16, 832 * 480)
        assert backbone["defaults"]["cfg_scale"] == 5.0 and backbone["defaults"]["prompt_prefix"] == ""
        clip = clip_pngs(60, width=64, height=64)
        job = settings(num_frames=60, width=64, height=64, window_frames=21, seed=4)
        client.submit("wan-60", job, clip)
        result = client.wait("wan-60", timeout_s=WAIT_S)
        frames = decode_pngs(result.frames)
        assert frames.shape == (60, 64, 64, 3)
        assert len({frame.tobytes() for frame in frames}) == 60  # every frame generated, none held
        assert result.sidecar["backbone"] == "wan" and len(result.sidecar["windows"]) == 4
        assert result.sidecar["settings"]["negative_prompt"] == backbone["defaults"]["negative_prompt"]
        client.submit("wan-60-again", {**job, "prompt": "a fox", "seed": 5}, clip)
        again = client.wait("wan-60-again", timeout_s=WAIT_S)
        assert again.sidecar["inversion_from_cache"] is True
    finally:
        server.stop()
