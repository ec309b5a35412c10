"""The job thread: takes jobs from the book one at a time and runs them on its engine.

A server runs one JobThread per engine: one for a local engine, one per Ray actor on a
gateway (backend/cluster). It is the only part that knows how a job runs; the book and
the store only see claim, progress and finish. Nothing a job does can end the thread:
every exception ends in a recorded outcome, or puts the job back in the queue when the
store cannot record one, and while the store cannot be written the thread probes it
until it can.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from backend.errors import JobCancelled
from backend.results import TransferResult
from backend.server.book import WORKER_LOST_TWICE, JobBook
from backend.server.engine_api import EngineLost, TransferEngine
from backend.server.frames import PngClip, PngMasks, PngReferences
from backend.server.store import Job, JobStore, StoreUnavailable
from shared.errors import ErrorCode
from shared.protocol import EventType, JobState, error_header, failure_reply

if TYPE_CHECKING:
    from backend.memory.savers import MemoryDecision
    from backend.server.planning import ServerMemory
    from shared.settings import TransferSettings

log = logging.getLogger("understudy.server")

PROBE_INTERVAL_S = 1.0  # how often a degraded store is tried again
QUEUE_CHANGED = "queue_changed"  # job thread → main loop: send everyone their queue position

Notify = Callable[[dict[str, Any]], None]


class JobThread:
    """Runs the book's jobs in submission order on one engine until `stopping` is set."""

    def __init__(self, book: JobBook, store: JobStore, engine: TransferEngine,
                 step_delay_s: float = 0.0,
                 ready: Callable[[threading.Event], bool] | None = None,
                 memory: ServerMemory | None = None) -> None:
        self.book = book
        self.store = store
        self.engine = engine
        self.step_delay_s = step_delay_s  # testing only: catch a job mid-run
        # A remote engine that is restarting takes no job, so another job thread gets it.
        self.ready = ready or (lambda stopping: True)
        self.memory = memory  # `--memory auto`: what each job's savers are decided with

    def run(self, stopping: threading.Event, notify: Notify) -> None:
        """The thread's body; `notify` hands events to the socket loop."""
        while not stopping.is_set():
            try:
                if self.book.health() is not None:  # wait first: one try per interval
                    stopping.wait(PROBE_INTERVAL_S)
                    self.book.try_resume()
                    continue
                if not self.ready(stopping):
                    continue
                job = self.book.claim_next(stopping, wait_s=PROBE_INTERVAL_S)
                if job is None:
                    continue
                notify({"type": QUEUE_CHANGED})
                log.info("Running job %s (attempt %d).", job.job_id, job.attempts)
                self._run(job, stopping, notify)
                notify({"type": QUEUE_CHANGED})
            except Exception:  # a bug here must not stop every later job
                log.error("The job thread hit an error and goes on:\n%s", traceback.format_exc())
                stopping.wait(PROBE_INTERVAL_S)

    def _run(self, job: Job, stopping: threading.Event, notify: Notify) -> None:
        """Run one job and record how it ended."""
        from backend.video import encode_png
        from shared.settings import TransferSettings

        def progress(phase: str, step: int, total: int) -> None:
            self.book.report_progress(job.job_id, phase, step, total)
            notify({"type": EventType.PROGRESS, "job_id": job.job_id, "phase": phase,
                    "step": step, "total": total, "attempt": job.attempts})
            if self.step_delay_s:
                time.sleep(self.step_delay_s)

        def cancelled() -> bool:
            return stopping.is_set() or self.book.cancel_wanted(job.job_id)

        try:
            request = self.store.read_request(job.job_id)
            settings = TransferSettings.from_dict(request["settings"])
            clip = PngClip(self.store.input_paths(job.job_id), f"the clip of job {job.job_id}")
            regions = self.store.mask_paths(job.job_id, len(request.get("masks", [])))
            # Only a job with regions passes masks, so an engine without them runs as before.
            with_masks = {"masks": PngMasks(regions, f"job {job.job_id}")} if regions else {}
            # Likewise references (a backbone that takes none never sees the argument).
            references = self.store.reference_paths(job.job_id)
            if references:
                with_masks["references"] = PngReferences(references, f"job {job.job_id}")
            # Likewise savers: decided here, before the edit (the submit's plan, cached).
            savers = self._savers(settings, clip, len(regions))
            with_savers = {"savers": savers} if savers is not None else {}
            result = self.engine.transfer(clip, settings, progress=progress, cancelled=cancelled,
                                          **with_masks, **with_savers)
            images = [encode_png(frame) for frame in result_pixels(result)]
            sidecar = result.sidecar.to_dict()
            self.store.write_result(job.job_id, images, sidecar)
            progress("save", len(images), len(images))
        except StoreUnavailable as problem:
            log.error("Job %s goes back to the queue: %s", job.job_id, problem)
            self.book.note_store_problem(job.job_id, problem)
            return
        except EngineLost as lost:
            log.error("Job %s: %s", job.job_id, lost)
            if self.book.worker_lost(job.job_id, attempt_counts=lost.started):
                notify(error_header(ErrorCode.INTERRUPTED, WORKER_LOST_TWICE, job_id=job.job_id))
            return
        except JobCancelled:
            if stopping.is_set() and not self.book.cancel_wanted(job.job_id):
                self.book.put_back(job.job_id)  # a clean stop: it runs again after a restart
                return
            self._finish(job, JobState.CANCELLED, None, None,
                         {"type": EventType.CANCELLED, "job_id": job.job_id}, notify)
            return
        except Exception as error:  # a bad clip, or an engine bug: fails this job, not the server
            code, message = failure_reply(error, "The server failed on this job", "the server log")
            if code == ErrorCode.INTERNAL:
                log.error("Job %s failed:\n%s", job.job_id, traceback.format_exc())
            self._fail(job, code, message, notify)
            return
        self._finish(job, JobState.DONE, None, len(images),
                     {"type": EventType.RESULT_READY, "job_id": job.job_id,
                      "frame_count": len(images), "sidecar": sidecar}, notify)

    def _savers(self, settings: TransferSettings, clip: PngClip,
                regions: int) -> MemoryDecision | None:
        """The savers `--memory auto` turns on for a job (None: none), from the plan its
        submit made (a cache hit; TooBigForGpuError when the GPU shrank since)."""
        if self.memory is None or not len(clip):
            return None
        return self.memory.decide(settings, len(clip), clip.frame_size(), regions)

    def _fail(self, job: Job, code: str, message: str, notify: Notify) -> None:
        self._finish(job, JobState.FAILED, {"code": code, "message": message}, None,
                     error_header(code, message, job_id=job.job_id), notify)

    def _finish(self, job: Job, state: JobState, error: dict[str, str] | None,
                frame_count: int | None, event: dict[str, Any], notify: Notify) -> None:
        """Record the outcome, then tell the client; an unrecorded outcome is not told."""
        if self.book.finish(job.job_id, state, error, frame_count):
            log.info("Job %s %s.", job.job_id, state)
            notify(event)
        else:
            log.error("Job %s ended (%s) but the store could not record it; it runs again "
                      "once the store is writable.", job.job_id, state)


def result_pixels(result: TransferResult) -> Any:
    """The result frames as the server sends them: RGB, or RGBA whose alpha is the
    feathered region when the frames are composited through one (docs/protocol.md §4)."""
    import numpy as np

    if result.alpha is None:
        return result.frames
    return np.concatenate([result.frames, result.alpha[..., None]], axis=-1)
