"""Wan 2.1 (and 2.2 TI2V) behind the backbone seam: a flow-matching video transformer.

Components, as the hub's Wan-AI/Wan2.1-T2V-1.3B-Diffusers ships them (14B and Wan 2.2
TI2V-5B load the same way): WanTransformer3DModel, AutoencoderKLWan (a causal 3-D VAE,
kept in float32 as Wan runs it), UMT5EncoderModel and its tokenizer. The hub's
scheduler/ is UniPC in flow mode; only its `flow_shift` is read: sampling, inversion and
restart are Euler steps of the same flow (backend/backbones/flow_matching.py).

What the method needs from it (docs/method.md, "Wan"):

    latents      (1, 16, (N − 1)/4 + 1, H/8, W/8), normalised per channel with the VAE's
                 latents_mean / latents_std; a clip whose length is not 4k + 1 is padded
                 by repeating its last frame up to the next 4k + 1, and the extra decoded
                 frames are dropped, so every frame is edited and none is held
    sides        multiples of 16 px (VAE 8 × transformer patch 2)
    prompts      UMT5, up to 512 tokens, cut to each prompt's length and zero-padded back
                 to 512 as WanPipeline does; the text encoder leaves the GPU once the
                 prompts are embedded (embeddings are kept per prompt)
    CFG          two transformer passes (target then negative), as WanPipeline runs them
    feature tap  the output of transformer.blocks[k] (k = `guidance_block`), (B, F'·h'·w', D)
                 tokens read as (B, F', h', w', D); its SMM is the spatial mean per latent
                 frame, (B, F', D). A truncated pass stops right after block k.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch

from backend.backbones.base import (
    Backbone,
    BackboneFacts,
    StopAfter,
    Timestep,
    checkpointed_blocks,
    choose_dtype,
    encoder_device,
    meta_network,
    missing_weights,
    model_location,
    smm,
    stop_after,
    text_encoder_home,
)
from backend.backbones.flow_matching import FlowMatchingSchedule
from backend.backbones.wan_vae import (
    decode_to_host,
    encode_streamed,
    streamable,
    to_frames,
    to_pixels,
)
from backend.errors import BadSettingsError

WAN_21_T2V_1_3B = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
WAN_21_T2V_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
WAN_22_TI2V_5B = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
WAN_TINY = "wan-tiny"
WAN_RANDOM = "wan-random"  # Wan 2.1 T2V-1.3B's architecture, random weights (benchmarks)
# The architecture (backend/backbones/wan_tiny.py wan_full_configs) of each named model.
WAN_ARCHITECTURES = {WAN_RANDOM: "Wan2.1-T2V-1.3B", WAN_21_T2V_1_3B: "Wan2.1-T2V-1.3B",
                     WAN_21_T2V_14B: "Wan2.1-T2V-14B", WAN_22_TI2V_5B: "Wan2.2-TI2V-5B"}

# Wan's published negative prompt (the Wan repo's default sample_neg_prompt, as diffusers'
# Wan documentation gives it in English).
WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)
MAX_SEQUENCE_LENGTH = 512  # WanPipeline.__call__'s max_sequence_length
DEFAULT_FLOW_SHIFT = 3.0  # the hub's 480p Wan 2.1 scheduler config
# The guided block as a share of the depth: FastVMT guides blocks[14] of the 1.3B's 30
# (DiTFlow: block 15 of CogVideoX-2B's 30, 20 of the 5B's 42), so block ⌊14·L/30⌋ of L.
GUIDED_BLOCK_OF_30 = 14


def wan_facts(layers: int, ti2v: bool) -> BackboneFacts:
    """Wan 2.1 T2V (832×480, 81 frames at 16 fps) or Wan 2.2 TI2V-5B (1280×704, 121 frames
    at 24 fps), with the guidance defaults of the published DiT recipes (docs/method.md)."""
    size, frames, fps, side = ((1280, 704), 121, 24.0, 32) if ti2v else ((832, 480), 81, 16.0, 16)
    return BackboneFacts(
        name="wan", native_size=size, window_frames=frames, frame_rate=fps, side_multiple=side,
        defaults={
            "width": size[0], "height": size[1], "window_frames": frames,
            "prompt_prefix": "", "negative_prompt": WAN_NEGATIVE_PROMPT, "cfg_scale": 5.0,
            # FastVMT on Wan: the first 10 of 50 steps guided, lr 0.003 → 0.002.
            "guided_fraction": 0.2, "lr_start": 0.003, "lr_end": 0.002,
            "guidance_block": layers * GUIDED_BLOCK_OF_30 // 30,
        },
    )


WAN_21_T2V_1_3B_FACTS = wan_facts(30, ti2v=False)  # the published 1.3B's 30 blocks


# First Block Cache's threshold for a preview's unguided steps: diffusers' default (0.05),
# the quality its authors chose for a speed-up without visible loss.
STEP_CACHE_THRESHOLD = 0.05


class Wan(Backbone):
    """Wan 2.1 T2V (1.3B, 14B) or Wan 2.2 TI2V-5B (`expand_timesteps`): see the module docstring."""

    tap_names = ("block",)
    truncated_pass_share = 0.5  # docs/performance.md: Wan 2.1 1.3B, guidance block 20 of 30
    # Its model names, and how they are built (Wan VACE overrides these).
    tiny, random, architectures = WAN_TINY, WAN_RANDOM, WAN_ARCHITECTURES
    transformer_class = "WanTransformer3DModel"

    def __init__(self, transformer: Any, vae: Any, text_encoder: Any, tokenizer: Any, shift: float,
                 expand_timesteps: bool, model_id: str, device: torch.device, dtype: torch.dtype,
                 ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.expand_timesteps = expand_timesteps
        self.schedule = FlowMatchingSchedule(shift)
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.facts = wan_facts(len(transformer.blocks), expand_timesteps)
        self.guidance_block: int = self.facts.defaults["guidance_block"]  # per edit: use_settings

    # ---------------------------------------------------------------- geometry

    @property
    def temporal_factor(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_temporal", 4))

    @property
    def latent_cell(self) -> int:
        return int(getattr(self.vae.config, "scale_factor_spatial", 8))

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    def latent_frames(self, frames: int) -> int:
        """(N − 1)//4 + 1 latent frames (the causal VAE: the first frame alone, then fours)."""
        return (frames - 1) // self.temporal_factor + 1

    def model_frames(self, frames: int) -> int:
        """The next 4k + 1 ≥ N: the VAE would ignore trailing frames of any other length."""
        factor = self.temporal_factor
        return -(-(frames - 1) // factor) * factor + 1

    def modules(self) -> list[torch.nn.Module]:
        return [self.transformer, self.vae, self.text_encoder]

    # ---------------------------------------------------------------- memory plan

    def meta_copy(self) -> Wan:
        return type(self)(meta_network(self.transformer), meta_network(self.vae),
                   meta_network(self.text_encoder), self.tokenizer, self.schedule.shift,
                   self.expand_timesteps, self.model_id, torch.device("cpu"), self.dtype)

    @classmethod
    def meta_shell(cls, model: str, device: torch.device, dtype: str | None) -> Wan:
        """The Wan `model` (WAN_TINY, or a name of WAN_ARCHITECTURES: that architecture's
        networks) on the meta device, in the dtypes it would run in on `device` (the VAE
        in float32), the CPU as its own device: the memory plan's shell of a model not
        loaded."""
        torch_dtype = choose_dtype(dtype, device, torch.bfloat16)
        built = cls.built(model, "meta", torch_dtype)
        for name, module_dtype in (("transformer", torch_dtype), ("vae", torch.float32),
                                   ("text_encoder", torch_dtype)):
            torch.nn.Module.to(built[name], "meta", module_dtype).eval().requires_grad_(False)
        shift = float(built["scheduler"].config.get("flow_shift", DEFAULT_FLOW_SHIFT))
        return cls(built["transformer"], built["vae"], built["text_encoder"], built["tokenizer"],
                   shift, bool(built.get("expand_timesteps", False)), model, torch.device("cpu"),
                   torch_dtype)

    @classmethod
    def built(cls, model: str, device: str | torch.device, dtype: torch.dtype) -> dict:
        """The components of the tiny model (`cls.tiny`, float32 on the CPU) or of an
        architecture with random weights (a name of `cls.architectures`, on `device` in
        `dtype`), keyed as WanPipeline's arguments."""
        from backend.backbones.wan_tiny import build_tiny_wan, build_wan_random

        if model == cls.tiny:
            return build_tiny_wan()
        return build_wan_random(cls.architectures[model], device, dtype)

    def check_settings(self, settings: Any) -> None:
        blocks = len(self.transformer.blocks)
        if not 0 <= settings.guidance_block < blocks:
            raise BadSettingsError(
                f"Setting 'guidance_block' is {settings.guidance_block}; this Wan model has "
                f"{blocks} blocks, so use 0 to {blocks - 1}.")

    # ---------------------------------------------------------------- VAE

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) per channel, shaped (1, C, 1, 1, 1), as WanPipeline builds them."""
        channels = self.vae.config.z_dim
        mean = torch.tensor(self.vae.config.latents_mean).view(1, channels, 1, 1, 1)
        inverse_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, channels, 1, 1, 1)
        return mean.to(like.device, like.dtype), inverse_std.to(like.device, like.dtype)

    @torch.no_grad()
    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(N, H, W, 3) uint8, N = 4k + 1 → z₀ (1, 16, k + 1, H/8, W/8) in float32: the
        posterior's mean, normalised, z = (μ − mean)/std. The causal VAE runs its own
        calls (the first frame, then fours), so `frames_per_slice` does not apply; the
        clip's pixels go to the device one call's frames at a time (wan_vae.py)."""
        if streamable(self.vae):
            moments = encode_streamed(self.vae, frames, self.temporal_factor, self.device)
        else:
            vae_dtype = next(self.vae.parameters()).dtype
            moments = self.vae.encode(to_pixels(frames).to(self.device, vae_dtype)).latent_dist.parameters
        latent = moments.chunk(2, dim=1)[0]  # the posterior's mean μ (its log-variance: the rest)
        mean, inverse_std = self._latent_stats(latent)
        return ((latent - mean) * inverse_std).float()  # the flow is integrated in float32

    def decode_slices(self, latent: torch.Tensor,
                      frames_per_slice: int) -> list[Callable[[], np.ndarray]]:
        """One slice: the causal VAE decodes the clip in one loop, z·std + mean → frames,
        each call's frames to host memory as they come (wan_vae.py; tiled when the VAE's
        tiling is on)."""
        @torch.no_grad()
        def decode() -> np.ndarray:
            vae_dtype = next(self.vae.parameters()).dtype
            z = latent.to(vae_dtype)
            mean, inverse_std = self._latent_stats(z)
            z = z / inverse_std + mean
            frames = (z.shape[2] - 1) * self.temporal_factor + 1
            if not streamable(self.vae):
                return to_frames(self.vae.decode(z, return_dict=False)[0]).cpu().numpy()
            return decode_to_host(self.vae, z, frames, self.host_buffer).numpy()

        return [decode]

    # ---------------------------------------------------------------- text

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """UMT5 embeddings (len(prompts), 512, E) as WanPipeline makes them: cleaned,
        tokenised to 512, encoded with the mask, cut to each prompt's length, zero-padded
        back to 512. The encoder runs where it is (on the GPU alone, or on the CPU)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        cleaned = [prompt_clean(prompt) for prompt in prompts]
        inputs = self.tokenizer(cleaned, padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        lengths = inputs.attention_mask.gt(0).sum(dim=1).long()
        where = encoder_device(self.text_encoder)
        hidden = self.text_encoder(inputs.input_ids.to(where),
                                   inputs.attention_mask.to(where)).last_hidden_state
        hidden = hidden.to(self.dtype).cpu()
        rows = [torch.cat([row[:length], row.new_zeros(MAX_SEQUENCE_LENGTH - length, row.size(1))])
                for row, length in zip(hidden, lengths, strict=True)]
        return torch.stack(rows).to(self.device, self.dtype)

    # ---------------------------------------------------------------- transformer

    def _timestep_input(self, latent: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """t as WanPipeline passes it: (B,) float32, or one per latent token for TI2V."""
        batch, _, frames, height, width = latent.shape
        if self.expand_timesteps:
            _, patch_h, patch_w = self.transformer.config.patch_size
            tokens = frames * (height // patch_h) * (width // patch_w)
            return torch.full((batch, tokens), timestep, dtype=torch.float32, device=latent.device)
        return torch.full((batch,), timestep, dtype=torch.float32, device=latent.device)

    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor) -> torch.Tensor:
        """The flow velocity v = ε − x₀ predicted for the latent."""
        if embedding.shape[0] != latent.shape[0]:
            embedding = embedding.expand(latent.shape[0], -1, -1)
        if (size := self.gang_size()) > 1:
            from backend.backbones.context_parallel import check_tokens

            _, patch_h, patch_w = self.transformer.config.patch_size
            check_tokens(latent.shape[2] * (latent.shape[3] // patch_h) * (latent.shape[4] // patch_w),
                         size)
        with self.precision():
            return self.transformer(hidden_states=self.model_input(latent),
                                    timestep=self._timestep_input(latent, timestep),
                                    encoder_hidden_states=embedding, return_dict=False,
                                    **self._transformer_inputs(latent))[0]

    def _transformer_inputs(self, latent: torch.Tensor) -> dict[str, Any]:
        """What else the transformer is given for `latent` (Wan: nothing; Wan VACE: its context)."""
        return {}

    def predict_pair(self, latent: torch.Tensor, timestep: Timestep, negative: torch.Tensor,
                     target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two passes, target prompt first, as WanPipeline runs CFG (a batch of two can
        differ from it in the last bits). With the step cache on, each in its own cache
        context ("cond", "uncond"), as WanPipeline names them."""
        with self._cache_context("cond"):
            target_out = self.predict(latent, timestep, target)
        with self._cache_context("uncond"):
            return self.predict(latent, timestep, negative), target_out

    def _cache_context(self, name: str) -> AbstractContextManager:
        return self.transformer.cache_context(name) if self.step_cache_on() else contextlib.nullcontext()

    @contextlib.contextmanager
    def step_cache(self, enabled: bool) -> Iterator[None]:
        """diffusers' First Block Cache on the transformer while open (`enabled`): each
        pass runs the first block, and reuses the last pass's residual of the other
        blocks when the first block's residual changed by less than
        STEP_CACHE_THRESHOLD (relative mean absolute difference); removed on exit."""
        if not enabled or self.gang_size() > 1:
            # On a gang each rank would compare only its own tokens' residual, and ranks
            # deciding apart would wait on each other's collectives: no cache there.
            yield
            return
        from diffusers.hooks import FirstBlockCacheConfig

        self.transformer.enable_cache(FirstBlockCacheConfig(threshold=STEP_CACHE_THRESHOLD))
        try:
            yield
        finally:
            self.transformer.disable_cache()

    def step_cache_on(self) -> bool:
        return getattr(self.transformer, "_cache_config", None) is not None

    def split_over_gang(self, size: int) -> bool:
        """Ulysses context parallelism over the gang (backend/backbones/context_parallel.py)."""
        from backend.backbones.context_parallel import enable_ulysses

        enable_ulysses(self.transformer, size, self.device)
        return True

    def gang_size(self) -> int:
        """How many ranks the transformer's tokens are split over (1: one process)."""
        from backend.backbones.context_parallel import parallel_size

        return parallel_size(self.transformer)

    def tapped_block(self, block: int) -> torch.nn.Module:
        return self.transformer.blocks[block]

    def taps(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
             truncated: bool, block: int | None = None, spatial: bool = False) -> list[torch.Tensor]:
        """SMM of blocks[k]'s output: (B, F'·h'·w', D) → (B, F', D), the spatial mean per
        latent frame. truncated: the transformer stops right after block k. spatial: the
        tokens on their grid instead, (B, F', D, h', w'), for a masked SMM."""
        index = self.guidance_block if block is None else block
        module = self.tapped_block(index)
        captured: dict[str, torch.Tensor] = {}
        handle = module.register_forward_hook(lambda _m, _i, output: captured.__setitem__("out", output))
        try:
            with contextlib.ExitStack() as stack:
                if truncated:
                    stack.enter_context(stop_after(module))
                try:
                    self.predict(latent, timestep, embedding)
                except StopAfter:
                    pass
        finally:
            handle.remove()
        batch, _, frames, height, width = latent.shape
        _, patch_h, patch_w = self.transformer.config.patch_size
        out = captured["out"]
        if self.gang_size() > 1:  # this rank's chunk of the tokens: every rank's, in order
            from backend.backbones.context_parallel import gather_tokens

            out = gather_tokens(out, self.transformer)
        tokens = out.reshape(batch, frames, height // patch_h, width // patch_w, -1)
        features = tokens.permute(0, 1, 4, 2, 3).float()
        return [features if spatial else smm(features)]

    def use_settings(self, settings: Any) -> None:
        """The engine hands each edit's resolved settings here: the guided block."""
        self.guidance_block = settings.guidance_block

    @contextlib.contextmanager
    def vae_tiling(self) -> Iterator[None]:
        """AutoencoderKLWan's own tiling: tiles of vae_tile_pixels at a stride of
        vae_tile_pixels − vae_tile_overlap, blended over the overlap."""
        vae = self.vae
        names = ("use_tiling", "tile_sample_min_height", "tile_sample_min_width",
                 "tile_sample_stride_height", "tile_sample_stride_width")
        before = {name: getattr(vae, name) for name in names}
        stride = self.vae_tile_pixels - self.vae_tile_overlap
        vae.enable_tiling(self.vae_tile_pixels, self.vae_tile_pixels, stride, stride)
        try:
            yield
        finally:
            for name, value in before.items():
                setattr(vae, name, value)

    def checkpointing(self, enabled: bool) -> AbstractContextManager:
        return checkpointed_blocks(self.transformer.blocks[: self.guidance_block], enabled)


def load_wan(model: str, device: torch.device, dtype: str | None, flag: str = "--model") -> Wan:
    """Load a Wan model: "wan-tiny" (random, tiny), "wan-random" (Wan 2.1 1.3B's
    architecture, random weights) or a diffusers folder / hub id whose model_index.json
    names WanPipeline, in `dtype` (None: bf16 on CUDA, fp32 on a CPU). Missing weights
    end in one sentence naming `hf download`."""
    return load_wan_family(Wan, model, device, dtype, flag)


def load_wan_family(backbone: type[Wan], model: str, device: torch.device, dtype: str | None,
                    flag: str) -> Wan:
    """Load `model` as `backbone` (Wan or a subclass): its tiny or random-weight name
    (`backbone.tiny`, `backbone.random`) built, anything else from a diffusers folder or
    hub id with the backbone's own transformer class."""
    dtype = choose_dtype(dtype, device, torch.bfloat16)
    if model in (backbone.tiny, backbone.random):
        parts = backbone.built(model, device, dtype)
        shift = (float(parts["scheduler"].config.get("flow_shift", DEFAULT_FLOW_SHIFT))
                 if model == backbone.tiny else DEFAULT_FLOW_SHIFT)
        expand = bool(parts.get("expand_timesteps", False))
    else:
        location = model_location(model, flag)
        try:
            parts, shift, expand = _from_pretrained(location, dtype, backbone.transformer_class)
        except (OSError, ValueError) as error:
            raise missing_weights(model, flag) from error
    transformer, vae, text_encoder = parts["transformer"], parts["vae"], parts["text_encoder"]
    for module, module_dtype in ((transformer, dtype), (vae, torch.float32), (text_encoder, dtype)):
        if module.dtype != module_dtype:  # from_pretrained and the builders already made it so
            module.to(dtype=module_dtype)
        module.eval().requires_grad_(False)
    transformer.to(device)
    vae.to(device)
    text_encoder.to(text_encoder_home(device))
    return backbone(transformer, vae, text_encoder, parts["tokenizer"], shift, expand, model,
                    device, dtype)


def _from_pretrained(location: str, dtype: torch.dtype,
                     transformer_class: str) -> tuple[dict, float, bool]:
    """The components from a diffusers folder or hub id (cached or downloaded), the
    transformer as diffusers' `transformer_class`."""
    import diffusers
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import AutoTokenizer, UMT5EncoderModel

    index = WanPipeline.load_config(location)
    scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(location, subfolder="scheduler")
    shift = float(scheduler_config.get("flow_shift") or scheduler_config.get("shift") or DEFAULT_FLOW_SHIFT)
    parts = {
        "transformer": getattr(diffusers, transformer_class).from_pretrained(
            location, subfolder="transformer", torch_dtype=dtype),
        "vae": AutoencoderKLWan.from_pretrained(location, subfolder="vae", torch_dtype=torch.float32),
        "text_encoder": UMT5EncoderModel.from_pretrained(location, subfolder="text_encoder",
                                                         torch_dtype=dtype),
        "tokenizer": AutoTokenizer.from_pretrained(location, subfolder="tokenizer"),
    }
    return parts, shift, bool(index.get("expand_timesteps", False))
