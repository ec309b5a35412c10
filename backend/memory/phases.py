"""The phase calls of an edit that the memory plan runs: a Protocol, not an import.

The plan runs an edit's own calls, once per phase, on a backbone given fake storage
(backend/memory/planner.py). Those calls are the engine's (backend/method/engine.py
Engine is one `EditPhases`), which sits a layer above this package: the planner never
imports it, it is handed a `PhasesOf`, a function that makes the phases of a backbone
(backend/edit.py `engine_phases`, for every caller that plans).

Shapes, as the engine documents them: a latent z is (1, C, F', h, w) (F' latent
frames), an embedding (1, L, E), a window a (start, end) pair of latent frames; `guide`
and `denoise` also take a batch of B takes, latent (B, C, F', h, w) and target and
negative (B, L, E) (Engine.transfer_takes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from backend.backbones.base import Backbone, Timestep
from backend.results import Reporter
from shared.settings import TransferSettings

Window = tuple[int, int]
"""(start, end) latent frames of one temporal window (backend/method/windows.py)."""


class EditPhases(Protocol):
    """What the memory plan calls, in the order an edit runs them.

    `source_state` and `regions` are the engine's own values (its SourceState: the
    source latent, the inverted latents by timestep and `features` by timestep; its
    EditRegions: `plate`, `latent`, `count`), handed back to it as they came."""

    backbone: Backbone

    def resolve(self, settings: TransferSettings) -> TransferSettings:
        """The settings with every "the model's" (None) filled from the backbone."""

    def framing_for(self, settings: TransferSettings, frame_size: tuple[int, int]) -> Any:
        """The framing of frames of frame_size (width, height): its `model_size` (width,
        height) and its `box` of the source (left, top, right, bottom)."""

    def windows_for(self, frames: int, settings: TransferSettings) -> list[Window]:
        """The temporal windows of `frames` pixel frames, in latent frames."""

    def check_window_count(self, frames: int, settings: TransferSettings) -> None:
        """Refuse in one sentence more windows of `frames` than the backbone edits."""

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """prompts → (len(prompts), L, E)."""

    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(F, H, W, 3) uint8 → z₀ (1, C, F', h, w)."""

    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
                phase: str) -> torch.Tensor:
        """The model output (ε or velocity) of a latent piece, the latent's shape."""

    def invert(self, source_latent: torch.Tensor, source_embedding: torch.Tensor,
               windows: list[Window], settings: TransferSettings, report: Reporter,
               window_output: Callable[[torch.Tensor, Timestep], torch.Tensor] | None = None,
               ) -> Any:
        """The inversion of z₀: the source state, no features yet."""

    def source_features(self, state: Any, timestep: Timestep, source_embedding: torch.Tensor,
                        window: Window, report: Reporter, regions: Any = None,
                        ) -> list[torch.Tensor]:
        """One window's source features per tap: (window frames, D), with regions
        (R, window frames, D)."""

    def guide(self, latent: torch.Tensor, timestep: Timestep, target: torch.Tensor,
              source_features: list[list[torch.Tensor]], windows: list[Window],
              learning_rate: float, settings: TransferSettings, report: Reporter,
              regions: Any = None, *, conditioning: Any = None) -> torch.Tensor:
        """One guided step's Adam iterations on x_t: the guided x_t, float32. With the
        backbone's `conditioning`, x_t starts with its leading frames (left as they are)."""

    def denoise(self, latent: torch.Tensor, steps: int, index: int, target: torch.Tensor,
                negative: torch.Tensor, cfg_scale: float, windows: list[Window],
                report: Reporter, *, conditioning: Any = None) -> torch.Tensor:
        """One classifier-free-guided sampler step from timestep `index` of `steps`; with
        the backbone's `conditioning`, of the whole latent, its leading frames first."""

    def keep_plate(self, latent: torch.Tensor, source: Any, timestep: Timestep | None,
                   regions: Any) -> torch.Tensor:
        """The latent blended with the source's outside the grown region."""

    def edit_regions(self, mask_frames: Iterator[np.ndarray | torch.Tensor], frame_count: int,
                     region_count: int, settings: TransferSettings,
                     box: tuple[int, int, int, int], model_size: tuple[int, int],
                     model_frames: int) -> Any:
        """The edit's regions prepared from masks read one frame at a time."""


PhasesOf = Callable[[Backbone], EditPhases]
"""Makes the phases of an edit on a backbone (backend/edit.py engine_phases)."""
