"""What the server needs of an engine: the calls it makes, typed.

`backend.method.engine.Engine` is one; tests and the Ray actors' handles (backend/cluster) are others.
An engine in another process can also lose that process mid-job: it raises EngineLost.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from backend.errors import UnderstudyError
from backend.results import CancelCheck, ProgressCallback, Take, TakeCallback, TransferResult
from shared.errors import ErrorCode
from shared.settings import TransferSettings

if TYPE_CHECKING:
    from backend.memory.savers import MemoryDecision


class EngineLost(UnderstudyError):
    """The process running the edit died (a Ray worker, or its machine). The job book
    runs the job again once, as after a server crash; `started` is False when the edit
    never began there, so that try does not count as one of the job's attempts."""

    code = ErrorCode.WORKER_LOST

    def __init__(self, message: str, started: bool = True) -> None:
        super().__init__(message)
        self.started = started


class TransferEngine(Protocol):
    def describe(self) -> dict[str, Any]:
        """model, device, dtype, backbone (name, native size, pixel budget, window, frame
        rate, side multiple, the settings the model decides), upscaler (None: none loaded):
        what `welcome` reports."""

    def check_settings(self, settings: TransferSettings, clip_length: int,
                       frame_size: tuple[int, int] | None = None) -> None:
        """Raise UnderstudyError (one sentence) for settings this engine cannot run on a
        clip of clip_length frames of frame_size (width, height)."""

    def transfer(self, clip_frames: Any, settings: TransferSettings,
                 progress: ProgressCallback | None = None,
                 cancelled: CancelCheck | None = None, masks: Any | None = None,
                 savers: MemoryDecision | None = None) -> TransferResult:
        """Edit a clip; clip_frames needs len() and [index array] (see PngClip). `masks`:
        the edit's regions, None for none; len() is the clip's and [index array] gives
        (R, n, H, W) float32 in [0, 1] at the clip's resolution (see PngMasks).
        `savers`: the memory savers decided for this job (`--memory auto`), None for none."""

    def transfer_takes(self, clip_frames: Any, settings: TransferSettings, takes: list[Take],
                       progress: ProgressCallback | None = None,
                       cancelled: CancelCheck | None = None, masks: Any | None = None,
                       savers: MemoryDecision | None = None, batch_size: int | None = None,
                       on_take: TakeCallback | None = None) -> list[TransferResult]:
        """Several takes of a clip from one inversion (Engine.transfer_takes), `batch_size`
        at once (None: all); `on_take(index, result)` as each take is finished, before the
        next batch runs."""


class PooledEngine(TransferEngine, Protocol):
    """One of several engines in other processes (`serve --ray`); it may be away for a
    while (restarting), and then takes no job."""

    def wait_ready(self, stopping: threading.Event) -> bool:
        """Block until the engine can take a job; False when `stopping` is set first."""
