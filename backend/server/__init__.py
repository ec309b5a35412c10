"""The job server: many clients, one FIFO queue, and the engines that run its jobs: one
warm engine in this process, or a pool of Ray actors, one per GPU (backend/cluster/).

    python -m backend serve --model tiny --bind tcp://127.0.0.1:5555

The wire protocol, job states and store guarantees are in docs/protocol.md. By duty:

    transport.py   the ROUTER socket: reading within limits, bounded sending
    requests.py    one answer per request (validation happens here)
    planning.py    memory plans on their own thread; submit and plan wait for theirs
    book.py        jobs, the queue and ownership, under one lock, mirrored to disk
    store.py       the on-disk job store, its write order and its recovery
    job_thread.py  runs queued jobs on one engine, one thread per engine (engine_api.py:
                   what it needs)
    frames.py      PNG checks and decoding only the frames a job uses
    security.py    keys and the bind policy
    app.py         wires them together; `serve`
"""

from backend.server.app import DEFAULT_STATE_DIR, Server, ServerConfig, serve
from backend.server.security import ServerConfigError, check_bind_allowed, is_loopback, write_keys

__all__ = ["DEFAULT_STATE_DIR", "Server", "ServerConfig", "ServerConfigError",
           "check_bind_allowed", "is_loopback", "serve", "write_keys"]
