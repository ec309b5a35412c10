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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.errors import JobCancelled
from backend.results import CancelCheck, ProgressCallback, TransferResult, take_phase
from backend.server.book import WORKER_LOST_TWICE, JobBook
from backend.server.engine_api import EngineLost, TransferEngine
from backend.server.frames import PngClip, PngMasks, PngReferences
from backend.server.planning import pass_gate
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
                 memory: ServerMemory | None = None, take_gate: Path | None = None) -> None:
        self.book = book
        self.store = store
        self.engine = engine
        self.step_delay_s = step_delay_s  # testing only: catch a job mid-run
        self.take_gate = take_gate  # testing only: hold a job after each take it announces
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

        making: list[int] = []  # a job of several takes: the takes this run makes

        def progress(phase: str, step: int, total: int) -> None:
            event = {"type": EventType.PROGRESS, "job_id": job.job_id, "phase": phase,
                     "step": step, "total": total, "attempt": job.attempts}
            if job.takes > 1:  # named with the job's own take numbers, and the take in hand
                event["phase"], takes = take_phase(phase, making)
                if takes:
                    event.update(take=takes[0], takes=job.takes)
            self.book.report_progress(job.job_id, event["phase"], step, total)
            notify(event)
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
            if job.takes > 1:
                images, sidecar = self._run_takes(job, request, settings, clip, with_masks,
                                                  len(regions), making, progress, cancelled,
                                                  stopping, notify)
            else:
                # Likewise savers: decided here, before the edit (the submit's plan, cached).
                savers = self._savers(settings, clip, len(regions))
                with_savers = {"savers": savers} if savers is not None else {}
                result = self.engine.transfer(clip, settings, progress=progress,
                                              cancelled=cancelled, **with_masks, **with_savers)
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

    def _run_takes(self, job: Job, request: dict[str, Any], settings: TransferSettings,
                   clip: PngClip, with_masks: dict[str, Any], regions: int, making: list[int],
                   progress: ProgressCallback, cancelled: CancelCheck,
                   stopping: threading.Event, notify: Notify) -> tuple[list[bytes], dict]:
        """Make a job's takes not on disk yet (all of them, or after a restart the rest,
        with the same seeds) from one inversion, in batches its memory plan fits; store
        each and announce it (take_ready) as it is finished. Returns the job's result:
        take 1's frames and the sidecar listing every take (docs/protocol.md §4)."""
        from backend.results import takes_of
        from backend.video import encode_png

        asked = request["takes"]
        every = takes_of(list(asked.get("prompts") or [settings.prompt]), settings.seed,
                         asked["seeds"])
        done = self.book.takes_done(job.job_id)
        making[:] = [number for number in range(1, len(every) + 1) if number not in done]

        def on_take(index: int, result: TransferResult) -> None:
            number = making[index]
            images = [encode_png(frame) for frame in result_pixels(result)]
            sidecar = take_record(number, every[number - 1].prompt, result.sidecar.to_dict())
            self.store.write_take(job.job_id, number, images, sidecar)
            self.book.take_done(job.job_id, number)  # on disk first, then told
            notify({"type": EventType.TAKE_READY, "job_id": job.job_id, "take": number,
                    "takes": job.takes, "frame_count": len(images), "sidecar": sidecar})
            if self.take_gate is not None:
                pass_gate(self.take_gate, stopping)

        if done and making and self.take_gate is not None:
            # A run going on from takes made before a restart starts where the last one
            # was held, after the take it announced: the test reconnects its client first,
            # since an event for a client the new server has not heard from is not sent.
            pass_gate(self.take_gate, stopping)
        if making:
            batch, savers = self._takes_plan(settings, clip, regions, len(making))
            with_savers = {"savers": savers} if savers is not None else {}
            self.engine.transfer_takes(clip, settings, [every[n - 1] for n in making],
                                       progress=progress, cancelled=cancelled,
                                       batch_size=batch, on_take=on_take, **with_masks,
                                       **with_savers)
        stored = [self.store.read_take(job.job_id, number) for number in range(1, job.takes + 1)]
        first, frames = stored[0]
        record = {name: value for name, value in first.items() if name not in TAKE_FIELDS}
        return frames, {**record, "takes": [sidecar for sidecar, _ in stored]}

    def _takes_plan(self, settings: TransferSettings, clip: PngClip, regions: int,
                    takes: int) -> tuple[int | None, MemoryDecision | None]:
        """The batch `takes` takes run in and the savers it needs (None, None: no plan,
        every take in one batch)."""
        if self.memory is None or not len(clip):
            return None, None
        return self.memory.decide_takes(settings, len(clip), clip.frame_size(), takes, regions)

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


TAKE_FIELDS = ("take", "prompt")  # what a take's record adds to its sidecar


def take_record(number: int, prompt: str, sidecar: dict[str, Any]) -> dict[str, Any]:
    """A take's own sidecar as the server stores and sends it: `take` (from 1) and
    `prompt` first, then the take's sidecar (shared/sidecar.py)."""
    return {"take": number, "prompt": prompt, **sidecar}


def result_pixels(result: TransferResult) -> Any:
    """The result frames as the server sends them: RGB, or RGBA whose alpha is the
    feathered region when the frames are composited through one (docs/protocol.md §4)."""
    import numpy as np

    if result.alpha is None:
        return result.frames
    return np.concatenate([result.frames, result.alpha[..., None]], axis=-1)
