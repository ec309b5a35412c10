"""The ROUTER socket: every message in and out, within the limits, in the main thread.

A message is read one frame at a time, so the limits are checked before anything is
copied and a flood of frames is drained without being kept. Each client gets a small
bounded send queue (SNDHWM): a client that does not read loses replies and events
instead of making the server buffer them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from backend.server.security import ServerConfigError, check_bind_allowed, client_key, enable_curve
from shared import protocol
from shared.protocol import ErrorCode, ProtocolError

log = logging.getLogger("understudy.server")

# Replies and events queued for one client before more are dropped (each may be a
# whole result, so this, times max_message_bytes, bounds what a slow reader costs).
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
class Peer:
    owner: str | None
    last_heard: float


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
                protocol.check_message_limits(count - 1, total, self.limits)
            except ProtocolError as error:
                refusal = error
                del frames[1:]
        owner = client_key(frames[0]) if frames and self.secure else None
        self.peers[routing_id] = Peer(owner, time.monotonic())
        if refusal is not None:
            log.info("Refused a %d-frame message of %d bytes from %s: %s", count, total,
                     printable(routing_id), refusal.code)
        return Incoming(routing_id, owner, [frame.bytes for frame in frames], refusal)

    # ----------------------------------------------------------------- sending

    def send(self, routing_id: bytes, header: dict[str, Any],
             payload: list[bytes] | None = None) -> bool:
        """Send to one client; a client that is gone or not reading loses the message."""
        try:
            frames = protocol.encode(header, payload)
        except ProtocolError as error:  # e.g. NaN in an engine's sidecar: say so instead
            log.error("Could not encode a %s: %s", header.get("type"), error.message)
            frames = protocol.encode(protocol.error_header(
                ErrorCode.INTERNAL, "The server could not encode its reply; see the server log.",
                **({"req": header["req"]} if "req" in header else {})))
        try:
            self.router.send_multipart([routing_id, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as error:  # EHOSTUNREACH (gone) or EAGAIN (queue full)
            self.dropped += 1
            log.debug("Dropped a %s for %s: %s", header.get("type"), printable(routing_id), error)
            return False

    def send_event(self, client: str, owner: str | None, header: dict[str, Any]) -> None:
        """Send a job's event to its client, if connected as the job's owner."""
        routing_id = routing_id_of(client)
        peer = self.peers.get(routing_id)
        if peer is not None and peer.owner == owner:
            self.send(routing_id, header)

    def forget_silent(self, silence_s: float) -> None:
        now = time.monotonic()
        for routing_id, peer in list(self.peers.items()):
            if now - peer.last_heard > silence_s:
                del self.peers[routing_id]
                log.info("Forgot silent client %s (its jobs are kept).", printable(routing_id))


def client_name(routing_id: bytes) -> str:
    """A routing id as text for job records (latin-1: any bytes, round trip exact)."""
    return routing_id.decode("latin-1")


def routing_id_of(client: str) -> bytes:
    return client.encode("latin-1")
