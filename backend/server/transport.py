"""The ROUTER socket: every message in and out, within the limits, in the main thread.

A message is read one frame at a time, so the limits are checked before anything is
copied and a flood of frames is drained without being kept.

Sending: each client's ZeroMQ pipe holds SEND_QUEUE_PER_CLIENT messages (SNDHWM).
What does not fit waits in the client's Outbox, by kind, so that a client that is
slow for a while loses nothing it needs:
- replies to its requests and a job's final event (result_ready, error, cancelled)
  wait in order and are never thinned;
- progress waits as the newest event per job (a newer one replaces an older one, a
  job's final event removes it).
A client that has stopped reading for good is dropped as before: once its waiting
replies pass the bound (more than SEND_QUEUE_PER_CLIENT of them, or more bytes than
the largest message the server takes), when it is forgotten as silent, or when
ZeroMQ says it is gone, its outbox is discarded and counted in `dropped`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from backend.server.security import ServerConfigError, check_bind_allowed, client_key, enable_curve
from shared import protocol
from shared.errors import ErrorCode
from shared.protocol import EventType, ProtocolError

log = logging.getLogger("understudy.server")

# Messages in one client's ZeroMQ pipe (SNDHWM), and replies waiting behind a full pipe
# before the client counts as not reading (each may be a whole result, so this, times
# max_message_bytes, bounds what a slow reader costs).
SEND_QUEUE_PER_CLIENT = 8


@dataclass
class Incoming:
    """One message read off the socket. `refusal` is set when it broke a size limit;
    then `frames` holds only the header frame (for its `req`)."""

    routing_id: bytes
    owner: str | None
    frames: list[bytes]
    refusal: ProtocolError | None = None


@dataclass
class Outbox:
    """What one client's full pipe could not take yet; see the module docstring."""

    ordered: deque[tuple[list[bytes], bool]] = field(default_factory=deque)  # (frames, reply?)
    progress: dict[str, list[bytes]] = field(default_factory=dict)  # job id → newest event
    reply_count: int = 0
    reply_bytes: int = 0

    def __len__(self) -> int:
        return len(self.ordered) + len(self.progress)


@dataclass
class Peer:
    owner: str | None
    last_heard: float
    outbox: Outbox = field(default_factory=Outbox)


def printable(routing_id: bytes) -> str:
    """A client id for the log: printable ASCII kept, every other byte as \\xNN, so an
    id cannot forge log lines."""
    return "".join(chr(b) if 0x21 <= b <= 0x7E and b != 0x5C else f"\\x{b:02x}"
                   for b in routing_id[:80])


class Transport:
    """Owns the ROUTER socket (main thread only)."""

    def __init__(self, context: zmq.Context, bind: str, keys_dir: Path | None, insecure: bool,
                 limits: dict[str, int]) -> None:
        self.context = context
        self.bind_address = bind
        self.keys_dir = keys_dir
        self.insecure = insecure
        self.limits = limits
        self.router: zmq.Socket | None = None
        self.authenticator = None
        self.address = bind
        self.peers: dict[bytes, Peer] = {}
        self.dropped = 0  # messages not sent: client gone or not reading
        self.coalesced = 0  # progress events replaced by a newer one before they were sent

    @property
    def secure(self) -> bool:
        return self.authenticator is not None

    def bind(self) -> str:
        """Create the ROUTER socket (CURVE when keys are given) and bind it."""
        check_bind_allowed(self.bind_address, self.keys_dir, self.insecure)
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unroutable sends raise; we drop them
        router.setsockopt(zmq.SNDHWM, SEND_QUEUE_PER_CLIENT)
        router.setsockopt(zmq.MAXMSGSIZE, self.limits["max_message_bytes"])
        router.setsockopt(zmq.HEARTBEAT_IVL, protocol.ZMTP_HEARTBEAT_IVL_MS)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, protocol.ZMTP_HEARTBEAT_TIMEOUT_MS)
        if self.keys_dir is not None:
            self.authenticator = enable_curve(self.context, router, Path(self.keys_dir))
        else:
            # Without keys a reconnecting client takes its id back at once. With keys an id
            # in use stays with its connection, so another key cannot take over a client.
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            router.bind(self.bind_address)
        except zmq.ZMQError as error:
            router.close()
            self.close()
            raise ServerConfigError(f"Cannot bind {self.bind_address} ({error}); pick another "
                                    "address or port, or stop the server using it.") from None
        self.router = router
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.address

    def close(self) -> None:
        if self.router is not None:
            self.router.close(0)
            self.router = None
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    # ----------------------------------------------------------------- receiving

    def receive(self) -> Incoming | None:
        """The next message, or None when none is waiting."""
        try:
            routing = self.router.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        routing_id = routing.bytes
        frames: list[zmq.Frame] = []
        count = total = 0
        refusal = None
        more = routing.more
        while more:  # Frame.more, not getsockopt(RCVMORE): a flood drains 3× faster
            frame = self.router.recv(copy=False)
            more = frame.more
            count += 1
            if refusal is not None:  # drain the rest of a refused message, keeping nothing
                continue
            total += len(frame)
            frames.append(frame)
            try:
                protocol.check_message_limits(count - 1, total, self.limits,
                                              protocol.max_payload_frames(self.limits))
            except ProtocolError as error:
                refusal = error
                del frames[1:]
        owner = client_key(frames[0]) if frames and self.secure else None
        peer = self.peers.get(routing_id)
        if peer is None or peer.owner != owner:  # what waited was another key's
            if peer is not None:
                self._discard(routing_id, peer, "its id now belongs to another key")
            peer = self.peers[routing_id] = Peer(owner, time.monotonic())
        peer.last_heard = time.monotonic()
        if refusal is not None:
            log.info("Refused a %d-frame message of %d bytes from %s: %s", count, total,
                     printable(routing_id), refusal.code)
        return Incoming(routing_id, owner, [frame.bytes for frame in frames], refusal)

    # ----------------------------------------------------------------- sending

    @property
    def backlog(self) -> bool:
        """True while some client's outbox holds messages (the main loop retries soon)."""
        return any(peer.outbox for peer in self.peers.values())

    def send_reply(self, routing_id: bytes, header: dict[str, Any],
                   payload: list[bytes] | None = None) -> None:
        """Answer a request: sent now, or kept in order until the client's pipe has room."""
        frames = self._encode(header, payload)
        peer = self.peers.get(routing_id)
        if peer is None:  # forgotten between its request and this answer: try once
            self._try_send(routing_id, frames, header.get("type"))
            return
        self._keep(routing_id, peer, frames, reply=True)

    def send_event(self, client: str, owner: str | None, header: dict[str, Any]) -> None:
        """Send a job's event to its client, if connected as the job's owner. Progress
        may be thinned to the newest per job; a job's final event never is."""
        routing_id = routing_id_of(client)
        peer = self.peers.get(routing_id)
        if peer is None or peer.owner != owner:
            return
        frames = self._encode(header)
        if header.get("type") == EventType.PROGRESS:
            job_id = str(header.get("job_id"))
            if not peer.outbox:
                if self._try_send(routing_id, frames, header["type"]) is not False:
                    return  # sent, or the client is gone (then nothing waits either)
            if peer.outbox.progress.pop(job_id, None) is not None:
                self.coalesced += 1
            peer.outbox.progress[job_id] = frames
            return
        if peer.outbox.progress.pop(str(header.get("job_id")), None) is not None:
            self.coalesced += 1  # progress after the end would only mislead
        self._keep(routing_id, peer, frames, reply=False)

    def flush(self) -> None:
        """Send what waits in every outbox, as far as each client's pipe takes it."""
        for routing_id, peer in list(self.peers.items()):
            if peer.outbox:
                self._drain(routing_id, peer)

    def _keep(self, routing_id: bytes, peer: Peer, frames: list[bytes], reply: bool) -> None:
        """Queue a message that must arrive, then send as much as the pipe takes; a
        client whose waiting replies pass the bound has stopped reading: drop it."""
        outbox = peer.outbox
        outbox.ordered.append((frames, reply))
        if reply:
            outbox.reply_count += 1
            outbox.reply_bytes += sum(len(frame) for frame in frames)
        self._drain(routing_id, peer)
        if outbox.reply_count > SEND_QUEUE_PER_CLIENT or (
                outbox.reply_count > 1
                and outbox.reply_bytes > self.limits["max_message_bytes"]):
            self._discard(routing_id, peer, "it does not read its replies")

    def _drain(self, routing_id: bytes, peer: Peer) -> None:
        """Send waiting messages in order (replies and final events first) until the
        pipe is full; a client ZeroMQ calls gone loses them all."""
        outbox = peer.outbox
        while outbox.ordered:
            frames, reply = outbox.ordered[0]
            sent = self._try_send(routing_id, frames, "reply" if reply else "event")
            if sent is False:
                return
            outbox.ordered.popleft()
            if reply:
                outbox.reply_count -= 1
                outbox.reply_bytes -= sum(len(frame) for frame in frames)
            if sent is None:
                self._discard(routing_id, peer, "it is gone")
                return
        while outbox.progress:
            job_id, frames = next(iter(outbox.progress.items()))
            sent = self._try_send(routing_id, frames, "progress")
            if sent is False:
                return
            del outbox.progress[job_id]
            if sent is None:
                self._discard(routing_id, peer, "it is gone")
                return

    def _try_send(self, routing_id: bytes, frames: list[bytes], what: Any) -> bool | None:
        """True: sent. False: the client's pipe is full (try again later). None: the
        client is gone (the message is lost and counted)."""
        try:
            self.router.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as error:  # EHOSTUNREACH: not connected
            self.dropped += 1
            log.debug("Dropped a %s for %s: %s", what, printable(routing_id), error)
            return None

    def _discard(self, routing_id: bytes, peer: Peer, why: str) -> None:
        """Drop everything waiting for a client that will not take it."""
        count = len(peer.outbox)
        if count:
            self.dropped += count
            log.info("Dropped %d messages waiting for %s: %s.", count, printable(routing_id), why)
        peer.outbox = Outbox()

    @staticmethod
    def _encode(header: dict[str, Any], payload: list[bytes] | None = None) -> list[bytes]:
        try:
            return protocol.encode(header, payload)
        except ProtocolError as error:  # e.g. NaN in an engine's sidecar: say so instead
            log.error("Could not encode a %s: %s", header.get("type"), error.message)
            return protocol.encode(protocol.error_header(
                ErrorCode.INTERNAL, "The server could not encode its reply; see the server log.",
                **({"req": header["req"]} if "req" in header else {}),
                **({"job_id": header["job_id"]} if "job_id" in header else {})))

    def forget_silent(self, silence_s: float) -> None:
        now = time.monotonic()
        for routing_id, peer in list(self.peers.items()):
            if now - peer.last_heard > silence_s:
                self._discard(routing_id, peer, "it has been silent too long")
                del self.peers[routing_id]
                log.info("Forgot silent client %s (its jobs are kept).", printable(routing_id))


def client_name(routing_id: bytes) -> str:
    """A routing id as text for job records (latin-1: any bytes, round trip exact)."""
    return routing_id.decode("latin-1")


def routing_id_of(client: str) -> bytes:
    return client.encode("latin-1")
