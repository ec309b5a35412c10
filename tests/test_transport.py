"""The server's sending rules on a real ROUTER socket and a real client socket that
reads nothing until told: no reply or final event is ever lost to a full pipe,
progress is thinned to the newest per job, and a client that stops reading for good
is dropped. The pipe is filled for real, and sends go on until what a test needs is
seen waiting (a progress event replaced, a reply kept), so nothing here depends on
timing. The sockets meet over inproc: over TCP, ZeroMQ's I/O thread moves messages on
into the kernel's buffers whenever it gets to run, so a full pipe could empty again
behind a test's back (it did, in CI). test_server covers the same rules over TCP.
"""

from __future__ import annotations

import itertools
import json

import pytest
import zmq

from backend.server.transport import SEND_QUEUE_PER_CLIENT, Transport
from shared import protocol

CLIENT = "slow-reader"
ADDRESSES = itertools.count()
HANG_GUARD = 1_000_000  # sends or reads before a test calls it a hang; never reached


@pytest.fixture
def transport():
    address = f"inproc://transport-test-{next(ADDRESSES)}"
    transport = Transport(zmq.Context.instance(), address, None, True,
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


def send_progress_until_one_is_replaced(transport: Transport, job_id: str, step: int) -> int:
    """Send job_id's progress until one replaces another that waits: the client lags
    now, whatever the I/O thread moved meanwhile. Returns the last step sent."""
    coalesced = transport.coalesced
    while transport.coalesced == coalesced:
        step += 1
        assert step < HANG_GUARD
        transport.send_event(CLIENT, None, progress(job_id, step))
    return step


def send_replies_until_kept(transport: Transport, waiting: int) -> int:
    """Send heartbeat replies until `waiting` of them wait in the client's outbox (the
    pipe is full for good); returns how many were sent."""
    peer = transport.peers[CLIENT.encode()]
    sent = 0
    while peer.outbox.reply_count < waiting:
        sent += 1
        assert sent < HANG_GUARD and transport.dropped == 0
        transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": sent})
    return sent


def test_a_lagging_client_gets_every_reply_and_final_event_and_the_newest_progress(
        transport, reader):
    step = fill_the_pipe(transport)
    transport.send_event(CLIENT, None, {"type": "result_ready", "job_id": "a", "frame_count": 4})
    transport.send_reply(CLIENT.encode(), {"type": "status", "req": 1, "jobs": []})
    step = send_progress_until_one_is_replaced(transport, "b", step)  # b goes on meanwhile
    assert transport.backlog
    transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": 2})
    headers = read_everything(transport, reader)

    assert [h["req"] for h in headers if "req" in h] == [1, 2]  # every reply, once, in order
    kinds = [(h["type"], h.get("job_id")) for h in headers]
    assert kinds.count(("result_ready", "a")) == 1
    after_end = kinds[kinds.index(("result_ready", "a")):]
    assert ("progress", "a") not in after_end  # a's waiting progress went with its end
    steps_b = [h["step"] for h in headers if h["type"] == "progress" and h["job_id"] == "b"]
    assert steps_b[-1] == step  # the newest progress arrives
    assert steps_b == sorted(steps_b)
    assert transport.coalesced > 0 and transport.dropped == 0
    assert not transport.backlog


def test_a_client_that_stops_reading_for_good_is_dropped(transport, reader):
    fill_the_pipe(transport)
    peer = transport.peers[CLIENT.encode()]
    sent = 0
    while transport.dropped == 0:  # it never reads, so sooner or later its pipe stays full
        waiting = peer.outbox.reply_count
        sent += 1
        assert sent < HANG_GUARD
        transport.send_reply(CLIENT.encode(), {"type": "heartbeat", "req": sent})
    assert waiting == SEND_QUEUE_PER_CLIENT  # kept up to the bound, dropped one past it
    assert transport.dropped > SEND_QUEUE_PER_CLIENT and not transport.backlog


def test_replies_waiting_for_a_client_forgotten_as_silent_are_dropped(transport, reader):
    fill_the_pipe(transport)
    send_replies_until_kept(transport, 1)
    waiting = len(transport.peers[CLIENT.encode()].outbox)
    transport.forget_silent(silence_s=-1.0)  # every client counts as silent
    assert not transport.backlog and transport.dropped == waiting and not transport.peers


def test_an_event_that_cannot_be_encoded_still_ends_the_job_for_its_client(transport, reader):
    transport.send_event(CLIENT, None, {"type": "result_ready", "job_id": "a", "frame_count": 4,
                                        "sidecar": {"score": float("nan")}})
    assert reader.poll(30_000)
    header = json.loads(reader.recv_multipart()[0])
    assert (header["type"], header["code"], header["job_id"]) == ("error", "internal", "a")
    assert header["message"].endswith("see the server log.")
