"""Helpers for the server tests: real `python -m backend serve` processes, small clips.

Every wait here ends on a real event (a line on stdout, a process exit, a message);
the timeouts only turn a hang into a failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from backend.video import encode_png
from tests.conftest import REPO_ROOT

START_TIMEOUT_S = 300  # model load included, on a busy machine
# The least work the engine accepts: the server tests check plumbing, not pictures.
QUICK_SETTINGS = {"num_frames": 4, "width": 64, "height": 64, "steps": 1, "guided_steps": 0,
                  "guidance_iterations": 0, "inversion_steps": 1}
# With a step delay (--test-step-delay) a job with these settings runs for minutes: it is
# still running, and the jobs behind it still queued, when a test cancels it.
LONG = {"steps": 1000, "inversion_steps": 1000, "guided_steps": 0}
# A server told it has a GPU plans the model's own clip at start (the tiny model's: 24
# frames at 576x320, some 12 s of CPU) ahead of a first job no test sends; tests that
# plan their own small clips skip it.
NO_WARM_UP = ("--test-no-plan-warm-up",)


def settings(prompt: str = "a bear walking", **overrides) -> dict:
    """Settings a job finishes quickly with on CPU."""
    return {"prompt": prompt, **QUICK_SETTINGS, **overrides}


def clip_pngs(count: int = 6, width: int = 48, height: int = 32, shade: int = 0) -> list[bytes]:
    """A tiny clip as PNG frames: a bright square moving right over a flat background."""
    frames = []
    for index in range(count):
        frame = np.full((height, width, 3), shade, np.uint8)
        x = index * (width - 8) // max(1, count - 1)
        frame[height // 2 - 4:height // 2 + 4, x:x + 8] = 255
        frames.append(encode_png(frame))
    return frames


def mask_pngs(count: int = 6, width: int = 48, height: int = 32, box: tuple[int, int, int, int]
              = (16, 8, 32, 24), value: int = 255) -> list[bytes]:
    """A region as greyscale PNG masks: `value` inside box (left, top, right, bottom),
    black elsewhere, in every frame."""
    from PIL import Image

    frames = []
    for _ in range(count):
        mask = np.zeros((height, width), np.uint8)
        left, top, right, bottom = box
        mask[top:bottom, left:right] = value
        buffer = io.BytesIO()
        Image.fromarray(mask, mode="L").save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return frames


# Jobs that damage_jobs breaks, each the way a disk or a person can.
DAMAGED_JOBS = ("truncated", "empty-status", "list-request", "crafted")


def damage_jobs(jobs_dir: Path, outside: Path) -> None:
    """Break the stored jobs named in DAMAGED_JOBS: a truncated status.json, a status.json
    of `{}`, a request.json of `[]`, and a request naming a job id that points at the
    folder `outside` (which a loader trusting ids would delete)."""
    status = jobs_dir / "truncated" / "status.json"
    status.write_text(status.read_text()[:20])
    (jobs_dir / "empty-status" / "status.json").write_text("{}")
    (jobs_dir / "list-request" / "request.json").write_text("[]")
    crafted = jobs_dir / "crafted" / "request.json"
    escape = os.path.relpath(outside, jobs_dir / "crafted")
    crafted.write_text(json.dumps({**json.loads(crafted.read_text()), "job_id": escape}))


@contextlib.contextmanager
def one_reply_server(reply: Callable[[dict], list[bytes]]) -> Iterator[str]:
    """A fake server in this process: answers the first request with reply(header)."""
    import zmq

    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_once() -> None:
        if router.poll(30_000):
            routing_id, header = router.recv_multipart()
            router.send_multipart([routing_id, *reply(json.loads(header))])

    thread = threading.Thread(target=answer_once)
    thread.start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        thread.join()
        router.close()


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def unused_address() -> Iterator[str]:
    """A loopback TCP address where nothing listens, for as long as the block runs.

    The port stays bound (but not listening) by this process, so no other program
    can take it meanwhile; connecting to it is refused at once.
    """
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{holder.getsockname()[1]}"
    finally:
        holder.close()


class ServerProcess:
    """`python -m backend serve --model tiny` on loopback, with its own state folder.

    `module` runs another entry point with the same arguments (tests.fault_server:
    the same server on a file system that fails on demand); `env` adds variables.
    """

    def __init__(self, state_dir: Path, *extra: str, bind: str = "tcp://127.0.0.1:*",
                 module: str = "backend", env: dict[str, str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.extra = list(extra)
        self.bind = bind
        self.module = module
        self.env = env or {}
        self.address: str | None = None
        self.process: subprocess.Popen | None = None
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}-server.log"

    def start(self) -> ServerProcess:
        """Start and wait for the "ready on ADDRESS" line; a restart reuses the address."""
        bind = self.address or self.bind
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve", "--model", "tiny", "--device", "cpu",
             "--bind", bind, "--state-dir", str(self.state_dir),
             "--cache-dir", str(self.state_dir.parent / "cache"), *self.extra],
            cwd=REPO_ROOT, env={**subprocess_env(), **self.env}, stdout=subprocess.PIPE,
            stderr=log, text=True)
        log.close()
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                raise AssertionError(f"server did not start:\n{self.log()}") from None
            if line == "":
                raise AssertionError(f"server exited:\n{self.log()}")
            if "ready on " in line:
                self.address = line.split("ready on ")[1].split(" ")[0]
                return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no clean-up code runs, as in a crash or power loss."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def terminate(self) -> int:
        """SIGTERM, a clean stop, and wait for the exit; returns the exit code."""
        self.process.terminate()
        return self.process.wait(timeout=120)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")


def wait_until(check, what: str, timeout_s: float = 120.0):
    """Call check() until it returns something true and return that; each call is a
    real request to a server, so this ends on a real change, not on a clock."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)  # between two requests, not in place of one
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def wait_for_event(client, job_id: str, kind: str, timeout_s: float = 300.0, **fields) -> dict:
    """Poll until an event of `kind` for `job_id` (with these field values) arrives;
    other events are dropped."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for event in client.poll(0.5):
            if (event["job_id"] == job_id and event["type"] == kind
                    and all(event.get(name) == value for name, value in fields.items())):
                return event
    raise AssertionError(f"no {kind} event for {job_id} within {timeout_s} s")
