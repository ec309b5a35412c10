"""Memory plans off the socket loop: one planning thread and a FIFO of plans to make.

A plan of a shape not planned before runs the engine's calls on fake tensors
(backend/memory/planner.py): about 2.5 s for the tiny model and 25 s for ZeroScope's
architecture on a CPU. Made on the main thread it would leave every other client
unanswered meanwhile (hello, status, fetch, progress), so a `submit` or `plan` that
needs one is answered later: `Requests` does every check that needs no plan, then
hands a `PlanWork` here; the planning thread makes the plan (`make`), tells the main
loop, and the main loop finishes the request (`finish`: queue the job, or refuse it)
and sends the reply with the request's `req`. The request's own client keeps waiting
(shared/client.py waits up to protocol.PLAN_WAIT_S while the server answers its
heartbeats); nobody else waits.

One thread is enough: the planner keeps one lock while it plans (backend/memory/planner.py),
so a second thread would only queue there. A plan that raises (a bug) ends its own
request with one sentence; the thread goes on with the next.
"""

from __future__ import annotations

import logging
import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.memory.planner import MemoryPlan, MemoryPlanner
    from backend.memory.savers import MemoryDecision
    from shared.settings import TransferSettings

log = logging.getLogger("understudy.server")

PLANNED = "planned"  # planning thread → main loop: finished plans wait in the desk
GATE_POLL_S = 0.02  # testing only: how often a held plan looks for its gate file
GATE_RAISE = "raise"  # a gate file saying this makes the held plan fail as a bug would


@dataclass
class ServerMemory:
    """What a server plans its jobs against: the planner (its GPU and its cache) and
    the model planned, a loaded backbone (one box) or, on a gateway, the workers'
    model by name (backend/backbones/registry.py plannable_models) with their device and dtype."""

    planner: MemoryPlanner
    model: Any  # a Backbone, or a name of plannable_models()
    device: str | None = None
    dtype: str | None = None
    # GPUs per job (`serve --ray … --gang N`). Each rank holds every weight and the whole
    # latent; only the transformer's activations (guide, cfg) divide by about N. The plan
    # is one GPU's peak: an upper bound of each rank's, so what fits one GPU fits a rank.
    gang: int = 1

    def gpu(self) -> dict[str, Any] | None:
        return self.planner.gpu()

    def decide(self, settings: TransferSettings, clip_length: int,
               size: tuple[int, int] | None, regions: int = 0,
               batch: int = 1) -> MemoryDecision | None:
        return self.planner.decide(self.model, settings, clip_length, size, self.device,
                                   self.dtype, regions, batch)

    def largest_batch(self, settings: TransferSettings, clip_length: int,
                      size: tuple[int, int] | None, takes: int, regions: int = 0) -> int:
        """How many of a job's `takes` sample together (MemoryPlanner.largest_batch)."""
        return self.planner.largest_batch(self.model, settings, clip_length, size, takes,
                                          self.device, self.dtype, regions)

    def decide_takes(self, settings: TransferSettings, clip_length: int,
                     size: tuple[int, int] | None, takes: int, regions: int = 0
                     ) -> tuple[int, MemoryDecision | None]:
        """The batch a job of `takes` takes runs in and the savers that batch needs: the
        plan covers the batch (TooBigForGpuError when even one take cannot fit)."""
        batch = self.largest_batch(settings, clip_length, size, takes, regions)
        return batch, self.decide(settings, clip_length, size, regions, batch)

    def plan(self, settings: TransferSettings, frames: int,
             size: tuple[int, int] | None, regions: int = 0, batch: int = 1) -> MemoryPlan:
        return self.planner.plan(self.model, settings, frames, size, self.device, self.dtype,
                                 regions, batch)


@dataclass
class PlanWork:
    """One request waiting for its plan. `make` runs on the planning thread; on the
    main thread `finish(outcome)` gives the reply, or, when make raised, `refuse(code,
    sentence)` does (a `rejected` for a submit, an `error` for a plan request)."""

    routing_id: bytes
    req: int | None
    make: Callable[[], Any]
    finish: Callable[[Any], dict[str, Any]]
    refuse: Callable[[str, str], dict[str, Any]]
    outcome: Any = None
    failure: BaseException | None = None


class PlanDesk:
    """The plans waiting, the one planning thread's body, and the plans made."""

    def __init__(self, capacity: int, gate: Path | None = None) -> None:
        """`capacity`: requests that may wait for a plan at once (the server's max_queue);
        `gate`: testing only (serve --test-plan-gate), each plan waits for this file."""
        self.capacity = capacity
        self.gate = gate
        self._todo: queue.Queue[PlanWork] = queue.Queue()
        self._made: deque[PlanWork] = deque()
        self._lock = threading.Lock()
        self._waiting = 0  # queued or being planned

    def waiting(self) -> int:
        """Requests waiting for their plan now (the hello's `plans_waiting`)."""
        with self._lock:
            return self._waiting

    def put(self, work: PlanWork) -> bool:
        """Queue a plan; False when `capacity` requests already wait."""
        with self._lock:
            if self._waiting >= self.capacity:
                return False
            self._waiting += 1
        self._todo.put(work)
        return True

    def made(self) -> list[PlanWork]:
        """The plans made since the last call, oldest first (main thread)."""
        with self._lock:
            works = list(self._made)
            self._made.clear()
            self._waiting -= len(works)
        return works

    def run(self, stopping: threading.Event, notify: Callable[[], None]) -> None:
        """The planning thread's body: plan, hand over, tell the main loop; until stopping."""
        while not stopping.is_set():
            try:
                work = self._todo.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._hold(stopping)
                work.outcome = work.make()
            except Exception as failure:  # a plan's bug ends its request, not the thread
                work.failure = failure
            with self._lock:
                self._made.append(work)
            notify()

    def _hold(self, stopping: threading.Event) -> None:
        """Testing only: wait until the gate file exists, then take it (delete it); a
        file saying `raise` makes this plan fail as a planning bug would."""
        if self.gate is None:
            return
        said = pass_gate(self.gate, stopping)
        if said is None:
            raise RuntimeError("The server stopped while a plan was held.")
        if said == GATE_RAISE:
            raise RuntimeError("This plan failed because --test-plan-gate said so.")


def pass_gate(gate: Path, stopping: threading.Event) -> str | None:
    """Testing only (serve --test-plan-gate, --test-take-gate): wait until the file
    `gate` exists, then take it (delete it) and return what it says; None when the
    server stops first. A test lets one held step through by writing the file."""
    while not gate.exists():
        if stopping.wait(GATE_POLL_S):
            return None
    said = gate.read_text().strip()
    gate.unlink()
    return said


def log_planning_bug(failure: BaseException) -> None:
    """Log a plan's unexpected failure with its traceback (the reply says: see the log)."""
    log.error("Planning a request's memory failed:\n%s",
              "".join(traceback.format_exception(failure)))
