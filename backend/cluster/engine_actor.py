"""The Ray actor that runs jobs: one warm engine, one job at a time.

The pool makes it a threaded actor with two threads: one runs `run` (the job), the
other answers `cancel`, `identity` and `check_settings` while a job runs, so a
cancel reaches the engine's between-steps check instead of waiting behind the job.

`identity` reports the worker's GPU memory (`memory`: gpu_description of its device,
or the `serve --assume-gpu-memory-gb` figure passed through): the gateway plans every
job for the smallest of them (backend/cluster/gateway.py) and hands `run` its decision,
so the savers it chose are the ones this worker turns on and records in the sidecar.

`run` is a streaming generator: it yields small event dicts as the edit goes (first
"started", then "progress" per engine step) and ends with exactly one of "done"
(the result frames and the sidecar), "failed" (code and sentence) or "cancelled". Errors are
turned into events here, so the gateway only ever sees a Ray error when this process
or its node died.

Everything crossing here (settings, PNG bytes, sidecars) travels inside the Ray
cluster through Ray's own serialisation; nothing from the editors' network is
unpickled.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backend.errors import JobCancelled, UnderstudyError
from backend.results import Take, TransferResult
from backend.server.frames import PngClip, PngMasks, PngReferences
from shared.errors import ErrorCode
from shared.protocol import failure_reply

log = logging.getLogger("understudy.cluster.engine_actor")


@dataclass(frozen=True)
class ActorSpec:
    """What every worker loads: the same model arguments as `serve --model ...`."""

    model: str
    device: str | None = None
    dtype: str | None = None
    cache_dir: Path | None = None  # on the worker's own node
    upscale_model: str | None = None  # as `serve --upscale-model`
    shared_cache: bool = False  # all workers use cache_dir itself (a shared folder)
    torch_threads: int | None = None
    step_delay_s: float = 0.0  # testing only, as `serve --test-step-delay`
    assume_gpu_memory_gb: float | None = None  # as `serve --assume-gpu-memory-gb`, per worker

    def cache_for(self, worker_name: str) -> Path | None:
        """The inversion cache folder: per worker unless the cache is shared."""
        if self.cache_dir is None or self.shared_cache:
            return self.cache_dir
        return Path(self.cache_dir) / "workers" / worker_name


class EngineActor:
    """Holds one engine for its life; `ray.remote` is applied by the pool."""

    def __init__(self, name: str, spec: ActorSpec, load: bool = True) -> None:
        """`load` False: the model is loaded later (a gang's rank loads it once it has
        joined its gang, backend/cluster/gang.py)."""
        self.name = name
        self.spec = spec
        self._cancel_lock = threading.Lock()
        self._cancel_requested: set[str] = set()
        self._load_error: dict[str, str] | None = None
        self.engine = None
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        if load:
            self._load_engine()

    def _load_engine(self, gang: Any = None) -> None:
        """Load the spec's engine (on a gang: split over it, backend/edit.py load_engine);
        a failure is kept for identity() to report."""
        try:
            from backend.edit import load_engine

            self.engine = load_engine(self.spec.model, device=self.spec.device,
                                      dtype=self.spec.dtype,
                                      cache_dir=self.spec.cache_for(self.name),
                                      upscale_model=self.spec.upscale_model, gang=gang)
        except Exception as error:  # a constructor that raises would leave Ray a dead actor
            # Reported by identity(): the pool says it.
            code, message = failure_reply(error, "Loading the model failed", "the worker's Ray log")
            if code == ErrorCode.INTERNAL:
                log.error("Worker %s could not load the model:\n%s", self.name,
                          traceback.format_exc())
            self._load_error = {"code": code, "message": message}

    # ----------------------------------------------------------------- side calls

    def identity(self) -> dict[str, Any]:
        """Who this worker is (for the sidecar and logs) and whether its model loaded."""
        import ray

        context = ray.get_runtime_context()
        info = {"actor": self.name, "actor_id": context.get_actor_id(),
                "host": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
                "node_id": context.get_node_id(), "pid": os.getpid(), "gpu": self._gpu(),
                "memory": self._memory(), "restarted": context.was_current_actor_reconstructed}
        if self._load_error is not None:
            info["load_error"] = self._load_error
        else:
            info["engine"] = self.engine.describe()
        return info

    def check_settings(self, settings: dict[str, Any], clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> dict[str, str] | None:
        """The engine's submit-time check; None when the settings can run."""
        from shared.settings import TransferSettings

        try:
            self.engine.check_settings(TransferSettings.from_dict(settings), clip_length,
                                       frame_size)
        except UnderstudyError as error:
            return {"code": error.code, "message": str(error)}
        return None

    def cancel(self, job_id: str) -> None:
        """Ask the running (or about to run) job `job_id` to stop at its next step."""
        with self._cancel_lock:
            self._cancel_requested.add(job_id)

    # ----------------------------------------------------------------- the job

    def run(self, job_id: str, settings: dict[str, Any], inputs: list[bytes],
            masks: list[list[bytes]] | None = None, memory: dict[str, Any] | None = None,
            takes: list[dict[str, Any]] | None = None, batch_size: int | None = None,
            references: list[bytes] | None = None) -> Iterator[dict[str, Any]]:
        """Run one job (`masks`: each region's mask PNGs, None for none; `memory`: the
        gateway's `--memory auto` decision, MemoryDecision.to_dict(), None for none;
        `takes`: a job of several takes, each {"prompt", "seed"}, made here from one
        inversion, `batch_size` at once, each yielded as a "take" event as it is
        finished; `references`: its reference images' PNGs, None for none), yielding its
        events (see the module docstring)."""
        yield {"event": "started", "worker": self.identity()}
        if self.engine is None:
            yield {"event": "failed", **self._load_error}
            return
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        # The engine reports through callbacks; a generator cannot yield from inside
        # them, so the edit runs on its own thread and this one relays its events.
        thread = threading.Thread(target=self._edit,
                                  args=(job_id, settings, inputs, masks, memory, events, takes,
                                        batch_size, references),
                                  name=f"edit-{job_id}", daemon=True)
        thread.start()
        while True:
            event = events.get()
            yield event
            if event["event"] not in ("progress", "take"):
                break
        thread.join()
        with self._cancel_lock:
            self._cancel_requested.discard(job_id)

    def _edit(self, job_id: str, settings: dict[str, Any], inputs: list[bytes],
              masks: list[list[bytes]] | None, memory: dict[str, Any] | None,
              events: queue.Queue, takes: list[dict[str, Any]] | None = None,
              batch_size: int | None = None, references: list[bytes] | None = None) -> None:
        def progress(phase: str, step: int, total: int) -> None:
            events.put({"event": "progress", "phase": phase, "step": step, "total": total})
            if self.spec.step_delay_s:
                time.sleep(self.spec.step_delay_s)

        def cancelled() -> bool:
            with self._cancel_lock:
                return job_id in self._cancel_requested

        from backend.memory.savers import MemoryDecision
        from shared.settings import TransferSettings

        try:
            with_masks: dict[str, Any] = (
                {"masks": PngMasks(masks, "the job's regions")} if masks else {})
            if references:  # a backbone that takes none never sees the argument
                with_masks["references"] = PngReferences(references, "the job")
            # The gateway decided the job's savers; the worker plans nothing.
            savers = None if memory is None else MemoryDecision.from_dict(memory)
            clip, parsed = PngClip(inputs, "the job's clip"), TransferSettings.from_dict(settings)
            if takes is not None:  # the whole job here: one inversion for every take
                def on_take(index: int, result: TransferResult) -> None:
                    events.put({"event": "take", "index": index, **self._shipped(result)})

                self._transfer_takes(clip, parsed, [Take(take["prompt"], take["seed"])
                                                    for take in takes],
                                     progress, cancelled, savers, batch_size, on_take, with_masks)
                events.put({"event": "done"})
                return
            events.put({"event": "done", **self._transfer(clip, parsed, progress, cancelled,
                                                           savers, with_masks)})
        except JobCancelled:
            events.put({"event": "cancelled"})
        except Exception as error:  # a bad clip, or an engine bug: fails this job, not the actor
            events.put(self._failed(job_id, error))

    def _failed(self, job_id: str, error: Exception) -> dict[str, Any]:
        """The "failed" event of a job that raised `error` (code and sentence)."""
        code, message = failure_reply(error, f"Worker {self.name} failed on this job",
                                      "its Ray worker log")
        if code == ErrorCode.INTERNAL:
            log.error("Job %s failed on %s:\n%s", job_id, self.name, traceback.format_exc())
        return {"event": "failed", "code": code, "message": message}

    def _transfer(self, clip: PngClip, settings: Any, progress: Any, cancelled: Any,
                  savers: Any, with_masks: dict[str, Any]) -> dict[str, Any]:
        """The edit itself (one take), shipped."""
        return self._shipped(self.engine.transfer(clip, settings, progress=progress,
                                                  cancelled=cancelled, savers=savers,
                                                  **with_masks))

    def _transfer_takes(self, clip: PngClip, settings: Any, takes: list[Take], progress: Any,
                        cancelled: Any, savers: Any, batch_size: int | None, on_take: Any,
                        with_masks: dict[str, Any]) -> None:
        """A job of several takes, each handed to `on_take` as it is finished."""
        self.engine.transfer_takes(clip, settings, takes, progress=progress,
                                   cancelled=cancelled, savers=savers, batch_size=batch_size,
                                   on_take=on_take, **with_masks)

    def _shipped(self, result: TransferResult) -> dict[str, Any]:
        """A result as an event carries it: raw frames, not PNGs (the gateway encodes
        them once, as it does for a local job), its sidecar naming this worker."""
        sidecar = replace(result.sidecar, worker=self._sidecar_worker())
        return {"frames": result.frames, "alpha": result.alpha, "sidecar": sidecar.to_dict()}

    def _sidecar_worker(self) -> dict[str, Any]:
        """The sidecar's record of where the job ran: host, GPU, actor."""
        import ray

        return {"actor": self.name, "actor_id": ray.get_runtime_context().get_actor_id(),
                "host": socket.gethostname(), "gpu": self._gpu(), "pid": os.getpid()}

    def _memory(self) -> dict[str, Any] | None:
        """This worker's GPU memory as the hello reports a GPU (gpu_description); None on
        a CPU without an assumed figure, or without a model."""
        if self.engine is None:
            return None
        from backend.memory.planner import gpu_description

        return gpu_description(str(self.engine.backbone.device), self.spec.assume_gpu_memory_gb)

    def _gpu(self) -> dict[str, Any] | None:
        if self.engine is None or self.engine.backbone.device.type != "cuda":
            return None
        import ray
        import torch

        device = self.engine.backbone.device
        return {"name": torch.cuda.get_device_name(device), "device": str(device),
                "ray_gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()]}
