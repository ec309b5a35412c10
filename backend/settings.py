"""Every knob of a motion-transfer edit, with the reference defaults.

Defaults follow the authors' code (../shared/DESIGN.md §3). The same object is filled
from command-line flags, from a job's JSON settings on the server, and written back
into the result's JSON sidecar, so its fields are plain JSON types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from backend.errors import BadSettingsError

REFERENCE_NEGATIVE_PROMPT = (
    "bad quality, distortions, unrealistic, distorted image, watermark, signature"
)
REFERENCE_PROMPT_PREFIX = "Amazing quality, masterpiece, "
MAX_PROMPT_CHARS = 1000


@dataclass
class TransferSettings:
    """One edit: what the subject becomes and how the sampler gets there."""

    prompt: str
    source_prompt: str = ""
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT
    prompt_prefix: str = REFERENCE_PROMPT_PREFIX
    seed: int | None = None

    # Which frames of the clip go in, and how many come out.
    num_frames: int = 24
    start: int | None = None  # None: sample evenly across the clip; else a contiguous range
    width: int = 576
    height: int = 320
    output_frames: int | None = None  # None: num_frames; else retimed to this many

    # Inversion.
    inversion_steps: int = 50

    # Sampling and guidance.
    steps: int = 50
    guided_steps: int = 20
    guidance_iterations: int = 10
    lr_start: float = 0.007
    lr_end: float = 0.004
    loss: str = "cosine"  # "cosine" (authors' code) or "l2" (paper Eq. 3)
    cfg_scale: float = 10.0
    lowfreq_factor: int = 4
    restart: bool = True  # re-noise back to t after each step and denoise again

    # Memory.
    gradient_checkpointing: bool = False
    vae_slice: int = 4  # frames per VAE encode/decode slice

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadSettingsError with one sentence for the first bad value."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise BadSettingsError("The prompt is empty; describe what the subject should become.")
        for name in ("prompt", "source_prompt", "negative_prompt", "prompt_prefix"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise BadSettingsError(f"Setting {name!r} must be text.")
            if len(value) > MAX_PROMPT_CHARS:
                raise BadSettingsError(
                    f"Setting {name!r} is {len(value)} characters long; keep it under "
                    f"{MAX_PROMPT_CHARS}."
                )
        _check_int(self, "num_frames", 2, 256)
        _check_int(self, "width", 64, 2048, multiple_of=8)
        _check_int(self, "height", 64, 2048, multiple_of=8)
        _check_int(self, "inversion_steps", 1, 1000)
        _check_int(self, "steps", 1, 1000)
        _check_int(self, "guided_steps", 0, self.steps)
        _check_int(self, "guidance_iterations", 0, 1000)
        _check_int(self, "lowfreq_factor", 1, 64)
        _check_int(self, "vae_slice", 1, 256)
        if self.start is not None:
            _check_int(self, "start", 0, 10**7)
        if self.output_frames is not None:
            _check_int(self, "output_frames", 1, 10**5)
        if self.seed is not None:
            _check_int(self, "seed", 0, 2**63 - 1)
        for name in ("lr_start", "lr_end", "cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BadSettingsError(f"Setting {name!r} must be a non-negative number.")
        for name in ("restart", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise BadSettingsError(f"Setting {name!r} must be true or false.")
        if self.loss not in ("cosine", "l2"):
            raise BadSettingsError("Setting 'loss' must be 'cosine' or 'l2'.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransferSettings:
        """Build from JSON-like values, refusing unknown names and wrong types."""
        if not isinstance(values, dict):
            raise BadSettingsError("Settings must be a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise BadSettingsError(
                f"Unknown setting {unknown[0]!r}; known settings are: {', '.join(sorted(known))}."
            )
        if "prompt" not in values:
            raise BadSettingsError("The prompt is missing; describe what the subject should become.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def guidance_learning_rates(self) -> list[float]:
        """lr for each guided step: linspace(lr_start, lr_end, guided_steps)."""
        n = self.guided_steps
        if n == 1:
            return [float(self.lr_start)]
        return [self.lr_start + (self.lr_end - self.lr_start) * i / (n - 1) for i in range(n)]


def _check_int(
    settings: TransferSettings, name: str, low: int, high: int, multiple_of: int = 1
) -> None:
    value = getattr(settings, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadSettingsError(f"Setting {name!r} must be a whole number, not {value!r}.")
    if not low <= value <= high:
        raise BadSettingsError(f"Setting {name!r} is {value}; it must be between {low} and {high}.")
    if value % multiple_of:
        raise BadSettingsError(f"Setting {name!r} is {value}; it must be a multiple of {multiple_of}.")
