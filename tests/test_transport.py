"""The server's sending rules on a real ROUTER socket and a real client socket that
reads nothing until told: no reply or final event is ever lost to a full pipe,
progress is thinned to the newest per job, and a client that stops reading for good
is dropped. The pipe is filled for real (the test sends until the transport reports a
backlog), so nothing here depends on timing.
"""

from __future__ import annotations

import json

import pytest
import zmq

from backend.server.transport import SEND_QUEUE_PER_CLIENT, Transport
from shared import protocol

CLIENT = "slow-reader"
HANG_GUARD = 1_000_000  # sends or reads before a test calls it a hang; never reached


@pytest.fixture
def transport():
    transport = Transport(zmq.Context.instance(), "tcp://127.0.0.1:*", None, False,
                          dict(protocol.DEFAULT_LIMITS, max_message_bytes=2**20))
    transport.bind()
    yield transport
    transport.close()


@pytest.fixture
def reader(transport):
    """A client socket with the smallest receive queue: it fills when it does not read."""
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 1)
    socket.setsockopt(zmq.RCVBUF, 4096)
    socket.setsockopt(zmq.ROUTING_ID, CLIENT.encode())
    socket.connect(transport.address)
    socket.send(protocol.encode({"type": "hello", "req": 1})[0])  # the server learns of it
    assert transport.router.poll(30_000)
    assert transport.receive().routing_id == CLIENT.encode()
    yield socket
    socket.close()


def progress(job_id: str, step: int) -> dict:
    return {"type": "progress", "job_id": job_id, "phase": "sample", "step": step, "total": 0}


def fill_the_pipe(transport: Transport) -> int:
    """Send progress for jobs a and b until the client's pipe is full and progress
    waits in the outbox; returns the last step sent."""
    step = 0
    while not transport.backlog:
        step += 1
        assert step < HANG_GUARD
        for job_id in ("a", "b"):
            transport.send_event(CLIENT, None, progress(job_id, step))
    return step


def read_everything(transport: Transport, reader: zmq.Socket) -> list[dict]:
    """Read, letting the transport send what waits; once nothing waits, send a marker
    event and read up to it: ZeroMQ keeps order, so all that was sent has arrived."""
    headers: list[dict] = []
    marker_sent = False
    for _ in range(HANG_GUARD):
        transport.flush()
        if not marker_sent and not transport.backlog:
            transport.send_event(CLIENT, None, progress("marker", 0))
            marker_sent = True
        if reader.poll(1000):
            header = json.loads(reader.recv_multipart()[0])
            if header.get("job_id") == "marker":
                return headers
            headers.append(header)
    raise AssertionError(f"the marker never came; got {len(headers)} messages")


def test_a_lagging_client_gets_every_reply_and_final_event_and_the_newest_progress(
        transport, reader):
    step = fill_the_pipe(transport)
    transport.send_event(CLIENT, None, {"type": "result_ready", "job_id": "a", "frame_count": 4})
    transport.send_reply(CLIENT.encode(), {"type": "status", "req": 1, "jobs": []})
    for later in range(step + 1, step + 50):  # b goes on while the client still lags
        transport.send_event(CLIENT, None, progress("b", later))
    assert transport.backlog
    transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": 2})
    headers = read_everything(transport, reader)

    assert [h["req"] for h in headers if "req" in h] == [1, 2]  # every reply, once, in order
    kinds = [(h["type"], h.get("job_id")) for h in headers]
    assert kinds.count(("result_ready", "a")) == 1
    after_end = kinds[kinds.index(("result_ready", "a")):]
    assert ("progress", "a") not in after_end  # a's waiting progress went with its end
    steps_b = [h["step"] for h in headers if h["type"] == "progress" and h["job_id"] == "b"]
    assert steps_b[-1] == step + 49  # the newest progress arrives
    assert steps_b == sorted(steps_b)
    assert transport.coalesced > 0 and transport.dropped == 0
    assert not transport.backlog


def test_a_client_that_stops_reading_for_good_is_dropped(transport, reader):
    fill_the_pipe(transport)
    for req in range(1, SEND_QUEUE_PER_CLIENT + 1):  # requests it never reads the replies of
        transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": req})
    assert transport.dropped == 0 and transport.backlog
    transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": 99})
    assert transport.dropped > SEND_QUEUE_PER_CLIENT and not transport.backlog


def test_replies_waiting_for_a_client_forgotten_as_silent_are_dropped(transport, reader):
    fill_the_pipe(transport)
    transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": 1})
    transport.forget_silent(silence_s=-1.0)  # every client counts as silent
    assert not transport.backlog and transport.dropped >= 2 and not transport.peers


def test_an_event_that_cannot_be_encoded_still_ends_the_job_for_its_client(transport, reader):
    transport.send_event(CLIENT, None, {"type": "result_ready", "job_id": "a", "frame_count": 4,
                                        "sidecar": {"score": float("nan")}})
    assert reader.poll(30_000)
    header = json.loads(reader.recv_multipart()[0])
    assert (header["type"], header["code"], header["job_id"]) == ("error", "internal", "a")
    assert header["message"].endswith("see the server log.")
