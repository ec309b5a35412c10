"""The backend on this computer: find the project, start it, watch it, share it, stop it.

Plain Python (no bpy), so every decision is tested without Blender; local_backend.py
carries it out from Blender's preferences, operators and timers.

- The project is found from what the editor enters: the project folder (its `.venv`
  Python) or that Python itself. It is checked at once by asking that Python for the
  command line's defaults (the state folder, the model, the cache folder): one
  sentence naming the command to run when there is no backend there.
- `python -m backend serve --bind ADDRESS` runs as a child process, in its own session
  (so it can outlive Blender when asked to keep running), writing everything it says
  to a log file in its state folder. It is ready when the log says "ready on".
- A lock file in the state folder records the backend's pid, address and log, so a
  second Blender uses the running backend instead of starting another. A lock whose
  process is gone (or is no longer a backend) is stale and replaced.
- Only a backend this process started is ever stopped; one found through a lock or
  already listening (started by hand) is used and left alone.
- A backend that exits on its own after it was ready is restarted once: jobs survive
  in its durable store (the server re-queues the job that was running).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from .plan import UserError

LOCK_NAME = "blender-backend.json"  # in the state folder: which backend runs, for every Blender
LOG_NAME = "blender-backend.log"  # in the state folder: everything the backend printed
READY_MARK = "ready on "
ERROR_PREFIX = "error: "  # the command line's one-sentence failure line  # the server's "Understudy server ready on ADDRESS (...)" line
TAIL_LINES = 6  # log lines the panel shows when something went wrong
START_TIMEOUT_S = 900.0  # a real model's first load from disk can take minutes
STOP_TIMEOUT_S = 30.0  # a clean stop re-queues the running job; then it is killed
RESTARTS = 1  # how often a backend that exits on its own is started again
SETUP_COMMAND = "python build.py"  # what sets up the project's environment
# Asks the project's Python for the command line's defaults: the one place they live.
DEFAULTS_QUERY = ("import json; from backend.edit import DEFAULT_CACHE, DEFAULT_MODEL; "
                  "from backend.server.app import DEFAULT_STATE_DIR; "
                  "print(json.dumps({'model': DEFAULT_MODEL, 'cache_dir': str(DEFAULT_CACHE), "
                  "'state_dir': str(DEFAULT_STATE_DIR)}))")


class BackendState(StrEnum):
    """What the panel says about the backend."""

    STOPPED = "stopped"  # nothing runs (or this Blender has not looked yet)
    STARTING = "starting"  # the process runs and is loading the model
    READY = "ready"  # answering, no job running
    BUSY = "busy"  # answering, running or queueing jobs
    EXITED = "exited"  # it stopped on its own: the last log lines say why


@dataclass(frozen=True)
class Install:
    """A project checkout whose Python can run the backend, and the command line's defaults."""

    python: str
    project: str
    defaults: dict  # model, cache_dir, state_dir: what `serve` uses without flags


@dataclass(frozen=True)
class LocalSettings:
    """How to run the backend on this computer (the preferences); empty: the command line's
    default."""

    address: str
    model: str = ""
    device: str = ""
    state_dir: str = ""
    cache_dir: str = ""
    extra_args: str = ""  # more `serve` flags, as typed on a command line


@dataclass(frozen=True)
class Lock:
    """The lock file's record of a running backend."""

    pid: int
    address: str
    log: str
    owner_pid: int  # the Blender that started it

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "address": self.address, "log": self.log,
                           "owner_pid": self.owner_pid})


def venv_python(project: Path) -> Path:
    """The Python of a project's `.venv` (build.py makes it)."""
    if sys.platform == "win32":
        return project / ".venv" / "Scripts" / "python.exe"
    return project / ".venv" / "bin" / "python"


def is_project(folder: Path) -> bool:
    return (folder / "backend" / "__main__.py").is_file()


def project_of(python: Path) -> Path | None:
    """The project a Python belongs to: the nearest folder above it holding `backend/`."""
    for folder in python.absolute().parents:
        if is_project(folder):
            return folder
    return None


def locate(entered: str) -> tuple[Path, Path]:
    """(python, project) from a project folder or its Python; UserError in one sentence."""
    text = entered.strip()
    if not text:
        raise UserError("Set the project folder (or its Python) in the Understudy preferences, "
                        "under Backend.")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; pick the folder the Understudy project is in "
                        f"(or its .venv Python) in the preferences.")
    if path.is_dir():
        if not is_project(path):
            raise UserError(f"{path} holds no Understudy backend (no backend/ folder); pick the "
                            f"folder the project is in, where `{SETUP_COMMAND}` was run.")
        python = venv_python(path)
        if not python.is_file():
            raise UserError(f"{path} has no backend environment yet; run `{SETUP_COMMAND}` "
                            f"there, then try again.")
        return python, path
    project = project_of(path)
    if project is None:
        raise UserError(f"{path} is not the Python of an Understudy project; pick the project "
                        f"folder, where `{SETUP_COMMAND}` was run.")
    return path, project


def find_install(entered: str) -> Install:
    """Check a project folder or Python and ask it for the command line's defaults."""
    python, project = locate(entered)
    try:
        answer = subprocess.run([str(python), "-c", DEFAULTS_QUERY], cwd=project,
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"{python} could not be run ({error}); run `{SETUP_COMMAND}` in "
                        f"{project}, then try again.") from error
    try:
        defaults = json.loads(answer.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        defaults = None
    if answer.returncode != 0 or not isinstance(defaults, dict):
        raise UserError(f"{python} cannot run the backend (its environment is incomplete); run "
                        f"`{SETUP_COMMAND}` in {project}, then try again.")
    return Install(str(python), str(project), defaults)


def loopback_host_port(address: str) -> tuple[str, int]:
    """("127.0.0.1", 5555) from "tcp://127.0.0.1:5555"; the backend on this computer listens
    on loopback only (another computer reaches it through "a server" with keys)."""
    text = address.strip()
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    if not text.startswith("tcp://") or not port.isdigit() or host not in (
            "127.0.0.1", "localhost", "::1"):
        raise UserError(f"The backend on this computer listens on a loopback address such as "
                        f"tcp://127.0.0.1:5555, not {address!r}; change the address in the "
                        f"preferences.")
    return host, int(port)


def listening(address: str) -> bool:
    """Whether something accepts connections at this loopback address (refused at once
    when nothing listens, so this never waits for a timeout)."""
    host, port = loopback_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def state_folder(settings: LocalSettings, install: Install) -> Path:
    return Path(settings.state_dir or install.defaults["state_dir"]).expanduser()


def serve_command(install: Install, settings: LocalSettings) -> list[str]:
    """`python -m backend serve` with the flags the preferences set (empty ones are left
    to the command line's defaults)."""
    command = [install.python, "-m", "backend", "serve", "--bind", settings.address.strip(),
               "--state-dir", str(state_folder(settings, install))]
    for flag, value in (("--model", settings.model), ("--device", settings.device),
                        ("--cache-dir", settings.cache_dir)):
        if value.strip():
            command += [flag, value.strip()]
    try:
        command += shlex.split(settings.extra_args)
    except ValueError as error:
        raise UserError(f"The extra serve flags cannot be read ({error}); fix them in the "
                        f"preferences.") from error
    return command


def parse_lock(text: str) -> Lock | None:
    """A lock file's record, or None when it is not one (damaged, half written)."""
    try:
        data = json.loads(text)
        lock = Lock(int(data["pid"]), str(data["address"]), str(data["log"]),
                    int(data.get("owner_pid", 0)))
    except (ValueError, TypeError, KeyError):
        return None
    return lock if lock.pid > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (signal 0 only asks, on POSIX)."""
    if sys.platform == "win32":
        import ctypes

        handle = ctypes.windll.kernel32.OpenProcess(0x1000, False, pid)  # query limited info
        if not handle:
            return False
        code = ctypes.c_ulong()
        ctypes.windll.kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        ctypes.windll.kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def is_backend_process(pid: int) -> bool:
    """Whether the process is (still) a backend server, not a new process that got the id of
    a dead one; where the command line cannot be read, a live pid counts."""
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        parts = cmdline.read_bytes().split(b"\0")
    except OSError:
        return True
    return b"backend" in parts and b"serve" in parts


def live_lock(path: Path) -> Lock | None:
    """The lock's record while its backend runs; a stale or damaged lock is removed."""
    try:
        lock = parse_lock(path.read_text())
    except OSError:
        return None
    if lock is not None and lock.pid == lock.owner_pid and pid_alive(lock.pid):
        return lock  # another Blender's claim, written the moment before it starts the backend
    if lock is not None and is_backend_process(lock.pid):
        return lock
    try:
        path.unlink()
    except OSError:
        pass
    return None


def claim_lock(path: Path, lock: Lock) -> bool:
    """Create the lock file, only if there is none (two Blenders starting at once: one wins)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(descriptor, "w") as file:
        file.write(lock.to_json())
    return True


def rewrite_lock(path: Path, lock: Lock) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(lock.to_json())
    os.replace(temporary, path)


def ready_line(line: str) -> bool:
    return READY_MARK in line


def describe_hello(hello: dict) -> tuple[BackendState, str]:
    """(ready or busy, "model M on D, GPU memory ...") from the server's hello."""
    engine = hello.get("engine") if isinstance(hello.get("engine"), dict) else {}
    parts = [f"model {hello.get('model', '?')} on {hello.get('device', '?')}"]
    memory = engine.get("gpu_memory") or hello.get("gpu_memory")
    if memory:
        parts.append(f"GPU memory {memory}")
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
