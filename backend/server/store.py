"""The job store: every accepted job on disk, and what a restart reads back.

    STATE_DIR/jobs/<job_id>/request.json      settings, owner, client id, digest, order,
                                              and the SHA-256 of every input frame
                            input/00000.png … the submitted frames, byte for byte
                            mask/<r>/00000.png … region r's mask frames (r from 0), when
                                              the job has regions; request.json keeps
                                              their SHA-256 too
                            status.json       state, attempts, times, error, cancel flag
                            result/00000.png … result/frames.json (each frame's SHA-256),
                            result/sidecar.json (written last: the result is complete)
                            takes/<k>/00000.png … take k's frames, frames.json, sidecar.json
                                              (last), for a job of several takes, each as
                                              soon as it is made; result/ is then take 1's
                                              frames with the sidecar listing every take
    STATE_DIR/quarantine/<job_id>-<time>/     damaged jobs, moved aside at start-up

Write order is the store's promise (docs/protocol.md §8): every file goes to a
temporary name, is fsynced and renamed; a job's inputs and request are on disk before
the status.json that makes it a job, and its result before the status that says done.
Any OSError while writing becomes StoreUnavailable, whose sentence says what to free.

At start-up the store rebuilds what its files prove: a job whose status.json is
damaged is done again when its result verifies against frames.json, else queued when
its inputs verify against request.json; only a job that proves neither (or whose
request.json is damaged) goes to quarantine, and is remembered there so that clients
asking for it hear `damaged` with the folder's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.errors import UnderstudyError
from shared.errors import ErrorCode
from shared.protocol import JobState, ProtocolError, check_job_id, json_text

log = logging.getLogger("understudy.server")

PROBE_NAME = ".write-probe"
MASK_FOLDER = "mask"  # mask/<region>/00000.png …
REFERENCE_FOLDER = "references"  # a job's reference images, 00000.png …
TAKES_FOLDER = "takes"  # takes/<take>/00000.png …, the take numbered from 1


class StoreUnavailable(UnderstudyError):
    """The state folder cannot be written (disk full, read-only, too many open files)."""

    code = ErrorCode.STORE_UNAVAILABLE


class DamagedJob(Exception):
    """A job folder whose files do not read back as a job."""


class DamagedResult(Exception):
    """A result whose files do not verify; str() says which file, for a sentence."""


@dataclass(frozen=True)
class Quarantined:
    """A job moved to quarantine: where it lies, and its owner key when readable."""

    folder: Path
    owner: str | None


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
    takes_done: list[int] = field(default_factory=list)  # takes on disk, verified at start-up
    takes: int = 1  # the takes the job makes in all (request.json's `takes`)
    # live only
    phase: str | None = None
    step: int | None = None
    total: int | None = None

    PERSISTENT = ("state", "attempts", "started_at", "finished_at", "cancel_requested",
                  "error", "frame_count", "client", "takes_done")
    OPTIONAL = {"takes_done": list}  # absent from status.json written before takes: default

    def status_record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.PERSISTENT}

    def request_record(self, settings: dict[str, Any], inputs: list[str],
                       masks: list[list[str]] | None = None,
                       takes: dict[str, Any] | None = None,
                       references: list[str] | None = None) -> dict[str, Any]:
        """request.json; `inputs`: each input frame's SHA-256, to prove them intact;
        `masks`: each region's mask frames' SHA-256 (only when the job has regions);
        `takes`: {"seeds", "prompts"} (only when the job asks for takes);
        `references`: each reference image's SHA-256 (only when the job has any);
        `client`: the submitting client id, for a rebuilt job's events."""
        record = {"job_id": self.job_id, "seq": self.seq, "owner": self.owner,
                  "client": self.client,
                  "digest": self.digest, "submitted_at": self.submitted_at,
                  "frames_in": self.frames_in, "settings": settings, "inputs": inputs}
        if masks:
            record["masks"] = masks
        if takes:
            record["takes"] = takes
        if references:
            record["references"] = references
        return record


def frame_digests(frames: list[bytes]) -> list[str]:
    """Each frame's SHA-256 (hex), as request.json and result/frames.json keep them."""
    return [hashlib.sha256(frame).hexdigest() for frame in frames]


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object from a file; OSError or ValueError when it is not one."""
    value = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(value, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return value


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
        self.quarantined: dict[str, Quarantined] = {}  # job id → where it was moved
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

    def create(self, job: Job, settings: dict[str, Any], frames: list[bytes],
               masks: list[list[bytes]] | None = None,
               takes: dict[str, Any] | None = None,
               references: list[bytes] | None = None) -> None:
        """Store inputs (clip, then each region's masks, then the reference images),
        request, then status (queued): after this the job is accepted.

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
            for region, mask_frames in enumerate(masks or []):
                region_folder = folder / MASK_FOLDER / str(region)
                region_folder.mkdir(parents=True)
                for index, frame in enumerate(mask_frames):
                    atomic_write(region_folder / f"{index:05d}.png", frame)
                fsync_dir(region_folder)
            if references:
                (folder / REFERENCE_FOLDER).mkdir()
                for index, image in enumerate(references):
                    atomic_write(folder / REFERENCE_FOLDER / f"{index:05d}.png", image)
                fsync_dir(folder / REFERENCE_FOLDER)
            atomic_write(folder / "request.json", json_bytes(job.request_record(
                settings, frame_digests(frames),
                [frame_digests(mask_frames) for mask_frames in masks or []], takes,
                frame_digests(references or []))))
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
        self._write_frames(self.folder(job_id) / "result", frames, sidecar)

    def write_take(self, job_id: str, take: int, frames: list[bytes],
                   sidecar: dict[str, Any]) -> None:
        """Take `take` (from 1) of a job of several takes, as a result is written (its
        sidecar last); the job's status records it done only after this returns."""
        takes = self.folder(job_id) / TAKES_FOLDER
        try:
            takes.mkdir(exist_ok=True)
        except OSError as error:
            raise _unwritable(self.state_dir, error) from None
        self._write_frames(takes / str(take), frames, sidecar)

    def _write_frames(self, folder: Path, frames: list[bytes], sidecar: dict[str, Any]) -> None:
        try:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir()
            for index, frame in enumerate(frames):
                atomic_write(folder / f"{index:05d}.png", frame)
            atomic_write(folder / "frames.json", json_bytes({"sha256": frame_digests(frames)}))
            atomic_write(folder / "sidecar.json", json_bytes(sidecar))
            fsync_dir(folder)
            fsync_dir(folder.parent)
        except OSError as error:
            raise _unwritable(self.state_dir, error) from None

    def delete(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

    # ----------------------------------------------------------------- reading

    def read_request(self, job_id: str) -> dict[str, Any]:
        return json.loads((self.folder(job_id) / "request.json").read_text(encoding="utf-8"))

    def input_paths(self, job_id: str) -> list[Path]:
        return sorted((self.folder(job_id) / "input").glob("*.png"))

    def mask_paths(self, job_id: str, regions: int) -> list[list[Path]]:
        """Each region's stored mask frames, in order ([] for a job without regions)."""
        return [sorted((self.folder(job_id) / MASK_FOLDER / str(region)).glob("*.png"))
                for region in range(regions)]

    def reference_paths(self, job_id: str) -> list[Path]:
        """The stored reference images, in order ([] for a job without any)."""
        return sorted((self.folder(job_id) / REFERENCE_FOLDER).glob("*.png"))

    def read_result(self, job_id: str, frame_count: int | None
                    ) -> tuple[dict[str, Any], list[bytes]]:
        """(sidecar, frames) of a finished job; DamagedResult when a file is missing,
        unreadable or not what was written: never a shorter result."""
        return _verified_result(self.folder(job_id) / "result", frame_count)

    def read_take(self, job_id: str, take: int) -> tuple[dict[str, Any], list[bytes]]:
        """(sidecar, frames) of one stored take, verified like a result."""
        return _verified_result(self.folder(job_id) / TAKES_FOLDER / str(take), None,
                                f"{TAKES_FOLDER}/{take}")

    def _verified_takes(self, folder: Path, listed: list[int] | None) -> list[int]:
        """The takes of a job folder whose files verify (sorted): those status.json
        lists, or, for a job rebuilt from its files (`listed` None), every take folder
        there. A take that does not verify is left out (logged), so it is made again."""
        takes = folder / TAKES_FOLDER
        if listed is None:
            listed = [int(path.name) for path in takes.iterdir()
                      if path.name.isdigit()] if takes.is_dir() else []
        intact = []
        for take in sorted(set(listed)):
            try:
                _verified_result(takes / str(take), None, f"{TAKES_FOLDER}/{take}")
                intact.append(take)
            except DamagedResult as damage:
                log.warning("Job %s: take %d is damaged (%s); it is made again.",
                            folder.name, take, damage)
        return intact

    def load_all(self) -> list[Job]:
        """Every accepted job, in submission order.

        A folder without status.json was never acknowledged and is removed; a job
        whose status.json is damaged is rebuilt from what its files prove (module
        docstring); a folder that cannot be rebuilt is moved to the quarantine folder
        and logged, never deleted, so nothing accepted is lost to a damaged file.
        """
        self._remember_quarantine()
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
            request = read_json_object(folder / "request.json")
            job = Job(job_id=check_job_id(request["job_id"]), seq=int(request["seq"]),
                      client=str(request.get("client", "")), owner=request["owner"],
                      digest=str(request["digest"]), submitted_at=float(request["submitted_at"]),
                      frames_in=int(request.get("frames_in", 0)),
                      takes=takes_count(request))
        except ProtocolError as error:
            raise DamagedJob(f"its job id is not valid ({error.message})") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DamagedJob(f"request.json: {type(error).__name__}: {error}") from None
        if job.job_id != folder.name:
            raise DamagedJob(f"it names the job {job.job_id!r}, not its folder's name")
        try:
            status = read_json_object(folder / "status.json")
            job.client = str(status["client"])
            for name in Job.PERSISTENT:
                if name in Job.OPTIONAL and name not in status:
                    continue
                setattr(job, name, status[name])
            job.state = JobState(job.state)
            if not isinstance(job.takes_done, list):
                raise TypeError("takes_done is not a list")
            if job.takes_done:  # each one proved again: a damaged take is made again
                job.takes_done = self._verified_takes(folder, job.takes_done)
        except (OSError, ValueError, KeyError, TypeError) as damage:  # status.json only
            job = Job(job_id=job.job_id, seq=job.seq, client=job.client, owner=job.owner,
                      digest=job.digest, submitted_at=job.submitted_at, frames_in=job.frames_in,
                      takes=job.takes)
            self._rebuild(folder, job, request, f"{type(damage).__name__}: {damage}")
        return job

    def _rebuild(self, folder: Path, job: Job, request: dict[str, Any], damage: str) -> None:
        """Restore a job whose status.json is damaged to the state its files prove:
        done (its result verifies) or queued (its inputs verify); DamagedJob else.
        Its events go to the client id that submitted it (request.json keeps it)."""
        try:
            _verified_result(folder / "result", None)
            job.state, job.attempts = JobState.DONE, 1
            job.frame_count = len(read_json_object(folder / "result" / "frames.json")["sha256"])
            job.finished_at = (folder / "result" / "sidecar.json").stat().st_mtime
        except (DamagedResult, OSError, ValueError, KeyError, TypeError):
            problem = _inputs_problem(folder, request)
            if problem is not None:
                raise DamagedJob(f"status.json is damaged ({damage}), there is no intact "
                                 f"result, and {problem}") from None
            job.state = JobState.QUEUED
        if job.takes > 1:  # the takes its files prove are kept; the others are made (again)
            job.takes_done = self._verified_takes(folder, None)
        try:
            self._write_status(job)
        except OSError as error:  # memory has it; the job's next change writes it again
            log.error("Could not rewrite the status of job %s (%s).", job.job_id, _reason(error))
        log.warning("Rebuilt job %s as %s from its files: its status.json was damaged (%s).",
                    job.job_id, job.state, damage)

    def _quarantine(self, folder: Path, why: str) -> None:
        self.quarantine.mkdir(exist_ok=True)
        target = self.quarantine / f"{folder.name}-{time.time_ns()}"
        os.replace(folder, target)
        self.quarantined[folder.name] = Quarantined(target, _owner_of(target))
        log.error("Moved the damaged job folder %s to %s (%s); it is kept there for you "
                  "to inspect and is no longer served.", folder.name, target, why)

    def _remember_quarantine(self) -> None:
        """The jobs earlier starts moved aside (the newest folder of each id)."""
        if not self.quarantine.is_dir():
            return
        for target in sorted(self.quarantine.iterdir(), key=lambda path: path.name):
            job_id, _, stamp = target.name.rpartition("-")
            if target.is_dir() and job_id and stamp.isdigit():
                self.quarantined[job_id] = Quarantined(target, _owner_of(target))


def _owner_of(folder: Path) -> str | None:
    """The owner key a quarantined job's request names, None when unreadable."""
    try:
        owner = read_json_object(folder / "request.json").get("owner")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, str) else None


def _inputs_problem(folder: Path, request: dict[str, Any]) -> str | None:
    """None when every input frame (and every region's mask frame and reference image)
    is there and has the SHA-256 request.json recorded, else what is wrong (for the log)."""
    recorded = request.get("inputs")
    if not isinstance(recorded, list) or not recorded:
        return "request.json records no input digests to check the inputs against"
    problem = _files_problem(sorted((folder / "input").glob("*.png")), recorded, "input")
    masks = request.get("masks", [])
    if problem is None and not isinstance(masks, list):
        return "request.json records its masks' digests wrongly"
    for region, digests in enumerate(masks):
        if problem is not None:
            break
        if not isinstance(digests, list):
            return f"request.json records region {region}'s mask digests wrongly"
        problem = _files_problem(sorted((folder / MASK_FOLDER / str(region)).glob("*.png")),
                                 digests, f"region {region} mask")
    references = request.get("references", [])
    if problem is None and not isinstance(references, list):
        return "request.json records its reference images' digests wrongly"
    if problem is None and references:
        problem = _files_problem(sorted((folder / REFERENCE_FOLDER).glob("*.png")), references,
                                 "reference")
    return problem


def _files_problem(paths: list[Path], recorded: list, what: str) -> str | None:
    """None when each file has its recorded SHA-256, else what is wrong; `what` names
    the frames ("input", "region 0 mask")."""
    if len(paths) != len(recorded):
        return f"{len(paths)} of its {len(recorded)} {what} frames are there"
    for index, (path, digest) in enumerate(zip(paths, recorded, strict=True)):
        try:
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                return f"{what} frame {index} is not the frame submitted"
        except OSError as error:
            return f"{what} frame {index} cannot be read ({_reason(error)})"
    return None


def takes_count(request: dict[str, Any]) -> int:
    """The takes a stored request makes in all (1 for a request without `takes`)."""
    takes = request.get("takes") or {}
    return int(takes.get("seeds", 1)) * max(1, len(takes.get("prompts") or [None]))


def _verified_result(result: Path, frame_count: int | None, label: str = "result"
                     ) -> tuple[dict[str, Any], list[bytes]]:
    """(sidecar, frames) of a result folder (or a take's, named `label`) whose every
    frame matches frames.json (and, given, the frame count the status recorded);
    DamagedResult saying what does not."""
    try:
        sidecar = read_json_object(result / "sidecar.json")
    except (OSError, ValueError):
        raise DamagedResult("its sidecar.json is missing or unreadable") from None
    try:
        digests = read_json_object(result / "frames.json")["sha256"]
        if not isinstance(digests, list):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedResult("its frames.json is missing or unreadable") from None
    if frame_count is not None and len(digests) != frame_count:
        raise DamagedResult(f"frames.json lists {len(digests)} frames, not {frame_count}")
    frames = []
    for index, digest in enumerate(digests):
        name = f"{label}/{index:05d}.png"
        try:
            frame = (result / f"{index:05d}.png").read_bytes()
        except OSError:
            raise DamagedResult(f"frame {index + 1} of {len(digests)}, {name}, is missing or "
                                "unreadable") from None
        if hashlib.sha256(frame).hexdigest() != digest:
            raise DamagedResult(f"frame {index + 1} of {len(digests)}, {name}, is not the "
                                "frame written")
        frames.append(frame)
    return sidecar, frames
