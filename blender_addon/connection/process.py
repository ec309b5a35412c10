"""The backend on this computer: find the project, start it, watch it, share it, stop it.

Plain Python (no bpy), so every decision is tested without Blender; local.py
carries it out from Blender's preferences, timers and the interface's operators.

- The project and the command come from install.py; the lock that lets a second
  Blender find the running backend, from lock.py.
- `python -m backend serve --bind ADDRESS` runs as a child process, in its own session
  (so it can outlive Blender when asked to keep running), writing everything it says
  to a log file in its state folder. It is ready when the log says "ready on".
- Only a backend this process started is ever stopped; one found through a lock or
  already listening (started by hand) is used and left alone.
- A backend that exits on its own after it was ready is restarted once: jobs survive
  in its durable store (the server re-queues the job that was running).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from enum import StrEnum
from pathlib import Path

from ..rules.errors import UserError
from ..rules.server_hello import gpu_text
from .install import (
    SETUP_COMMAND,
    Install,
    LocalSettings,
    listening,
    serve_command,
    state_folder,
)
from .lock import (
    LOCK_NAME,
    Lock,
    claim_lock,
    live_lock,
    parse_lock,
    pid_alive,
    rewrite_lock,
)

LOG_NAME = "blender-backend.log"  # in the state folder: everything the backend printed
READY_MARK = "ready on "  # the server's "Understudy server ready on ADDRESS (...)" line
ERROR_PREFIX = "error: "  # the command line's one-sentence failure line
TAIL_LINES = 6  # log lines the panel shows when something went wrong
START_TIMEOUT_S = 900.0  # a real model's first load from disk can take minutes
STOP_TIMEOUT_S = 30.0  # a clean stop re-queues the running job; then it is killed
RESTARTS = 1  # how often a backend that exits on its own is started again


class BackendState(StrEnum):
    """What the panel says about the backend."""

    STOPPED = "stopped"  # nothing runs (or this Blender has not looked yet)
    STARTING = "starting"  # the process runs and is loading the model
    READY = "ready"  # answering, no job running
    BUSY = "busy"  # answering, running or queueing jobs
    EXITED = "exited"  # it stopped on its own: the last log lines say why


def ready_line(line: str) -> bool:
    return READY_MARK in line


def describe_hello(hello: dict) -> tuple[BackendState, str]:
    """(ready or busy, "model M on D, GPU NAME, SIZE (FREE free), …") from the server's hello."""
    parts = [f"model {hello.get('model', '?')} on {hello.get('device', '?')}"]
    gpu = gpu_text(hello)  # the hello's `gpu` (docs/protocol.md §4)
    if gpu:
        parts.append(gpu)
    queued = hello.get("queue_length")
    busy = isinstance(queued, int) and queued > 0
    if busy:
        parts.append(f"{queued} job{'s' if queued != 1 else ''} queued or running")
    return (BackendState.BUSY if busy else BackendState.READY), ", ".join(parts)


class LocalBackend:
    """The backend on this computer as one Blender sees it.

    owned: this Blender started the process (only then is it ever stopped).
    """

    def __init__(self) -> None:
        self.state = BackendState.STOPPED
        self.detail = ""  # ready: model and device; exited: why
        self.address = ""
        self.owned = False
        self.process: subprocess.Popen | None = None
        self.pid = 0
        self.log_path: Path | None = None
        self.lock_path: Path | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.restarts_left = RESTARTS
        self._log_offset = 0
        self._partial = ""
        self._launch: tuple[Install, LocalSettings] | None = None

    # ------------------------------------------------------------------ what runs

    @property
    def answering(self) -> bool:
        return self.state in (BackendState.READY, BackendState.BUSY)

    @property
    def running(self) -> bool:
        return self.state in (BackendState.STARTING, BackendState.READY, BackendState.BUSY)

    def last_line(self) -> str:
        return self.tail[-1] if self.tail else ""

    def find(self, install: Install, settings: LocalSettings) -> bool:
        """Find a backend that runs already: a lock of another Blender, or something
        listening at the address (started by hand). Neither is ever stopped from here."""
        if self.running and self.address == settings.address.strip():
            return True
        lock_path = state_folder(settings, install) / LOCK_NAME
        lock = live_lock(lock_path)
        if lock is not None and lock.address == settings.address.strip():
            self._adopt(lock.pid, lock.address, Path(lock.log), lock_path)
            return True
        if listening(settings.address):
            self._adopt(0, settings.address.strip(), None, None)
            return True
        return False

    def _adopt(self, pid: int, address: str, log: Path | None, lock_path: Path | None) -> None:
        self.owned, self.process, self.pid, self.address = False, None, pid, address
        self.log_path, self.lock_path = log, lock_path
        self.tail.clear()
        self._log_offset, self._partial = 0, ""
        self.state = BackendState.STARTING if pid else BackendState.READY
        self.detail = ""
        self.poll()
        if pid and listening(address):
            self.state = BackendState.READY

    def start(self, install: Install, settings: LocalSettings) -> None:
        """Start `python -m backend serve` as a child process; UserError when another
        Blender is starting one at the same moment and it cannot be found."""
        command = serve_command(install, settings)
        folder = state_folder(settings, install)
        self.lock_path, self.log_path = folder / LOCK_NAME, folder / LOG_NAME
        placeholder = Lock(os.getpid(), settings.address.strip(), str(self.log_path), os.getpid())
        if not claim_lock(self.lock_path, placeholder):
            if self.find(install, settings):
                return
            live_lock(self.lock_path)  # stale: removed
            if not claim_lock(self.lock_path, placeholder):
                raise UserError(f"Another Blender is starting the backend ({self.lock_path}); "
                                f"try again in a moment.")
        self._launch = (install, settings)
        try:
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command, cwd=install.project, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    **detached())
        except OSError as error:
            self._remove_lock()
            raise UserError(f"The backend could not be started ({error}); run `{SETUP_COMMAND}` "
                            f"in {install.project}, then try again.") from error
        self.owned, self.pid, self.address = True, self.process.pid, settings.address.strip()
        rewrite_lock(self.lock_path, Lock(self.pid, self.address, str(self.log_path),
                                          os.getpid()))
        self.state, self.detail = BackendState.STARTING, ""
        self.tail.clear()
        self._log_offset, self._partial = 0, ""

    # ------------------------------------------------------------------ watching

    def poll(self) -> BackendState:
        """Read what the backend printed since the last call and notice an exit; a backend
        this Blender started that exits on its own after it was ready is restarted once."""
        self._read_log()
        if self.state == BackendState.STOPPED:
            return self.state
        exit_code = self._exit_code()
        if exit_code is not None:
            was_answering = self.answering
            self.state = BackendState.EXITED
            self.detail = f"exit code {exit_code}" if exit_code != "gone" else "it is gone"
            if self.owned:
                self._remove_lock()
            if self.owned and was_answering and self.restarts_left > 0 and self._launch:
                self.restarts_left -= 1
                self.start(*self._launch)
        return self.state

    def _exit_code(self):
        if self.process is not None:
            return self.process.poll()
        if self.pid and not pid_alive(self.pid):
            return "gone"
        return None

    def _read_log(self) -> None:
        if self.log_path is None:
            return
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                data = log.read()
        except OSError:
            return
        self._log_offset += len(data)
        text = self._partial + data.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()
        for line in lines:
            line = line.rstrip()
            if not line:
                continue
            self.tail.append(line)
            if self.state == BackendState.STARTING and ready_line(line):
                self.state = BackendState.READY

    def wait_ready(self, report=None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until the backend answers (background mode, where timers never fire);
        report(line) hears each new log line. UserError if it exits or takes too long."""
        deadline = time.monotonic() + timeout_s
        seen = ""
        while True:
            state = self.poll()
            if report is not None and self.last_line() != seen:
                seen = self.last_line()
                report(seen)
            if self.answering:
                return
            if state != BackendState.STARTING:
                raise UserError(self.failure())
            if time.monotonic() > deadline:
                raise UserError(f"The backend did not finish loading within {timeout_s:.0f} s; "
                                f"see its log {self.log_path}.")
            time.sleep(0.1)  # the backend writes its log at its own pace; nothing to wait on

    def failure(self) -> str:
        """One sentence on a backend that stopped: the backend's own one-sentence error when
        it ended with one (`error: ...`), else its last log line; and the log's place."""
        last = self.last_line()
        if last.startswith(ERROR_PREFIX):
            return (f"The backend stopped: {last.removeprefix(ERROR_PREFIX).rstrip('.')} "
                    f"(the whole log is {self.log_path}).")
        return (f"The backend stopped ({last or self.detail or 'no output'}); fix the cause "
                f"named in its log {self.log_path} and start it again.")

    def status_text(self) -> str:
        if self.state == BackendState.STARTING:
            return "Starting the backend: loading the model" + (
                f" ({self.last_line()})" if self.last_line() else "")
        if self.answering:
            text = f"Backend {self.state} at {self.address}"
            text += f" ({self.detail})" if self.detail else ""
            return text if self.owned else text + "; started elsewhere, so never stopped from here"
        if self.state == BackendState.EXITED:
            return f"Backend exited ({self.detail}); its log: {self.log_path}"
        return "Backend stopped"

    # ------------------------------------------------------------------ stopping

    def stop(self) -> bool:
        """Stop the backend if this Blender started it (a clean stop: the running job goes
        back to the queue); forget one it only found. True if a process was stopped."""
        stopped = False
        if self.owned and self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM if sys.platform != "win32"
                                     else signal.CTRL_BREAK_EVENT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            stopped = True
        if self.owned:
            self._remove_lock()
        self.state, self.detail, self.owned, self.process = BackendState.STOPPED, "", False, None
        return stopped

    def _remove_lock(self) -> None:
        if self.lock_path is None:
            return
        try:
            lock = parse_lock(self.lock_path.read_text())
            if lock is None or lock.owner_pid == os.getpid():
                self.lock_path.unlink()
        except OSError:
            pass


def detached() -> dict:
    """Popen arguments that put the backend in its own session / process group, so it can
    keep running after Blender quits and a Ctrl-C in Blender's terminal does not reach it."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}
