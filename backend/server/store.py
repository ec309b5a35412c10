"""The job store: every accepted job on disk, and what a restart reads back.

    STATE_DIR/jobs/<job_id>/request.json      settings, owner, digest, frame count, order
                            input/00000.png … the submitted frames, byte for byte
                            status.json       state, attempts, times, error, cancel flag
                            result/00000.png … result/sidecar.json
    STATE_DIR/quarantine/<job_id>-<time>/     damaged jobs, moved aside at start-up

Write order is the store's promise (docs/protocol.md §8): every file goes to a
temporary name, is fsynced and renamed; a job's inputs and request are on disk before
the status.json that makes it a job, and its result before the status that says done.
Any OSError while writing becomes StoreUnavailable, whose sentence says what to free.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.errors import UnderstudyError
from shared.protocol import ErrorCode, JobState, ProtocolError, check_job_id, json_text

log = logging.getLogger("understudy.server")

PROBE_NAME = ".write-probe"


class StoreUnavailable(UnderstudyError):
    """The state folder cannot be written (disk full, read-only, too many open files)."""

    code = ErrorCode.STORE_UNAVAILABLE


class DamagedJob(Exception):
    """A job folder whose files do not read back as a job."""


@dataclass
class Job:
    """One job's record. PERSISTENT fields go to status.json; the rest is live."""

    job_id: str
    seq: int
    client: str
    owner: str | None
    digest: str
    submitted_at: float
    frames_in: int = 0
    state: JobState = JobState.QUEUED
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    error: dict[str, str] | None = None
    frame_count: int | None = None
    # live only
    phase: str | None = None
    step: int | None = None
    total: int | None = None

    PERSISTENT = ("state", "attempts", "started_at", "finished_at", "cancel_requested",
                  "error", "frame_count", "client")

    def status_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTENT}

    def request_record(self, settings: dict[str, Any]) -> dict[str, Any]:
        return {"job_id": self.job_id, "seq": self.seq, "owner": self.owner,
                "digest": self.digest, "submitted_at": self.submitted_at,
                "frames_in": self.frames_in, "settings": settings}


def json_bytes(value: Any) -> bytes:
    return json_text(value, indent=1).encode("utf-8")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the new one."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def fsync_dir(path: Path) -> None:
    """Make renames and new files in `path` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _unwritable(state_dir: Path, error: OSError) -> StoreUnavailable:
    return StoreUnavailable(
        f"The server cannot write its job store in {state_dir} ({_reason(error)}); "
        "free disk space or fix the folder's permissions there, and the server resumes by "
        "itself.")


class JobStore:
    """Jobs on disk; see the module docstring for the layout and the write order."""

    def __init__(self, state_dir: Path) -> None:
        """Open (and create) the store; StoreUnavailable when it cannot be written."""
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / "jobs"
        self.quarantine = self.state_dir / "quarantine"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._probe()
        except OSError as error:
            raise StoreUnavailable(
                f"Cannot use {self.state_dir} as the job store ({_reason(error)}); pick a "
                "writable --state-dir or free space there.") from None

    def folder(self, job_id: str) -> Path:
        return self.root / check_job_id(job_id)

    # ----------------------------------------------------------------- writing

    def probe(self) -> None:
        """Raise StoreUnavailable unless a small file can be written and removed."""
        try:
            self._probe()
        except OSError as error:
            raise _unwritable(self.state_dir, error) from None

    def _probe(self) -> None:
        atomic_write(self.root / PROBE_NAME, b"ok")
        os.remove(self.root / PROBE_NAME)

    def create(self, job: Job, settings: dict[str, Any], frames: list[bytes]) -> None:
        """Store inputs, request, then status (queued): after this the job is accepted.

        On failure nothing of the job is left behind and StoreUnavailable is raised.
        """
        folder = self.folder(job.job_id)
        try:
            if folder.exists():  # leftovers of a submit that never got acknowledged
                shutil.rmtree(folder)
            (folder / "input").mkdir(parents=True)
            for index, frame in enumerate(frames):
                atomic_write(folder / "input" / f"{index:05d}.png", frame)
            fsync_dir(folder / "input")
            atomic_write(folder / "request.json", json_bytes(job.request_record(settings)))
            self._write_status(job)
            fsync_dir(self.root)
        except OSError as error:
            shutil.rmtree(folder, ignore_errors=True)
            raise _unwritable(self.state_dir, error) from None

    def write_status(self, job: Job) -> None:
        try:
            self._write_status(job)
        except OSError as error:
            raise _unwritable(self.state_dir, error) from None

    def _write_status(self, job: Job) -> None:
        folder = self.folder(job.job_id)
        atomic_write(folder / "status.json", json_bytes(job.status_record()))
        fsync_dir(folder)

    def write_result(self, job_id: str, frames: list[bytes], sidecar: dict[str, Any]) -> None:
        result = self.folder(job_id) / "result"
        try:
            if result.exists():
                shutil.rmtree(result)
            result.mkdir()
            for index, frame in enumerate(frames):
                atomic_write(result / f"{index:05d}.png", frame)
            atomic_write(result / "sidecar.json", json_bytes(sidecar))
            fsync_dir(result)
        except OSError as error:
            raise _unwritable(self.state_dir, error) from None

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    # ----------------------------------------------------------------- reading

    def read_request(self, job_id: str) -> dict[str, Any]:
        return json.loads((self.folder(job_id) / "request.json").read_text(encoding="utf-8"))

    def input_paths(self, job_id: str) -> list[Path]:
        return sorted((self.folder(job_id) / "input").glob("*.png"))

    def read_result(self, job_id: str) -> tuple[dict[str, Any], list[bytes]]:
        result = self.folder(job_id) / "result"
        sidecar = json.loads((result / "sidecar.json").read_text(encoding="utf-8"))
        return sidecar, [path.read_bytes() for path in sorted(result.glob("*.png"))]

    def load_all(self) -> list[Job]:
        """Every accepted job, in submission order.

        A folder without status.json was never acknowledged and is removed; a folder
        that does not read back as a job is moved to the quarantine folder and logged,
        never deleted, so nothing accepted is lost to a damaged file.
        """
        jobs = []
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir():
                continue
            if not (folder / "status.json").exists():
                log.warning("Removing %s: a submit that was never acknowledged.", folder.name)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                jobs.append(self._load(folder))
            except DamagedJob as damage:
                self._quarantine(folder, str(damage))
        return sorted(jobs, key=lambda job: job.seq)

    def _load(self, folder: Path) -> Job:
        try:
            request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
            status = json.loads((folder / "status.json").read_text(encoding="utf-8"))
            if not isinstance(request, dict) or not isinstance(status, dict):
                raise DamagedJob("request.json or status.json is not a JSON object")
            job = Job(job_id=check_job_id(request["job_id"]), seq=int(request["seq"]),
                      client=str(status["client"]), owner=request["owner"],
                      digest=str(request["digest"]), submitted_at=float(request["submitted_at"]),
                      frames_in=int(request.get("frames_in", 0)))
            for name in Job.PERSISTENT:
                setattr(job, name, status[name])
            job.state = JobState(job.state)
        except DamagedJob:
            raise
        except ProtocolError as error:
            raise DamagedJob(f"its job id is not valid ({error.message})") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DamagedJob(f"{type(error).__name__}: {error}") from None
        if job.job_id != folder.name:
            raise DamagedJob(f"it names the job {job.job_id!r}, not its folder's name")
        return job

    def _quarantine(self, folder: Path, why: str) -> None:
        self.quarantine.mkdir(exist_ok=True)
        target = self.quarantine / f"{folder.name}-{time.time_ns()}"
        os.replace(folder, target)
        log.error("Moved the damaged job folder %s to %s (%s); it is kept there for you "
                  "to inspect and is no longer served.", folder.name, target, why)
