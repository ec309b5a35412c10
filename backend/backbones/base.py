"""The backbone seam: what the method (backend/method/) asks of a text-to-video model.

Two small interfaces. A `Backbone` is one loaded model: it encodes and decodes clips,
embeds prompts, predicts the model output (ε for ZeroScope, the flow velocity for Wan),
reads the feature taps the guidance compares (with a truncated pass that stops after
them), and states its geometry (latent frames for N pixel frames, side multiple, native
size and pixel budget, window length, frame rate) and the settings it decides (prompt
prefix, negative prompt, CFG scale, guidance schedule). A `Schedule` is how its noise
levels are walked: timesteps, inversion, one step, re-noising to a timestep, restart.

The engine's loop, the windows, the framing, the guidance maths and the inversion cache
see only these two, so a second model is a second pair of classes in one file, and one
line in backend/backbones/registry.py:

    ZeroScope v2   backend/backbones/zeroscope.py   DDIM         backend/backbones/ddim.py
    Wan 2.1        backend/backbones/wan.py         flow match   backend/backbones/flow_matching.py

Also here, for every backbone: `smm` (the paper's spatial marginal mean, what a tap
returns), `checkpointed_blocks`, and the model location / missing-weights sentences.

Latents are (1, C, F', h, w) with F' = latent_frames(N) latent frames for N pixel frames.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from backend.errors import BadSettingsError, ModelNotFoundError

Timestep = float
"""What the model is given as its time input: an int DDIM timestep (981, 961, …) or a
flow-matching σ·1000 (a float32 value). Both are dict keys in the inversion state."""

Predict = Callable[[torch.Tensor, Timestep], torch.Tensor]
"""predict(latent, timestep) → the model output for that latent (one prompt)."""

Store = Callable[[torch.Tensor], torch.Tensor]
"""store(tensor) → the tensor where it is kept until it is read (Backbone.to_host)."""


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class BackboneFacts:
    """What a backbone is, as the server's hello announces it and the settings default to.

    name            "zeroscope" or "wan"
    native_size     (width, height) in pixels the model was trained at
    window_frames   pixel frames the model takes at once (its clip length)
    frame_rate      frames per second of its training clips
    side_multiple   every side a multiple of this many pixels
    defaults        the settings this model decides (TransferSettings fields left None)
    max_references  reference images an edit may give (backend/references.py); 0: none
    """

    name: str
    native_size: tuple[int, int]
    window_frames: int
    frame_rate: float
    side_multiple: int
    defaults: dict[str, Any] = field(default_factory=dict)
    max_references: int = 0

    @property
    def pixel_budget(self) -> int:
        """Pixels per frame at the native size (fit keeps a clip's own shape within it)."""
        return self.native_size[0] * self.native_size[1]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "native_size": list(self.native_size),
                "pixel_budget": self.pixel_budget, "window_frames": self.window_frames,
                "frame_rate": self.frame_rate, "side_multiple": self.side_multiple,
                "defaults": dict(self.defaults), "max_references": self.max_references}


@dataclass(frozen=True)
class Conditioning:
    """What one edit conditions the model on beyond its prompts, as the backbone built it
    (`Backbone.conditioning`; Wan VACE: the reference images and where to generate).

    leading_frames  latent frames every conditioned pass has before the clip's (VACE:
                    one per reference image). The engine samples them along with the
                    clip from the same seeded noise, and never inverts, guides, keeps
                    or decodes them.
    tensors         what the backbone's conditioned passes read (its own names)
    """

    leading_frames: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Schedule(ABC):
    """How a backbone's noise levels are walked, for sampling, inversion and restart.

    Timesteps are listed noisiest first; index i of a `steps`-step sampler steps from
    timesteps(steps)[i] to the next one (or to the clean end after the last).
    """

    @abstractmethod
    def timesteps(self, steps: int) -> list[Timestep]:
        """The model's time inputs of a `steps`-step sampler, noisiest first."""

    @abstractmethod
    def check_grids(self, steps: int, inversion_steps: int) -> None:
        """BadSettingsError with one sentence unless an inversion of `inversion_steps`
        visits every sampling timestep of `steps` steps."""

    @abstractmethod
    def inversion_timesteps(self, steps: int, inversion_steps: int) -> list[Timestep]:
        """The time inputs at which inversion calls the model, in order (least noisy first)."""

    @abstractmethod
    def invert(self, predict: Predict, source_latent: torch.Tensor, steps: int,
               inversion_steps: int, store: Store | None = None,
               ) -> tuple[dict[Timestep, torch.Tensor], Timestep, torch.Tensor]:
        """Walk the clean latent z₀ up the deterministic ODE of the sampler.

        Returns (the inverted latent at each sampling timestep of `steps` steps, the
        noisiest timestep reached, the latent there), each kept latent as `store` gave it
        back when the walk reached it (None: as it is; the engine's: a copy in host memory on a GPU), so
        the kept latents never pile up where the walk runs."""

    @abstractmethod
    def start_latent(self, source_latent: torch.Tensor, noisiest: torch.Tensor,
                     noisiest_timestep: Timestep, first_timestep: Timestep) -> torch.Tensor:
        """z₀ re-noised to the first sampling timestep with the noise inversion implies
        (what the paper's Eq. 4 takes the low frequencies of)."""

    @abstractmethod
    def step(self, model_output: torch.Tensor, steps: int, index: int,
             latent: torch.Tensor, span: int = 1) -> torch.Tensor:
        """One sampler step from timesteps(steps)[index] to the next level; with
        span k, to the level k steps on (the clean end past the last): a preview's
        stride over the final's grid (backend/method/quality.py)."""

    @abstractmethod
    def restart(self, latent: torch.Tensor, steps: int, index: int,
                generator: torch.Generator) -> torch.Tensor:
        """Re-noise a latent at the level after step `index` back up to its timestep,
        with fresh noise from `generator`."""

    @abstractmethod
    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """The forward process: z₀ at `timestep` with the given noise."""


class Backbone(ABC):
    """One loaded text-to-video model behind the seam; see the module docstring."""

    facts: BackboneFacts
    schedule: Schedule
    model_id: str
    device: torch.device
    dtype: torch.dtype
    tap_names: tuple[str, ...]
    """The feature taps, in the order `taps` returns them."""
    truncated_pass_share: float = 1.0
    """A truncated pass's cost as a share of a full pass, as docs/performance.md measured
    it on the published architecture: what the sidecar's forward-equivalents weigh a
    truncated pass by (backend/method/cost.py; `bench` measures its own)."""
    conditions_whole_clip: bool = False
    """Its conditioning (`conditioning`) covers the clip's latent frames at once, so a
    conditioned edit fits one temporal window (Wan VACE)."""

    # ---------------------------------------------------------------- geometry

    @abstractmethod
    def latent_frames(self, frames: int) -> int:
        """Latent frames the VAE makes of `frames` pixel frames (padded as `model_frames`)."""

    def model_frames(self, frames: int) -> int:
        """Pixel frames the VAE is given for a clip of `frames`: the clip, padded (by
        repeating its last frame) to a length the VAE takes whole. The extra decoded
        frames are dropped."""
        return frames

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of a latent (4 for ZeroScope, 16 for Wan)."""

    @property
    @abstractmethod
    def latent_cell(self) -> int:
        """Pixels per latent cell along each side (the VAE's spatial factor)."""

    # ---------------------------------------------------------------- model calls

    @abstractmethod
    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(F, H, W, 3) uint8 → z₀ (1, C, F', h, w), deterministic (the posterior's mean)."""

    @abstractmethod
    def decode_slices(self, latent: torch.Tensor,
                      frames_per_slice: int) -> list[Callable[[], np.ndarray]]:
        """z₀ (1, C, F', h, w) → the decode, as calls each returning the next slice of
        (f, H, W, 3) uint8 frames (so progress and cancel run between slices)."""

    @abstractmethod
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (len(prompts), L, E), on the model's device and dtype. The
        text encoder runs where it is (text_encoder_home; the engine's embed phase moves
        it, backend/memory/text_encoder.py)."""

    @abstractmethod
    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor) -> torch.Tensor:
        """The model output for a batch of latents (B, C, F', h, w) and embeddings (B, L, E)."""

    def predict_pair(self, latent: torch.Tensor, timestep: Timestep, negative: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(output with the negative prompt, output with the target prompt) for one latent:
        the two halves of classifier-free guidance, as one batch of two."""
        out = self.predict(torch.cat([latent, latent]), timestep, torch.cat([negative, target]))
        negative_out, target_out = out.chunk(2)
        return negative_out, target_out

    @abstractmethod
    def taps(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
             truncated: bool, spatial: bool = False) -> list[torch.Tensor]:
        """SMM of each feature tap, one (B, F', D) float32 tensor per name in tap_names;
        spatial: the features themselves, (B, F', D, h', w'), for a masked SMM.

        truncated: the model stops right after the taps (gradients still flow back
        through what ran); else the whole model runs and the taps are read on the way."""

    @abstractmethod
    def checkpointing(self, enabled: bool) -> AbstractContextManager:
        """Gradient checkpointing of what a truncated pass runs before the taps."""

    def step_cache(self, enabled: bool) -> AbstractContextManager:
        """Forward-only step caching (diffusers' cache hooks) on the denoiser while the
        context is open, if `enabled` and the backbone has a hook that fits; removed on
        exit. The engine opens it only around CFG steps without guidance (a preview's),
        never around a guided step or a backward pass. Default: none fits (ZeroScope's
        UNet3DConditionModel has no CacheMixin and no transformer-block list a hook
        recognises), so a preview runs fewer steps alone."""
        return nullcontext()

    def step_cache_on(self) -> bool:
        """Whether a step-cache hook is on the denoiser now."""
        return False

    def split_over_gang(self, size: int) -> bool:
        """Split the denoiser's work over the `size` ranks of the process group this
        process is in (backend/gang.py), every rank still returning whole outputs and
        taps; False when the backbone cannot, and its gang's jobs run on one rank.
        Default: cannot (ZeroScope's UNet3D has no context parallel plan)."""
        return False

    def gang_size(self) -> int:
        """How many ranks the denoiser's work is split over now (1: this process alone)."""
        return 1

    def use_settings(self, settings: Any) -> None:
        """The engine hands each edit's resolved settings here before any model call (for
        what a backbone reads from them, such as Wan's guided block)."""
        return None

    def check_settings(self, settings: Any) -> None:
        """BadSettingsError with one sentence for (resolved) settings this model cannot
        run, beyond what the engine checks for every backbone."""
        return None

    def conditioning(self, frames: np.ndarray, generate: torch.Tensor | None,
                     references: list[np.ndarray], strength: float) -> Conditioning | None:
        """One edit's conditioning beyond its prompts, built before sampling: `frames`
        (N, H, W, 3) uint8 the clip as the model gets it, `generate` (N, H, W) bool where
        the model makes new pixels (the grown region; None: the whole frame),
        `references` checked reference images (facts.max_references), `strength` the
        setting reference_strength. None: this backbone has none (the default)."""
        return None

    def conditioned(self, conditioning: Conditioning | None) -> AbstractContextManager:
        """While open, `predict` and `taps` run conditioned on `conditioning` (their
        latents then start with its leading frames); outside, unconditioned (inversion
        and the source's features). Default: nothing to condition."""
        return nullcontext()

    def check_upscaler(self, upscaler: Backbone | None) -> None:
        """BadSettingsError with one sentence unless `upscaler` (None: the engine has
        none) can run the upscaling stage after this model (settings.upscale "xl"): a
        second model of this backbone re-draws the first stage's result. A backbone
        that offers one (ZeroScope: ZeroScope XL) says how to get it."""
        if upscaler is None:
            raise BadSettingsError(
                f"The {self.facts.name} backbone has no upscaling stage; set upscale to 'none'.")
        if upscaler.facts.name != self.facts.name:
            raise BadSettingsError(
                f"The upscaler ({upscaler.facts.name}) runs only after its own backbone, not "
                f"after {self.facts.name}; set upscale to 'none'.")

    vae_tile_pixels: int = 256
    """The side of a VAE tile in pixels (the vae_tiling saver); tiles overlap by
    vae_tile_overlap pixels, over which neighbouring tiles are blended."""
    vae_tile_overlap: int = 64

    def vae_tiling(self) -> AbstractContextManager:
        """While the block runs, the VAE encodes and decodes in overlapping spatial tiles
        of vae_tile_pixels (the vae_tiling saver); after it, whole frames again. A
        backbone whose VAE cannot tile keeps it whole (the plan then shows no saving)."""
        return nullcontext()

    @abstractmethod
    def modules(self) -> list[torch.nn.Module]:
        """The model's three networks, in this order: [denoiser, vae, text_encoder]. The
        memory plan counts their weights by these roles, and the savers move them."""

    # ---------------------------------------------------------------- precision

    def precision(self) -> AbstractContextManager:
        """Autocast on CUDA in half precision (float32 latents, half-precision model
        maths, as the reference runs); elsewhere the model runs in its own dtype."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return nullcontext()

    def model_input(self, latent: torch.Tensor) -> torch.Tensor:
        """Under autocast the model takes the latent as it is; else in its weights' dtype."""
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return latent
        return latent.to(self.dtype)

    def scales_loss(self) -> bool:
        """fp16 gradients can underflow; the reference scales the loss on CUDA."""
        return self.device.type == "cuda" and self.dtype == torch.float16

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor the edit keeps for long but reads seldom (the inverted latent of each
        sampling timestep), in host memory when the model runs on a GPU, so a long clip's
        keep does not grow the GPU's peak; on a CPU the tensor itself. Readers move what
        they read (one timestep, one window) to the device. The memory plan replaces it
        with one that counts the bytes as host memory (backend/memory/planner.py)."""
        if self.device.type == "cpu":
            return tensor
        return tensor.to("cpu")

    def host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An empty tensor in host memory that a long clip's pixels are gathered in, a
        call's worth at a time (Wan's streamed VAE: backend/backbones/wan_vae.py), so they
        never pile up on the GPU. The memory plan replaces it with one it counts as host
        memory."""
        return torch.empty(shape, dtype=dtype)

    # ---------------------------------------------------------------- memory plan

    def meta_copy(self) -> Backbone:
        """This backbone's architecture rebuilt on the meta device (no weights) from its
        networks' configs, in their dtypes, with a schedule of its own and the CPU as its
        device: what the memory plan runs on, so planning never touches the loaded model."""
        raise ModelNotFoundError(
            f"The memory plan knows the backbones that make a meta copy of themselves, not "
            f"{type(self).__name__}.")


def choose_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotFoundError(
            f"Device {device!r} was asked for but this machine has no usable CUDA GPU; "
            f"use --device cpu (slow) or run on a GPU machine."
        )
    return torch.device(device)


def text_encoder_home(device: torch.device) -> torch.device:
    """Where a loaded text encoder lives: host memory when the model runs on a GPU (it
    visits the GPU only to embed, alone: backend/memory/text_encoder.py), else the device."""
    return torch.device("cpu") if device.type == "cuda" else device


def encoder_device(encoder: torch.nn.Module) -> torch.device:
    """The device the text encoder's weights are on now (where its inputs go)."""
    return next(encoder.parameters()).device


def choose_dtype(dtype: str | None, device: torch.device, gpu_default: torch.dtype = torch.float16,
                 ) -> torch.dtype:
    """`gpu_default` on CUDA (fp16 for ZeroScope, bf16 for Wan), fp32 on CPU, unless told."""
    if dtype is None:
        return gpu_default if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def meta_network(network: torch.nn.Module) -> torch.nn.Module:
    """`network` rebuilt from its config on the meta device (no weights), in its dtype,
    in eval mode and frozen: diffusers' networks by from_config, transformers' by their
    config class."""
    with torch.device("meta"):
        if hasattr(type(network), "from_config"):  # diffusers
            rebuilt = type(network).from_config(network.config)
        else:  # transformers
            rebuilt = type(network)(network.config)
    dtype = next(network.parameters()).dtype
    return torch.nn.Module.to(rebuilt, "meta", dtype).eval().requires_grad_(False)

def smm(features: torch.Tensor) -> torch.Tensor:
    """Spatial marginal mean (the paper's SMM, what every feature tap returns): φ[f, d] = 1/(H·W) · Σ_{y,x} features[f, d, y, x].

    (F, D, H, W) → (F, D).
    """
    return features.mean(dim=(-2, -1))


@contextlib.contextmanager
def checkpointed_blocks(blocks: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """Gradient checkpointing for the blocks a truncated pass runs before the tapped one
    (`Backbone.checkpointing` names them): each recomputes its activations during
    backward instead of keeping them. The tapped block is left alone (its hooks hold the
    taps and stop the pass)."""
    if not enabled:
        yield
        return
    blocks = list(blocks)
    own = [block.__dict__.get("forward") for block in blocks]  # a hook's (group offload)
    for block in blocks:
        original = block.forward

        def run(*args, _original=original, **kwargs):
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)
        block.forward = run
    try:
        yield
    finally:
        for block, forward in zip(blocks, own, strict=True):
            if forward is None:
                del block.forward  # back to the class's method
            else:
                block.forward = forward  # back to group offload's hook


def model_location(model: str, flag: str) -> str:
    """A local folder's path, or the hub id as given; a path that is not a folder is
    one sentence."""
    source = Path(model)
    if model.startswith((".", "/", "~")) and not source.expanduser().is_dir():
        raise ModelNotFoundError(f"There is no model folder at {model}; check the {flag} path.")
    return str(source.expanduser()) if source.expanduser().is_dir() else model


def missing_weights(model: str, flag: str) -> ModelNotFoundError:
    """The one sentence for weights that are neither here nor downloadable. The main
    model is also Blender's Model preference (the extension starts `serve --model`)."""
    where = (f"{flag} on the command line or the Model setting of the Blender extension's "
             "preferences" if flag == "--model" else flag)
    return ModelNotFoundError(
        f"The weights of {model!r} are not on this machine and could not be downloaded; "
        f"on a machine with internet run `hf download {model}` (or copy the folder here "
        f"and give its path as {where})."
    )


class StopAfter(Exception):
    """Raised from a forward hook to stop a model once the feature taps are read."""


@contextlib.contextmanager
def stop_after(module: torch.nn.Module) -> Iterator[None]:
    """While active, the model stops (StopAfter) as soon as `module` has run."""
    def stop(_module, _inputs, _output):
        raise StopAfter
    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()
