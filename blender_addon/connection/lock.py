"""The lock in the backend's state folder: which backend runs there, for every Blender.

Plain Python (no bpy). The Blender that starts a backend writes its pid, address and log
here, so a second Blender uses that backend instead of starting another. A lock whose
process is gone, or is no longer a backend (its id was reused), is stale and removed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "blender-backend.json"  # in the state folder: which backend runs, for every Blender


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
