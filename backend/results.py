"""What one edit returns, in every layer that runs one, and how it reports progress.

The engine returns a TransferResult; so do the server's engine interface
(backend/server/engine_api.py) and a Ray actor's handle (backend/cluster/remote.py),
so the server's job thread handles a local and a remote edit alike. The layers above
have their own: the command line's EditOutcome (the files it wrote, backend/edit.py)
and the client's JobResult (PNG bytes as fetched, shared/client.py).

No torch here: the gateway and the server import this without the model's libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.sidecar import Sidecar

ProgressCallback = Callable[[str, int, int], None]
"""progress(phase, step, total), the one progress callback of every layer that runs an
edit (engine, server, Ray actor, command line). Phases in order: "encode", "invert",
"features", "sample", "decode", then "upscale" with an upscaler ("encode", "invert" and
"features" are skipped when the inversion is cached), and the server adds "save".
"invert", "features" and "sample" count windows within steps: total = steps × windows;
"upscale" counts its encode, its steps × windows and its decode slices."""

RegionMasks = np.ndarray
"""The masks of one edit: (R, N, H, W) float32 in [0, 1], one region per mask input
(`--mask`, repeatable), one frame per clip frame, at the clip's resolution; white (≥ ½)
is the subject. backend/method/regions.py reads and checks them (`read_masks`,
`check_region_masks`); `Engine.transfer(..., masks=)` takes them (None: no region)."""

CancelCheck = Callable[[], bool]
"""Returns True when the caller wants the edit stopped; checked between windows."""


@dataclass
class TransferResult:
    """A finished edit: its frames and the record of how they were made."""

    frames: np.ndarray  # (F_out, H, W, 3) uint8
    sidecar: Sidecar
