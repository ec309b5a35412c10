"""What one edit returns, in every layer that runs one, and how it reports progress.

The engine returns a TransferResult; so do the server's engine interface
(backend/server/engine_api.py) and a Ray actor's handle (backend/cluster/engine_handles.py),
so the server's job thread handles a local and a remote edit alike. The layers above
have their own: the command line's EditOutcome (the files it wrote, backend/edit.py)
and the client's JobResult (PNG bytes as fetched, shared/client.py).

No torch here: the gateway and the server import this without the model's libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from backend.errors import JobCancelled
from shared.sidecar import Sidecar

ProgressCallback = Callable[[str, int, int], None]
"""progress(phase, step, total), the one progress callback of every layer that runs an
edit (engine, server, Ray actor, command line). Phases in order: "encode", "invert",
"features", "sample", "decode", then "upscale" with an upscaler ("encode", "invert" and
"features" are skipped when the inversion is cached), and the server adds "save".
"invert", "features" and "sample" count windows within steps: total = steps × windows;
"upscale" counts its encode, its steps × windows and its decode slices. An edit of several
takes (Engine.transfer_takes) names them after the phases it runs per take: "sample take
2", "decode takes 1-4"; the shared phases keep their names."""

RegionMasks = np.ndarray
"""The masks of one edit: (R, N, H, W) grey levels, uint8 0…255 (the smallest exact form:
what the command line reads) or float32 in [0, 1], one region per mask input (`--mask`,
repeatable), one frame per clip frame, at the clip's resolution; white (≥ ½) is the
subject. backend/masks.py reads and checks them (`read_mask_levels`,
`check_region_masks`); `Engine.transfer(..., masks=)` takes them (None: no region), or
anything with their `shape`, len() and `masks[:, [frame]]` (the server's PngMasks): it
reads only the frames it edits, one at a time."""

@dataclass(frozen=True)
class Take:
    """One take of an edit: the prompt and the seed it samples with
    (`Engine.transfer_takes`); the rest of the settings are the edit's."""

    prompt: str
    seed: int


def takes_of(prompts: list[str], seed: int, count: int) -> list[Take]:
    """`--takes count` with `--prompt` given once per prompt: every prompt with each of
    the seeds seed, seed + 1, …, seed + count − 1, prompt by prompt (take k of a prompt
    uses seed + k − 1, so its first take is the edit with `--seed`)."""
    return [Take(prompt, seed + k) for prompt in prompts for k in range(count)]


def take_phase(phase: str, numbers: list[int]) -> tuple[str, list[int]]:
    """A progress phase of an edit of several takes, as Engine.transfer_takes names it
    ("sample take 2", "decode takes 1-4": positions in the takes it was handed, from 1),
    → (the phase named with the job's own take `numbers` instead, the takes it makes),
    for a run of only some of a job's takes (the server's re-run of the takes not done).
    A shared phase ("invert") → (itself, [])."""
    base, _, named = phase.partition(" take")
    if not named:
        return phase, []
    first, _, last = named.removeprefix("s").strip().partition("-")
    made = [numbers[index - 1] for index in range(int(first), int(last or first) + 1)]
    contiguous = made == list(range(made[0], made[-1] + 1))
    label = (f" take {made[0]}" if len(made) == 1 else f" takes {made[0]}-{made[-1]}"
             if contiguous else " takes " + ",".join(map(str, made)))
    return base + label, made


CancelCheck = Callable[[], bool]
"""Returns True when the caller wants the edit stopped; checked between windows."""


class Reporter:
    """Progress out, cancellation in: what an edit calls between every unit of work
    (`report(phase, step, total)` tells `progress`, `report.check()` raises
    JobCancelled once `cancelled` says so). Reporter(None, None) reports to nobody."""

    def __init__(self, progress: ProgressCallback | None, cancelled: CancelCheck | None) -> None:
        self.progress = progress
        self.cancelled = cancelled

    def __call__(self, phase: str, step: int, total: int) -> None:
        self.check()
        if self.progress is not None:
            self.progress(phase, step, total)

    def check(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise JobCancelled("The edit was cancelled.")


TakeCallback = Callable[[int, "TransferResult"], None]
"""on_take(index, result): a take of an edit of several takes is finished (index into
the takes the edit was handed, from 0); Engine.transfer_takes calls it as each is."""


@dataclass
class TransferResult:
    """A finished edit: its frames and the record of how they were made.

    `alpha`: when the frames are composited through a region (they keep the plate),
    the feathered region m of each frame as 0…255 (`plate_alpha`), the one record of
    where the result was generated; the server sends it as the result PNGs' alpha, so
    an editor can lay the result over the source through it. None otherwise."""

    frames: np.ndarray  # (F_out, H, W, 3) uint8
    sidecar: Sidecar
    alpha: np.ndarray | None = None  # (F_out, H, W) uint8


def plate_alpha(plate: np.ndarray, box: tuple[int, int, int, int],
                size: tuple[int, int]) -> np.ndarray:
    """The feathered region m (F, box h, box w) in [0, 1], placed in its box of whole
    frames of size = (width, height), as 8-bit alpha:

        α[f, y, x] = round(255 · m[f, y − top, x − left]) inside the box, 0 outside

    so α = 0 exactly where the composite is the source's pixel (m = 0)."""
    left, top, right, bottom = box
    alpha = np.zeros((len(plate), size[1], size[0]), np.uint8)
    alpha[:, top:bottom, left:right] = np.rint(np.clip(plate, 0, 1) * 255).astype(np.uint8)
    return alpha
