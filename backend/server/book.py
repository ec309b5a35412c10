"""The job book: every job's state, the FIFO queue and who owns what, under one lock.

The book's state lives in a `_Ledger` that is reachable only through
`with self._locked() as ledger:`, so nothing reads or changes a job without the lock;
methods whose names start with `_` take the ledger as an argument and run inside it.
Every change of a job's state goes through `_record`, which writes status.json first
and changes memory only once the disk has it: what clients are told is what a
restart reads back.

The book does not run jobs. A runner (a JobThread, backend/server/job_thread.py) calls `claim_next`,
`report_progress`, `cancel_wanted` and one of the `finish_*`/`put_back` calls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backend.server.store import DamagedResult, Job, JobStore, StoreUnavailable
from shared.errors import ErrorCode
from shared.protocol import FINISHED_STATES, JobState, ProtocolError

log = logging.getLogger("understudy.server")

INTERRUPTED_TWICE = ("The server stopped twice while running this job; check the server "
                     "log and submit it again with a new id.")
WORKER_LOST_TWICE = ("The worker running this job died twice; check the workers' Ray logs "
                     "(GPU faults, memory) and submit it again with a new id.")


@dataclass
class _Ledger:
    jobs: dict[str, Job] = field(default_factory=dict)
    pending: deque[str] = field(default_factory=deque)  # queued job ids, FIFO
    running: set[str] = field(default_factory=set)
    next_seq: int = 0
    store_problem: str | None = None  # why the store cannot be written, while it cannot


@dataclass
class Retention:
    keep_hours: float = 72.0
    keep_jobs: int = 200


class JobBook:
    """Jobs in memory, mirrored to the JobStore; see the module docstring."""

    def __init__(self, store: JobStore, max_queue: int, retention: Retention) -> None:
        self.store = store
        self.max_queue = max_queue
        self.retention = retention
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._state = _Ledger()

    @contextmanager
    def _locked(self) -> Iterator[_Ledger]:
        with self._lock:
            yield self._state

    # ----------------------------------------------------------------- start-up

    def recover(self) -> dict[str, int]:
        """Load the store: re-queue queued jobs, re-run an interrupted job once, prune."""
        with self._locked() as ledger:
            interrupted, queued = [], []
            for job in self.store.load_all():
                ledger.jobs[job.job_id] = job
                ledger.next_seq = max(ledger.next_seq, job.seq + 1)
                if job.state == JobState.RUNNING:
                    if job.cancel_requested:
                        self._finish(ledger, job, JobState.CANCELLED)
                    elif job.attempts >= 2:
                        self._finish(ledger, job, JobState.FAILED, {
                            "code": ErrorCode.INTERRUPTED, "message": INTERRUPTED_TWICE})
                    else:
                        self._record(ledger, job, state=JobState.QUEUED)
                        interrupted.append(job.job_id)
                elif job.state == JobState.QUEUED:
                    queued.append(job.job_id)
            ledger.pending.extend(interrupted + queued)
            self._prune(ledger)
            return {"jobs": len(ledger.jobs), "rerun": len(interrupted), "queued": len(queued)}

    # ----------------------------------------------------------------- requests

    def health(self) -> str | None:
        """None when the store can be written, else the sentence saying why not."""
        with self._locked() as ledger:
            return ledger.store_problem

    def queue_length(self) -> int:
        with self._locked() as ledger:
            return self._queue_length(ledger)

    def existing(self, job_id: str, client: str, owner: str | None, digest: str
                 ) -> dict[str, Any] | None:
        """The accepted reply for a repeated submit, None for a new id; job_exists for
        an id taken by another request or another key."""
        with self._locked() as ledger:
            job = ledger.jobs.get(job_id)
            if job is None:
                return None
            if job.owner != owner or job.digest != digest:
                raise ProtocolError(f"A different job with the id {job_id} exists; choose a "
                                    "new job id.", ErrorCode.JOB_EXISTS)
            if job.client != client:
                self._record(ledger, job, client=client)  # events go to the resubmitter
            return self._accepted(ledger, job, duplicate=True)

    def add(self, job: Job, settings: dict[str, Any], frames: list[bytes],
            masks: list[list[bytes]] | None = None,
            takes: dict[str, Any] | None = None,
            references: list[bytes] | None = None) -> dict[str, Any]:
        """Store a new job (its clip, each region's mask frames, its reference images)
        and queue it;
        returns the accepted reply fields.

        Raises ProtocolError queue_full / job_exists, or StoreUnavailable (nothing kept).
        """
        with self._locked() as ledger:
            if job.job_id in ledger.jobs:  # submitted meanwhile by another request
                raise ProtocolError(f"A different job with the id {job.job_id} exists; choose a "
                                    "new job id.", ErrorCode.JOB_EXISTS)
            if self._queue_length(ledger) >= self.max_queue:
                raise ProtocolError(
                    f"The server already has {self.max_queue} jobs queued or running; submit "
                    "again when one finishes.", ErrorCode.QUEUE_FULL)
            self._writable(ledger)
            job.seq = ledger.next_seq
            try:
                self.store.create(job, settings, frames, masks, takes, references)
            except StoreUnavailable as error:
                ledger.store_problem = str(error)
                raise
            ledger.next_seq += 1
            ledger.jobs[job.job_id] = job
            ledger.pending.append(job.job_id)
            self._work.notify_all()
            return self._accepted(ledger, job, duplicate=False)

    def view(self, job_id: str, owner: str | None) -> dict[str, Any]:
        """The job object (docs/protocol.md §8) of a job this caller may see."""
        with self._locked() as ledger:
            return self._public(ledger, self._find(ledger, job_id, owner))

    def jobs_of(self, client: str, owner: str | None) -> list[dict[str, Any]]:
        """This caller's jobs, oldest first: with keys those of its key, else of its id."""
        with self._locked() as ledger:
            mine = [job for job in ledger.jobs.values()
                    if (job.owner == owner if owner is not None else job.client == client)]
            return [self._public(ledger, job) for job in sorted(mine, key=lambda j: j.seq)]

    def cancel(self, job_id: str, owner: str | None) -> tuple[dict[str, Any], Job | None]:
        """Cancel a job: (its job object, the job if it was queued and is now cancelled)."""
        with self._locked() as ledger:
            job = self._find(ledger, job_id, owner)
            cancelled_now = None
            if job.state == JobState.QUEUED:
                self._finish(ledger, job, JobState.CANCELLED)
                ledger.pending.remove(job.job_id)
                cancelled_now = job
            elif job.state == JobState.RUNNING and not job.cancel_requested:
                self._record(ledger, job, cancel_requested=True)  # the runner sees it
            return self._public(ledger, job), cancelled_now

    def result(self, job_id: str, owner: str | None) -> tuple[dict[str, Any], list[bytes]]:
        """(sidecar, frames) of a done job; not_ready / job_failed / job_cancelled else."""
        with self._locked() as ledger:
            job = self._find(ledger, job_id, owner)
            if job.state == JobState.FAILED:
                error = job.error or {}
                raise ProtocolError(error.get("message", f"Job {job_id} failed."),
                                    ErrorCode.JOB_FAILED)
            if job.state == JobState.CANCELLED:
                raise ProtocolError(f"Job {job_id} was cancelled; there is no result.",
                                    ErrorCode.JOB_CANCELLED)
            if job.state != JobState.DONE:
                raise ProtocolError(f"Job {job_id} is {job.state}; fetch "
                                    "it after its result_ready event.", ErrorCode.NOT_READY)
            try:
                return self.store.read_result(job_id, job.frame_count)
            except DamagedResult as damage:
                log.error("Fetch of job %s: its result is damaged (%s).", job_id, damage)
                raise ProtocolError(f"The result of job {job_id} is damaged "
                                    f"on the server ({damage}); submit the job again with a "
                                    "new id.", ErrorCode.DAMAGED) from None

    def take_result(self, job_id: str, take: int, owner: str | None
                    ) -> tuple[dict[str, Any], list[bytes]]:
        """(sidecar, frames) of one take, as soon as it is on disk: while the job runs,
        and after it ended (cancelled: the takes made before the cancel). Take 1 of a
        one-take job is its result."""
        with self._locked() as ledger:
            job = self._find(ledger, job_id, owner)
            if not 1 <= take <= job.takes:
                raise ProtocolError(f"Job {job_id} makes {job.takes} take"
                                    f"{'s' if job.takes > 1 else ''}; ask for a take from 1 to "
                                    f"{job.takes}.", ErrorCode.BAD_REQUEST)
            if job.takes == 1:
                pass  # its result, below
            elif take not in job.takes_done:
                if job.state == JobState.FAILED:
                    error = job.error or {}
                    raise ProtocolError(error.get("message", f"Job {job_id} failed."),
                                        ErrorCode.JOB_FAILED)
                if job.state == JobState.CANCELLED:
                    raise ProtocolError(f"Job {job_id} was cancelled before take {take} was "
                                        f"made (takes made: {_listed(job.takes_done)}); fetch "
                                        "one of those.", ErrorCode.JOB_CANCELLED)
                raise ProtocolError(f"Take {take} of job {job_id} is not made yet; fetch it "
                                    "after its take_ready event.", ErrorCode.NOT_READY)
            else:
                try:
                    return self.store.read_take(job_id, take)
                except DamagedResult as damage:
                    log.error("Fetch of job %s take %d: it is damaged (%s).", job_id, take,
                              damage)
                    raise ProtocolError(f"Take {take} of job {job_id} is damaged on the server "
                                        f"({damage}); submit the job again with a new id.",
                                        ErrorCode.DAMAGED) from None
        return self.result(job_id, owner)

    def client_of(self, job_id: str) -> tuple[str, str | None] | None:
        """(routing id, owner key) that a job's events go to; None for a pruned job."""
        with self._locked() as ledger:
            job = ledger.jobs.get(job_id)
            return None if job is None else (job.client, job.owner)

    def queue_positions(self) -> list[tuple[str, str, str | None, int]]:
        """(job id, client, owner, position) of every queued job."""
        with self._locked() as ledger:
            return [(job_id, ledger.jobs[job_id].client, ledger.jobs[job_id].owner,
                     self._position(ledger, ledger.jobs[job_id])) for job_id in ledger.pending]

    # ----------------------------------------------------------------- the runner's side

    def claim_next(self, stopping: threading.Event, wait_s: float) -> Job | None:
        """The next queued job, now running (on disk first); None after `wait_s` with
        nothing to run, when stopping, or when the store cannot be written."""
        with self._locked() as ledger:
            if not ledger.pending and not stopping.is_set():
                self._work.wait(wait_s)
            if stopping.is_set() or not ledger.pending or ledger.store_problem:
                return None
            job = ledger.jobs[ledger.pending[0]]
            try:
                self._record(ledger, job, state=JobState.RUNNING, attempts=job.attempts + 1,
                             started_at=time.time())
            except StoreUnavailable:
                return None  # it stays first in the queue; _record noted the problem
            ledger.pending.popleft()
            ledger.running.add(job.job_id)
            job.phase, job.step, job.total = "start", 0, 0
            return job

    def wake(self) -> None:
        """Wake a runner waiting in claim_next (stop, or the store is writable again)."""
        with self._locked():
            self._work.notify_all()

    def report_progress(self, job_id: str, phase: str, step: int, total: int) -> None:
        with self._locked() as ledger:
            job = ledger.jobs[job_id]
            job.phase, job.step, job.total = phase, step, total

    def takes_done(self, job_id: str) -> list[int]:
        """The takes of a job already on disk (sorted), which a run does not make again."""
        with self._locked() as ledger:
            return list(ledger.jobs[job_id].takes_done)

    def take_done(self, job_id: str, take: int) -> None:
        """Record a take whose files are on disk (status.json first): from now on it is
        fetchable, survives a restart, and is not made again. StoreUnavailable when the
        status cannot be written (the take is then made again on the next run)."""
        with self._locked() as ledger:
            job = ledger.jobs[job_id]
            self._record(ledger, job, takes_done=sorted({*job.takes_done, take}))

    def cancel_wanted(self, job_id: str) -> bool:
        with self._locked() as ledger:
            return ledger.jobs[job_id].cancel_requested

    def finish(self, job_id: str, state: JobState, error: dict[str, str] | None = None,
               frame_count: int | None = None) -> bool:
        """Record how a running job ended and prune. False when the store could not
        take it: the job is back at the head of the queue and runs again once the
        store is writable, so it is never dropped and never reported finished early."""
        with self._locked() as ledger:
            job = ledger.jobs[job_id]
            try:
                self._finish(ledger, job, state, error, frame_count)
            except StoreUnavailable:
                self._back_to_queue(ledger, job, attempt_counts=False)
                return False
            ledger.running.discard(job_id)
            self._prune(ledger)
            return True

    def put_back(self, job_id: str) -> None:
        """A clean stop interrupted this job: queue it first again, attempt not counted."""
        with self._locked() as ledger:
            job = ledger.jobs[job_id]
            try:
                self._record(ledger, job, state=JobState.QUEUED, attempts=job.attempts - 1)
            except StoreUnavailable:
                pass  # status.json still says running: a restart re-runs it once
            self._back_to_queue(ledger, job, attempt_counts=True)  # _record took it back

    def worker_lost(self, job_id: str, attempt_counts: bool) -> bool:
        """The process running this job died: queue it first again to run once more, or,
        lost on its second attempt too, fail it as `interrupted`. True when it failed."""
        with self._locked() as ledger:
            job = ledger.jobs[job_id]
            try:
                if attempt_counts and job.attempts >= 2:
                    self._finish(ledger, job, JobState.FAILED, {
                        "code": ErrorCode.INTERRUPTED, "message": WORKER_LOST_TWICE})
                    ledger.running.discard(job_id)
                    self._prune(ledger)
                    return True
                self._record(ledger, job, state=JobState.QUEUED,
                             attempts=job.attempts if attempt_counts else job.attempts - 1)
            except StoreUnavailable:
                pass  # status.json still says running: a restart re-runs it once
            self._back_to_queue(ledger, job, attempt_counts=True)  # _record set the count
            self._work.notify_all()  # a free worker takes it now
            return False

    def note_store_problem(self, job_id: str, problem: StoreUnavailable) -> None:
        """A runner could not write a job's files: back to the queue until writable; the
        disk's fault does not count as one of the job's attempts."""
        with self._locked() as ledger:
            ledger.store_problem = str(problem)
            self._back_to_queue(ledger, ledger.jobs[job_id], attempt_counts=False)

    def try_resume(self) -> bool:
        """Probe the store; clear the problem when it can be written again."""
        try:
            self.store.probe()
        except StoreUnavailable as error:
            with self._locked() as ledger:
                ledger.store_problem = str(error)
            return False
        with self._locked() as ledger:
            if ledger.store_problem:
                log.info("The job store can be written again; resuming.")
            ledger.store_problem = None
            self._work.notify_all()
        return True

    # ----------------------------------------------------------------- inside the lock

    def _writable(self, ledger: _Ledger) -> None:
        """Raise StoreUnavailable while the store cannot be written (probing once)."""
        if ledger.store_problem is None:
            return
        try:
            self.store.probe()
        except StoreUnavailable as error:
            ledger.store_problem = str(error)
            raise
        ledger.store_problem = None
        self._work.notify_all()

    def _record(self, ledger: _Ledger, job: Job, **changes: Any) -> None:
        """Change a job's persistent fields: on disk first, then in memory."""
        before = {name: getattr(job, name) for name in changes}
        for name, value in changes.items():
            setattr(job, name, value)
        try:
            self.store.write_status(job)
        except StoreUnavailable as error:
            for name, value in before.items():
                setattr(job, name, value)
            ledger.store_problem = str(error)
            log.error("%s", error)
            raise

    def _finish(self, ledger: _Ledger, job: Job, state: JobState,
                error: dict[str, str] | None = None, frame_count: int | None = None) -> None:
        self._record(ledger, job, state=state, error=error, frame_count=frame_count,
                     finished_at=time.time())
        job.phase = job.step = job.total = None

    def _back_to_queue(self, ledger: _Ledger, job: Job, attempt_counts: bool) -> None:
        """Queue a job first again, in memory (its status.json is written when it next
        starts). An attempt the job did not cause is taken back."""
        if not attempt_counts:
            job.attempts -= 1
        job.state = JobState.QUEUED
        job.phase = job.step = job.total = None
        ledger.running.discard(job.job_id)
        if job.job_id not in ledger.pending:
            ledger.pending.appendleft(job.job_id)

    def _find(self, ledger: _Ledger, job_id: str, owner: str | None) -> Job:
        """A job the caller may see. With keys a job is its key's alone; another key
        is told the job does not exist, exactly as for a job never submitted. A job
        moved to quarantine at start-up is `damaged`, naming its folder."""
        job = ledger.jobs.get(job_id)
        quarantined = self.store.quarantined.get(job_id) if job is None else None
        if quarantined is not None and quarantined.owner in (None, owner):
            raise ProtocolError(f"The server's files of job {job_id} are "
                                f"damaged and were moved to {quarantined.folder}; ask the "
                                "server's operator to look there, and submit the job again "
                                "with a new id.", ErrorCode.DAMAGED)
        if job is None or (job.owner is not None and job.owner != owner):
            raise ProtocolError(f"The server has no job {job_id}; it "
                                "was never accepted, or its result was pruned after the "
                                "retention time.", ErrorCode.UNKNOWN_JOB)
        return job

    def _queue_length(self, ledger: _Ledger) -> int:
        return len(ledger.pending) + len(ledger.running)

    def _position(self, ledger: _Ledger, job: Job) -> int | None:
        """Jobs that run before this one (running ones included); None unless queued."""
        if job.state != JobState.QUEUED or job.job_id not in ledger.pending:
            return None
        return ledger.pending.index(job.job_id) + len(ledger.running)

    def _public(self, ledger: _Ledger, job: Job) -> dict[str, Any]:
        info = {"job_id": job.job_id, "state": job.state, "submitted_at": job.submitted_at,
                "started_at": job.started_at, "finished_at": job.finished_at,
                "attempts": job.attempts, "cancel_requested": job.cancel_requested}
        if job.state == JobState.QUEUED:
            info["queue_position"] = self._position(ledger, job)
        if job.state == JobState.RUNNING:
            info.update(phase=job.phase, step=job.step, total=job.total)
        if job.error is not None:
            info["error"] = job.error
        if job.frame_count is not None:
            info["frame_count"] = job.frame_count
        info["takes"] = job.takes
        info["takes_done"] = (list(job.takes_done) if job.takes > 1
                              else [1] if job.state == JobState.DONE else [])
        return info

    def _accepted(self, ledger: _Ledger, job: Job, duplicate: bool) -> dict[str, Any]:
        return {"job_id": job.job_id, "state": job.state,
                "queue_position": self._position(ledger, job), "duplicate": duplicate}

    def _prune(self, ledger: _Ledger) -> None:
        """Delete finished jobs past the retention time, and the oldest beyond the count."""
        finished = sorted((job for job in ledger.jobs.values() if job.state in FINISHED_STATES),
                          key=lambda job: job.finished_at or 0.0)
        too_old = time.time() - self.retention.keep_hours * 3600
        excess = max(0, len(finished) - self.retention.keep_jobs)
        for index, job in enumerate(finished):
            if index < excess or (job.finished_at or 0.0) < too_old:
                self.store.delete(job.job_id)
                del ledger.jobs[job.job_id]
                log.info("Pruned finished job %s.", job.job_id)


def _listed(takes: list[int]) -> str:
    """[1, 2] → "1, 2"; [] → "none" (for a sentence)."""
    return ", ".join(map(str, takes)) or "none"
