"""Every knob of a motion-transfer edit: its name, default, range and help, once.

The backend (engine, job server, command-line flags) and the Blender panel all read
the settings from here, so a name, a default or a range is written in one place.
Defaults follow the authors' code (docs/method.md). Settings that depend on the model
(its native size, window, prompts, CFG scale and guidance schedule) default to None,
"the model's": the engine fills them from its backbone (`resolved`), and the server
announces them in its hello. A `TransferSettings` is filled
from command-line flags, from a job's JSON settings on the server, or from the panel,
and written back into the result's JSON sidecar, so its fields are plain JSON types.

Standard library only: this module rides inside the Blender extension.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import BadSettingsError

MAX_PROMPT_CHARS = 1000
MAX_FRAMES_CEILING = 100_000  # no setting counts more frames than this, whatever the limits
TEXT_SETTINGS = ("prompt", "source_prompt", "negative_prompt", "prompt_prefix")
FRAMINGS = ("fit", "crop", "stretch")
INITS = ("lowfreq", "noise")
UPSCALERS = ("none", "xl")
MOTIONS = ("subject", "camera")
MEMORY_MODES = ("auto", "off")
QUALITIES = ("preview", "final")
# Reference images (`transfer --reference`, a submit's `references`): the new subject's
# look from a picture, for a backbone that takes them (Wan VACE; its hello's
# max_references). Each side of a reference must lie in this range of pixels: below
# it there is no look to read, above it the decode alone is a problem (the model sees it
# fitted into its own frame size, whatever its size).
REFERENCE_FLAG = "--reference"
MIN_REFERENCE_SIDE = 16
MAX_REFERENCE_SIDE = 4096
# The GPU-memory savers. `--memory auto` takes the cheapest combination of them that fits
# (backend/memory/planner.py counts each one's cost: recomputed FE, bytes moved, a blended
# output); this order is only how they are listed. The plan, the engine
# (backend/memory/savers.py), the server's hello, the command line and the sidecar all
# name them from here.
MEMORY_SAVERS = ("gradient_checkpointing", "vae_slice_1", "vae_tiling", "text_encoder_offload",
                 "text_encoder_fp8", "vae_offload", "denoiser_fp8", "group_offload")


@dataclass(frozen=True)
class Spec:
    """What one setting may hold, and how the command line spells it.

    kind: "int", "float", "bool", "text" or "choice". `high` may name another
    setting whose value is the upper bound ("steps" for guided_steps). `optional`
    settings may be None (for example a seed: None means pick one at random).
    """

    kind: str
    low: float | None = None
    high: float | str | None = None
    multiple_of: int = 1
    choices: tuple[str, ...] = ()
    optional: bool = False
    flag: str | None = None  # the `transfer` flag; None: not a flag of its own
    help: str = ""


def _setting(default: Any, spec: Spec) -> Any:
    return field(default=default, metadata={"spec": spec})


@dataclass
class TransferSettings:
    """One edit: what the subject becomes and how the sampler gets there."""

    prompt: str = _setting("", Spec("text", flag="--prompt", help="what the subject should become"))
    source_prompt: str = _setting("", Spec(
        "text", flag="--source-prompt", help="describes the source clip (default empty)"))
    negative_prompt: str | None = _setting(None, Spec(
        "text", optional=True, flag="--negative-prompt",
        help="what the sampler steers away from (default: the model's)"))
    prompt_prefix: str | None = _setting(None, Spec(
        "text", optional=True, flag="--prompt-prefix",
        help="prepended to both prompts (default: the model's; ZeroScope's is the authors' "
             "quality phrase, Wan has none)"))
    seed: int | None = _setting(None, Spec(
        "int", 0, 2**63 - 1, optional=True, flag="--seed",
        help="random unless given; always recorded"))

    # Which frames of the clip go in, and how many come out.
    num_frames: int | None = _setting(None, Spec(
        "int", 2, MAX_FRAMES_CEILING, optional=True, flag="--frames",
        help="frames fed to the model, sampled evenly over the clip (default: every frame "
             "of the clip, up to --frame-limit)"))
    frame_limit: int = _setting(240, Spec(
        "int", 2, MAX_FRAMES_CEILING, flag="--frame-limit",
        help="the most frames one edit takes; longer clips are refused (time and memory "
             "grow with the frames, see docs/performance.md)"))
    start: int | None = _setting(None, Spec(
        "int", 0, 10**7, optional=True, flag="--start",
        help="first clip frame of a contiguous range (default: sample evenly over the clip)"))
    width: int | None = _setting(None, Spec(
        "int", 64, 2048, multiple_of=8, optional=True, flag="--width",
        help="the model's width in pixels (default: its native width, 576 for ZeroScope)"))
    height: int | None = _setting(None, Spec(
        "int", 64, 2048, multiple_of=8, optional=True, flag="--height",
        help="the model's height in pixels (default: its native height, 320 for ZeroScope)"))
    output_frames: int | None = _setting(None, Spec(
        "int", 1, MAX_FRAMES_CEILING, optional=True,
        help="None: as many as the model made; else retimed to this many by holding frames"))

    # Framing and resolution (docs/method.md, "Framing and resolution").
    framing: str = _setting("fit", Spec(
        "choice", choices=FRAMINGS, flag="--framing",
        help="fit: the clip's own aspect ratio within width×height pixels; crop: a centred "
             "box of the native shape, edited and put back where it was; stretch: the "
             "whole frame squeezed to width×height"))
    upscale: str = _setting("none", Spec(
        "choice", choices=UPSCALERS, flag="--upscale",
        help="xl: a second, video-to-video pass with ZeroScope XL at its own pixel "
             "budget (upscale_width×upscale_height), same prompt"))
    upscale_strength: float = _setting(0.7, Spec(
        "float", 0, 1, flag="--upscale-strength",
        help="the share of the sampling steps the upscaling pass re-noises and denoises "
             "(1: all of them, from pure noise)"))
    upscale_width: int = _setting(1024, Spec(
        "int", 64, 2048, multiple_of=8, flag="--upscale-width",
        help="the upscaler's native width in pixels (ZeroScope XL: 1024)"))
    upscale_height: int = _setting(576, Spec(
        "int", 64, 2048, multiple_of=8, flag="--upscale-height",
        help="the upscaler's native height in pixels (ZeroScope XL: 576)"))

    # Inversion.
    inversion_steps: int = _setting(50, Spec(
        "int", 1, 1000, flag="--inversion-steps", help="DDIM inversion steps (the reference uses 999)"))

    # Quality: the final, or a preview (backend/method/quality.py's recipe: a strided
    # subset of the final's timesteps, fewer guided steps and Adam iterations, no
    # restart, step caching where the backbone has it; the same cached inversion).
    quality: str = _setting("final", Spec(
        "choice", choices=QUALITIES, flag="--quality",
        help="final: the edit as set; preview: a cheap look at the same edit (about a tenth "
             "of its model work, same clip, size, seed and inversion)"))

    # Sampling and guidance.
    steps: int = _setting(50, Spec("int", 1, 1000, flag="--steps", help="DDIM sampling steps"))
    guided_fraction: float | None = _setting(None, Spec(
        "float", 0, 1, optional=True, flag="--guided-fraction",
        help="the share of the steps, from the first, guided by the SMM loss (default: "
             "the model's; ZeroScope's reference: 0.4, so 20 of 50)"))
    guided_steps: int | None = _setting(None, Spec(
        "int", 0, "steps", optional=True, flag="--guided-steps",
        help="guide exactly this many first steps instead of --guided-fraction"))
    guidance_iterations: int = _setting(10, Spec(
        "int", 0, 1000, flag="--iterations", help="Adam iterations per guided step"))
    lr_start: float | None = _setting(None, Spec(
        "float", 0, 1, optional=True, flag="--lr-start",
        help="Adam learning rate at the first guided step (default: the model's)"))
    lr_end: float | None = _setting(None, Spec(
        "float", 0, 1, optional=True, flag="--lr-end",
        help="Adam learning rate at the last guided step (default: the model's)"))
    loss: str = _setting("cosine", Spec(
        "choice", choices=("cosine", "l2"), flag="--loss",
        help="cosine (the authors' code) or l2 (the paper's Eq. 3)"))
    cfg_scale: float | None = _setting(None, Spec(
        "float", 0, 100, optional=True, flag="--cfg-scale",
        help="classifier-free guidance scale (default: the model's; ZeroScope 10, Wan 5)"))
    guidance_block: int | None = _setting(None, Spec(
        "int", 0, 999, optional=True, flag="--guidance-block",
        help="Wan: the transformer block whose output the SMM loss reads (default: the "
             "model's); ZeroScope's taps are fixed"))
    init: str = _setting("lowfreq", Spec(
        "choice", choices=INITS, flag="--init",
        help="lowfreq: the paper's initial latent (low frequencies of the inverted source, "
             "high ones fresh); noise: plain seeded noise (the paper's ablation)"))
    lowfreq_factor: int = _setting(4, Spec(
        "int", 1, 64, flag="--lowfreq-factor",
        help="spatial down-sampling that keeps the initial latent's low frequencies"))
    restart: bool = _setting(True, Spec(
        "bool", flag="--no-restart", help="skip restart re-noising"))

    # Long clips: temporal windows of the model's clip length (docs/method.md).
    window_frames: int | None = _setting(None, Spec(
        "int", 2, 1000, optional=True, flag="--window-frames",
        help="frames per temporal window (default: the model's clip length, 24 for "
             "ZeroScope, 81 for Wan)"))
    window_overlap: int = _setting(8, Spec(
        "int", 0, 999, flag="--window-overlap",
        help="the least frames neighbouring windows share; less than --window-frames"))

    # Regions: keep the plate (docs/method.md, "Regions"). The masks themselves are an
    # input of the edit (`--mask`), not a setting; these say how they are used.
    region_grow: int = _setting(16, Spec(
        "int", 0, 256, flag="--region-grow",
        help="grow the region by this many pixels before feathering (room for the new "
             "subject to change shape)"))
    region_feather: int = _setting(8, Spec(
        "int", 0, 128, flag="--region-feather",
        help="soften the grown region's edge over about this many pixels, inside it (outside "
             "the grown region the result is the source's, exactly)"))
    motion: str = _setting("subject", Spec(
        "choice", choices=MOTIONS, flag="--motion",
        help="subject: each region's own motion guides it and the plate outside is kept; "
             "camera: the motion outside every region (the whole frame without one) guides "
             "a whole new frame"))

    # Reference images: the images are an input of the edit (`--reference`), not a
    # setting; this says how strongly they (and the backbone's other conditioning) steer.
    reference_strength: float = _setting(1.0, Spec(
        "float", 0, 2, flag="--reference-strength",
        help="how strongly the reference images steer the look (Wan VACE's conditioning "
             "scale: 0 ignores them, 1 as trained)"))

    # Memory.
    gradient_checkpointing: bool = _setting(False, Spec(
        "bool", flag="--gradient-checkpointing", help="less GPU memory, slower guidance"))
    vae_slice: int = _setting(4, Spec("int", 1, 256, flag="--vae-slice", help="frames per VAE slice"))
    memory: str = _setting("auto", Spec(
        "choice", choices=MEMORY_MODES, flag="--memory",
        help="auto: plan the edit's GPU memory first, turn on the savers it needs (cheapest "
             "first) and refuse an edit that cannot fit; off: run as set"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadSettingsError with one sentence for the first bad value."""
        for item in dataclasses.fields(self):
            check_value(item.name, getattr(self, item.name), spec_of(item.name), self)
        # The one check that an edit has a prompt: the CLI, the server and the extension
        # all reach it through from_dict, where a missing prompt is the default "".
        if not self.prompt.strip():
            raise BadSettingsError("The prompt is empty; describe what the subject should become.")
        if self.window_frames is not None and self.window_overlap >= self.window_frames:
            raise BadSettingsError(
                f"Setting 'window_overlap' is {self.window_overlap}; it must be less than "
                f"'window_frames' ({self.window_frames}).")
        if self.upscale != "none" and self.upscale_step_count() == 0:
            raise BadSettingsError(
                f"Setting 'upscale_strength' is {self.upscale_strength}, which re-runs none of "
                f"the {self.steps} sampling steps (it runs the last ⌊steps × strength⌋); raise "
                f"it or the steps.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransferSettings:
        """Build from JSON-like values, refusing unknown names and wrong types."""
        if not isinstance(values, dict):
            raise BadSettingsError("Settings must be a JSON object.")
        known = set(SPECS)
        unknown = sorted(str(name) for name in set(values) - known)
        if unknown:
            raise BadSettingsError(
                f"Unknown setting {unknown[0]!r}; known settings are: {', '.join(sorted(known))}."
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved(self, defaults: dict[str, Any]) -> TransferSettings:
        """A copy with every setting left None ("the model's") taken from `defaults`
        (a backbone's), checked again."""
        chosen = {name: value for name, value in defaults.items()
                  if name in SPECS and getattr(self, name) is None}
        return dataclasses.replace(self, **chosen)

    def full_prompt(self, prompt: str) -> str:
        """A prompt as the model reads it: `prompt_prefix` + prompt (the reference
        prefixes prompts with a quality phrase); an empty prompt stays empty."""
        return self.prompt_prefix + prompt if prompt else ""

    def guided_step_count(self) -> int:
        """How many of the first steps are guided: `guided_steps` if set, else as the
        reference counts its fraction, steps − ⌊steps·(1 − guided_fraction)⌋
        (20 of 50, 10 of 25, 2 of 3)."""
        if self.guided_steps is not None:
            return self.guided_steps
        return self.steps - int(self.steps * (1 - self.guided_fraction))

    def upscale_step_count(self) -> int:
        """How many of the last sampling steps the upscaling pass runs, as diffusers'
        video-to-video counts them: ⌊steps·upscale_strength⌋ (35 of 50 at 0.7)."""
        return min(int(self.steps * self.upscale_strength), self.steps)

    def guidance_learning_rates(self) -> list[float]:
        """lr for each guided step: linspace(lr_start, lr_end, guided step count)."""
        n = self.guided_step_count()
        if n == 1:
            return [float(self.lr_start)]
        return [self.lr_start + (self.lr_end - self.lr_start) * i / (n - 1) for i in range(n)]


SPECS: dict[str, Spec] = {item.name: item.metadata["spec"]
                          for item in dataclasses.fields(TransferSettings)}
DEFAULTS: dict[str, Any] = {item.name: item.default
                            for item in dataclasses.fields(TransferSettings)}


def spec_of(name: str) -> Spec:
    """The Spec of a setting, by name."""
    return SPECS[name]


def check_value(name: str, value: Any, spec: Spec, settings: Any = None) -> None:
    """Raise BadSettingsError unless `value` fits `spec`.

    `settings` supplies the other values a bound may name (guided_steps <= steps).
    Numbers must be finite: NaN passes every comparison, so it is refused by name.
    """
    if value is None and spec.optional:
        return
    if spec.kind in ("text", "choice"):
        _check_text(name, value)
        if spec.kind == "choice" and value not in spec.choices:
            raise BadSettingsError(
                f"Setting {name!r} must be {' or '.join(repr(c) for c in spec.choices)}.")
        return
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise BadSettingsError(f"Setting {name!r} must be true or false.")
        return
    if spec.kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadSettingsError(f"Setting {name!r} must be a whole number, not {value!r}.")
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadSettingsError(f"Setting {name!r} must be a number, not {value!r}.")
        if not math.isfinite(value):
            raise BadSettingsError(f"Setting {name!r} is {value}; give a finite number.")
    high = getattr(settings, spec.high) if isinstance(spec.high, str) else spec.high
    if not spec.low <= value <= high:
        raise BadSettingsError(
            f"Setting {name!r} is {value}; it must be between {spec.low} and {high}.")
    if spec.multiple_of > 1 and value % spec.multiple_of:
        raise BadSettingsError(
            f"Setting {name!r} is {value}; it must be a multiple of {spec.multiple_of}.")


def text_length_problem(name: str, text: str, max_chars: int = MAX_PROMPT_CHARS) -> str | None:
    """The one sentence for a text setting (a prompt, TEXT_SETTINGS) longer than
    `max_chars`, else None. The bound is this module's, or a server's (its hello's
    limits.max_prompt_chars), which the client and the extension check before sending;
    each layer raises its own error with this sentence."""
    if len(text) > max_chars:
        return (f"The {name.replace('_', ' ')} is {len(text)} characters long; shorten it to "
                f"{max_chars} or fewer.")
    return None


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise BadSettingsError(f"Setting {name!r} must be text.")
    if problem := text_length_problem(name, value):
        raise BadSettingsError(problem)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadSettingsError(
            f"Setting {name!r} holds characters that are not valid Unicode text; retype it."
        ) from None
