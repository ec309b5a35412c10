"""The job server as a real process on loopback, driven through real ZeroMQ sockets.

One server is shared by the module: small limits, and --test-step-delay so that a job
with many steps can be caught mid-run after its first progress event. Fault and
security tests start their own. Each server process pays the model load and a slow
first job (torch warm-up), so the tests start as few as they can.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import pytest
import zmq
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
    ServerProcess,
    clip_pngs,
    settings,
    subprocess_env,
    wait_for_event,
)

# With the step delay a job with these settings runs for minutes; tests cancel it long before.
LONG = {"steps": 1000, "inversion_steps": 1000, "guided_steps": 0}
WAIT_S = 300  # a hang guard for a busy machine, not a time limit
OPTIONS = ("--max-message-mb", "1", "--max-frames", "8", "--max-side", "256", "--max-queue", "3",
           "--test-step-delay", "0.02")


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
    result = client.wait("round-trip", progress=progress.append, timeout_s=WAIT_S)
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
    client = connect(server.address)
    client.submit("blocker", settings(**LONG), clip_pngs(6))
    wait_for_event(client, "blocker", "progress")
    assert client.submit("queued-1", settings(), clip_pngs(6))["queue_position"] == 1
    assert client.submit("queued-2", settings(), clip_pngs(6))["queue_position"] == 2
    with pytest.raises(JobNotReady, match="queued"):
        client.fetch("queued-1")
    with pytest.raises(JobRejected) as caught:
        client.submit("one-too-many", settings(), clip_pngs(6))
    assert caught.value.code == "queue_full"
    assert client.cancel("queued-1")["state"] == "cancelled"
    assert client.status("queued-2")["queue_position"] == 1
    assert client.cancel("queued-2")["state"] == "cancelled"
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
    finally:
        socket.close()
    assert reply["code"] == "protocol_version" and reply["req"] == 4
    assert reply["v"] == protocol.PROTOCOL_VERSION
    assert "version 1" in reply["message"] and "99" in reply["message"]


def test_client_against_a_server_of_another_version():
    """A fake server in this process answers in protocol version 2."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_once() -> None:
        if router.poll(30_000):
            routing_id, header = router.recv_multipart()
            reply = {**json.loads(header), "v": 2, "type": "welcome"}
            router.send_multipart([routing_id, json.dumps(reply).encode()])

    thread = threading.Thread(target=answer_once)
    thread.start()
    client = Client(f"tcp://127.0.0.1:{port}", timeout_s=30.0)
    try:
        with pytest.raises(ProtocolMismatch, match="version 2 and this client version 1"):
            client.hello()
    finally:
        thread.join()
        client.close()
        router.close()


def test_no_server_is_a_clear_error_not_a_hang():
    with Client("tcp://127.0.0.1:9", timeout_s=1.0) as client:
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
        assert client.status() == {"jobs": []}

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


def test_bad_key_files_are_clear_errors(tmp_path):
    with pytest.raises(ClientError, match="no key file"):
        load_client_keys(tmp_path)
    make_keys(tmp_path / "keys")
    with pytest.raises(ClientError, match="only a public key"):
        load_client_key_files(tmp_path / "keys" / "server.key", tmp_path / "keys" / "client.key")


def test_network_bind_without_keys_refused(tmp_path):
    bind = "tcp://0.0.0.0:5599"  # never bound: the check comes first
    result = subprocess.run(
        [sys.executable, "-m", "backend", "serve", "--model", "tiny", "--bind", bind,
         "--state-dir", str(tmp_path / "state")],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert "Refusing to serve" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- command line


def test_remote_transfer_writes_the_same_files_as_a_local_run(server, tmp_path):
    from backend.video import write_frames_dir

    frames = decode_pngs(clip_pngs(8))
    write_frames_dir(frames, tmp_path / "clip")
    common = [sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"),
              "--prompt", "a train", "--seed", "11", "--frames", "4", "--width", "64",
              "--height", "64", "--steps", "1", "--guided-steps", "0", "--iterations", "0",
              "--inversion-steps", "1"]
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
        outputs[name] = sidecar, sorted((tmp_path / f"{name}-frames").iterdir())
        assert (tmp_path / f"{name}.mp4").stat().st_size > 0
    assert outputs["local"][0] == outputs["remote"][0]
    local_frames, remote_frames = outputs["local"][1], outputs["remote"][1]
    assert [p.name for p in local_frames] == [p.name for p in remote_frames]
    for local, remote in zip(local_frames, remote_frames, strict=True):
        assert local.read_bytes() == remote.read_bytes()


def test_remote_transfer_without_a_server_is_one_line(tmp_path):
    from backend.video import write_frames_dir

    write_frames_dir(np.zeros((4, 32, 32, 3), np.uint8), tmp_path / "clip")
    result = subprocess.run(
        [sys.executable, "-m", "backend", "transfer", str(tmp_path / "clip"), "--prompt", "x",
         "--frames", "2", "--width", "64", "--height", "64", "-o", str(tmp_path / "o.mp4"),
         "--server", "tcp://127.0.0.1:9", "--timeout", "1"],
        cwd=REPO_ROOT, env={**subprocess_env(), "UNDERSTUDY_CLIENT_TIMEOUT": "1"},
        capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: Could not reach a server")
