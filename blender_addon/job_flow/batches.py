"""Rendering a strip's frames a few at a time, so Blender's interface stays live.

In the interface the extension renders from a timer: each tick renders one batch and
returns, so Blender redraws, the progress bar moves and Cancel can be clicked between
batches. This module decides how many frames each tick renders, counts progress and
takes cancellation; it knows nothing of Blender (the caller renders the frames it is
given and says how long that took), so it is unit-tested without Blender.

Batch size: the first tick renders one frame, so the bar moves (and Cancel answers)
after one frame's time whatever the strip; later ticks render as many frames as fit
in the tick budget at the measured time per frame, at least one. In background mode
(no timers) there is no budget: one batch holds every remaining frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TICK_BUDGET_S = 0.1  # interface time one tick may take: short enough to feel live
SMOOTHING = 0.5  # weight of the newest measurement in the time-per-frame estimate


@dataclass
class BatchRenderer:
    """Which frames to render next, how far rendering is, and whether it was cancelled."""

    frames: list[int]
    tick_budget_s: float | None = TICK_BUDGET_S  # None: render everything in one batch
    done: int = 0
    cancelled: bool = False
    seconds_per_frame: float | None = field(default=None)

    @property
    def total(self) -> int:
        return len(self.frames)

    @property
    def finished(self) -> bool:
        """Nothing more to render: every frame is rendered, or rendering was cancelled."""
        return self.cancelled or self.done >= self.total

    @property
    def complete(self) -> bool:
        """Every frame is rendered and rendering was not cancelled."""
        return not self.cancelled and self.done >= self.total

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def batch_size(self) -> int:
        """How many frames the next tick renders."""
        remaining = self.total - self.done
        if self.tick_budget_s is None:
            return remaining
        if self.seconds_per_frame is None or self.seconds_per_frame <= 0:
            return min(1, remaining)
        return min(remaining, max(1, int(self.tick_budget_s / self.seconds_per_frame)))

    def next_batch(self) -> list[int]:
        """The timeline frames the next tick renders (none once finished)."""
        if self.finished:
            return []
        return self.frames[self.done:self.done + self.batch_size()]

    def record(self, rendered: int, seconds: float) -> None:
        """The caller rendered `rendered` frames of the batch in `seconds`."""
        if rendered <= 0:
            return
        self.done = min(self.total, self.done + rendered)
        measured = max(0.0, seconds) / rendered
        if self.seconds_per_frame is None:
            self.seconds_per_frame = measured
        else:
            self.seconds_per_frame += SMOOTHING * (measured - self.seconds_per_frame)

    def cancel(self) -> None:
        """Stop before the next batch; frames already rendered are thrown away by the caller."""
        self.cancelled = True
