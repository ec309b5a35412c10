"""ZeroScope v2 behind the backbone seam: its components, its facts, its loading, and the
tiny random model of its component types.

ZeroScope v2 576w is loaded as separate diffusers/transformers components (the
deprecated TextToVideoSDPipeline is not used): UNet3DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer and a DDIMScheduler configured as the reference runs it.
ZeroScope v2 XL, the upscaler, has the same component types and loads through the
same code.

`build_tiny_components()` makes a small randomly initialised model of the same
component types for tests and CPU runs; `save_tiny_model()` writes it in diffusers
layout so tests exercise the real `from_pretrained` path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from backend.backbones.base import (
    Backbone,
    BackboneFacts,
    Timestep,
    checkpointed_blocks,
    choose_dtype,
    encoder_device,
    meta_network,
    missing_weights,
    model_location,
    text_encoder_home,
)
from backend.backbones.ddim import DDIMSchedule
from backend.backbones.zeroscope_taps import TAP_NAMES, full_pass_smm, truncated_smm
from backend.errors import BadSettingsError

TINY = "tiny"
ZEROSCOPE = "cerspense/zeroscope_v2_576w"
ZEROSCOPE_XL = "cerspense/zeroscope_v2_XL"  # the upscaler: 1024×576, same component types
ZEROSCOPE_RANDOM = "zeroscope-random"  # ZeroScope's architecture, random weights (benchmarks)

# The reference's DDIM configuration (docs/method.md).
REFERENCE_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
# The authors' prompts (docs/method.md): a quality prefix on both prompts, and this
# negative prompt.
REFERENCE_NEGATIVE_PROMPT = (
    "bad quality, distortions, unrealistic, distorted image, watermark, signature"
)
REFERENCE_PROMPT_PREFIX = "Amazing quality, masterpiece, "

ZEROSCOPE_FACTS = BackboneFacts(
    name="zeroscope",
    native_size=(576, 320),
    window_frames=24,  # ZeroScope v2 was trained on 24-frame clips
    frame_rate=8.0,  # ModelScope's lineage: 8 fps training clips
    side_multiple=8,  # one latent cell; the UNet matches skip sizes itself
    defaults={
        "width": 576, "height": 320, "window_frames": 24, "window_overlap": 8,
        "prompt_prefix": REFERENCE_PROMPT_PREFIX, "negative_prompt": REFERENCE_NEGATIVE_PROMPT,
        "cfg_scale": 10.0, "guided_fraction": 0.4, "guidance_iterations": 10,
        "lr_start": 0.007, "lr_end": 0.004,
    },
)
NO_UPSCALER = (
    "This engine was started without an upscaler, so upscale 'xl' cannot run; set upscale "
    f"to 'none', or fetch ZeroScope XL (`hf download {ZEROSCOPE_XL}`) and load it with "
    "--upscale-model."
)
ZEROSCOPE_XL_FACTS = BackboneFacts(
    name="zeroscope", native_size=(1024, 576), window_frames=24, frame_rate=8.0, side_multiple=8,
    defaults={**ZEROSCOPE_FACTS.defaults, "width": 1024, "height": 576},
)


class ZeroScope(Backbone):
    """ZeroScope v2 (576w, or XL as the upscaler): UNet3D on per-frame SD latents, DDIM.

    Latents are (1, 4, F, H/8, W/8): one latent frame per pixel frame.
    """

    tap_names = TAP_NAMES
    truncated_pass_share = 0.66  # docs/performance.md: ZeroScope v2, stopped after up_blocks[1]

    def __init__(self, unet: UNet3DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler: DDIMScheduler, model_id: str,
                 device: torch.device, dtype: torch.dtype, facts: BackboneFacts = ZEROSCOPE_FACTS,
                 ) -> None:
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.schedule = DDIMSchedule(scheduler)
        self.model_id = model_id
        self.device = device
        self.dtype = dtype
        self.facts = facts

    @property
    def latent_cell(self) -> int:
        """Pixels per latent cell along each side (8 for ZeroScope)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_frames(self, frames: int) -> int:
        return frames

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]

    # ---------------------------------------------------------------- memory plan


    def meta_copy(self) -> ZeroScope:
        import copy

        return ZeroScope(meta_network(self.unet), meta_network(self.vae),
                         meta_network(self.text_encoder), self.tokenizer,
                         copy.deepcopy(self.scheduler), self.model_id, torch.device("cpu"),
                         self.dtype, self.facts)

    @classmethod
    def meta_shell(cls, model: str, device: torch.device, dtype: str | None) -> ZeroScope:
        """The ZeroScope `model` (TINY, or an architecture of the registry's: the
        published one's networks) on the meta device, in the dtype it would run in on
        `device`, the CPU as its own device: the memory plan's shell of a model not
        loaded."""
        torch_dtype = choose_dtype(dtype, device)
        unet, vae, text_encoder, tokenizer, scheduler = (
            build_tiny_components() if model == TINY
            else build_zeroscope_random_components(torch.device("meta")))
        for module in (unet, vae, text_encoder):
            # nn.Module.to: diffusers' own .to warns about dtype casts that are moot here.
            torch.nn.Module.to(module, "meta", torch_dtype).eval().requires_grad_(False)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, model, torch.device("cpu"),
                   torch_dtype)

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text embeddings, (len(prompts), 77, E)."""
        length = min(self.tokenizer.model_max_length, self.text_encoder.config.max_position_embeddings)
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids.to(encoder_device(self.text_encoder))
        return self.text_encoder(ids)[0].to(self.device, self.dtype)

    @torch.no_grad()
    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        """(F, H, W, 3) uint8 → z₀ (1, C, F, h, w): the VAE posterior's mean × scaling
        factor (the reference samples the posterior; the mean keeps a re-edit's
        inversion deterministic)."""
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = []
        for chunk in pixels.split(frames_per_slice):
            encoded = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist.mean
            latents.append(encoded * self.vae.config.scaling_factor)
        return torch.cat(latents).permute(1, 0, 2, 3).unsqueeze(0)

    def decode_slices(self, latent: torch.Tensor,
                      frames_per_slice: int) -> list[Callable[[], np.ndarray]]:
        """Per-frame VAE decode, `frames_per_slice` frames at a time."""
        planes = (latent[0].permute(1, 0, 2, 3) / self.vae.config.scaling_factor).to(self.dtype)

        @torch.no_grad()
        def decode(chunk: torch.Tensor) -> np.ndarray:
            decoded = self.vae.decode(chunk).sample.float().clamp(-1, 1)
            return ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

        return [lambda chunk=chunk: decode(chunk) for chunk in planes.split(frames_per_slice)]

    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor) -> torch.Tensor:
        """ε from the UNet (under autocast on CUDA in half precision)."""
        if embedding.shape[0] != latent.shape[0]:
            embedding = embedding.expand(latent.shape[0], -1, -1)
        with self.precision():
            return self.unet(self.model_input(latent), timestep, encoder_hidden_states=embedding).sample

    def taps(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
             truncated: bool, spatial: bool = False) -> list[torch.Tensor]:
        """The three up_blocks[1] taps (backend/backbones/zeroscope_taps.py)."""
        with self.precision():
            if truncated:
                return truncated_smm(self.unet, self.model_input(latent), timestep, embedding,
                                     spatial)
            return full_pass_smm(self.unet, self.model_input(latent), timestep, embedding, spatial)

    def check_upscaler(self, upscaler: Backbone | None) -> None:
        """ZeroScope's upscaler is ZeroScope XL (`load_zeroscope_xl`); an engine started
        without one says where to get it."""
        if upscaler is None:
            raise BadSettingsError(NO_UPSCALER)
        super().check_upscaler(upscaler)

    @contextlib.contextmanager
    def vae_tiling(self) -> Iterator[None]:
        """AutoencoderKL's own tiling, frame by frame: tiles of vae_tile_pixels whose
        latents are blended over vae_tile_overlap pixels' worth of cells."""
        vae = self.vae
        before = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size,
                  vae.tile_overlap_factor)
        vae.use_tiling = True
        vae.tile_sample_min_size = self.vae_tile_pixels
        vae.tile_latent_min_size = self.vae_tile_pixels // self.latent_cell
        vae.tile_overlap_factor = self.vae_tile_overlap / self.vae_tile_pixels
        try:
            yield
        finally:
            (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size,
             vae.tile_overlap_factor) = before

    def checkpointing(self, enabled: bool) -> AbstractContextManager:
        """UNet3DConditionModel has no checkpointing of its own. Each part of the pass
        before the tapped block recomputes its activations during backward, one part at
        a time: transformer_in (the temporal transformer at full resolution, whose
        activations would otherwise live through the whole backward) and each resnet,
        temporal convolution, attention, temporal attention and resampler of the down
        blocks, the mid block and up_blocks[0]. Whole blocks would recompute a full
        block at once in backward (down_blocks[0]'s, at full resolution, is about 6 GiB
        at 576x320, 24 frames); parts keep one part's. up_blocks[1] itself is left alone
        (its hooks hold the taps)."""
        return checkpointed_blocks(checkpointed_parts(self.unet), enabled)


def checkpointed_parts(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """What ZeroScope's checkpointing recomputes, each on its own (ZeroScope.checkpointing):
    transformer_in, then the parts of every block before up_blocks[1], in pass order."""
    parts: list[torch.nn.Module] = [unet.transformer_in]
    for block in [*unet.down_blocks, unet.mid_block, unet.up_blocks[0]]:
        for name in ("resnets", "temp_convs", "attentions", "temp_attentions", "downsamplers",
                     "upsamplers"):
            parts.extend(getattr(block, name, None) or ())
    return parts


def load_zeroscope(model: str, device: torch.device, dtype: str | None, flag: str = "--model",
                   facts: BackboneFacts = ZEROSCOPE_FACTS) -> ZeroScope:
    """Load `model`: a hub id, a local diffusers folder, "tiny", or "zeroscope-random"
    (ZeroScope's architecture with random weights, for timing), in `dtype` (None: fp16
    on CUDA, fp32 on a CPU). `flag` is the command-line flag that named it, for the
    missing-weights sentence."""
    dtype = choose_dtype(dtype, device)
    if model == TINY:
        parts = build_tiny_components()
    elif model == ZEROSCOPE_RANDOM:
        parts = build_zeroscope_random_components(device)
    else:
        parts = _from_pretrained(model, dtype, flag)
    unet, vae, text_encoder, tokenizer, scheduler = parts
    for module, home in ((unet, device), (vae, device), (text_encoder, text_encoder_home(device))):
        if module.dtype != dtype:  # from_pretrained already loaded in dtype
            module.to(dtype=dtype)
        module.to(home).eval().requires_grad_(False)
    return ZeroScope(unet, vae, text_encoder, tokenizer, scheduler, model, device, dtype, facts)


def load_zeroscope_xl(model: str, device: torch.device, dtype: str | None,
                      flag: str = "--upscale-model") -> ZeroScope:
    """The upscaler (settings.upscale "xl"): ZeroScope XL, or a folder or "tiny" standing
    in for it, with XL's facts."""
    return load_zeroscope(model, device, dtype, flag, ZEROSCOPE_XL_FACTS)


def _from_pretrained(model: str, torch_dtype: torch.dtype, flag: str) -> tuple:
    location = model_location(model, flag)
    try:
        unet = UNet3DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch_dtype)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                     torch_dtype=torch_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler",
                                                  **REFERENCE_SCHEDULER)
    except (OSError, ValueError) as error:
        raise missing_weights(model, flag) from error
    return unet, vae, text_encoder, tokenizer, scheduler


# --------------------------------------------------------------------------- tiny model


def build_tiny_components(seed: int = 0) -> tuple:
    """A few-MB random model with ZeroScope's component types and latent geometry.

    Same VAE down-sampling (8×), same UNet block layout (CrossAttnUpBlock3D at
    up_blocks[1] with two ResNets, temporal convs and an upsampler), tiny widths.
    Deterministic for its seed.
    """
    torch.manual_seed(seed)
    text_width = 32
    unet = UNet3DConditionModel(
        sample_size=8,
        block_out_channels=(16, 16, 32, 32),
        # Attention only where the latent is small, so full 576×320 clips stay cheap on a
        # CPU; up_blocks[1] keeps ZeroScope's CrossAttnUpBlock3D (the feature taps).
        down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"),
        layers_per_block=1,
        cross_attention_dim=text_width,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=text_width,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=514,
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=513,
            projection_dim=text_width,
        )
    )
    return unet, vae, text_encoder, build_byte_tokenizer(), DDIMScheduler(**REFERENCE_SCHEDULER)


def build_zeroscope_random_components(device: torch.device, seed: int = 0) -> tuple:
    """ZeroScope v2 576w's architecture with random weights (nothing downloaded).

    UNet3DConditionModel's defaults are ZeroScope's UNet; the VAE is Stable Diffusion's
    (four blocks, 128/256/512/512); the text encoder is OpenCLIP ViT-H/14's text tower
    (1024 wide, 23 layers). Time and memory do not depend on the weight values. Built
    directly on `device` so a GPU run does not first fill the CPU's memory.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet3DConditionModel()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
            num_hidden_layers=23, max_position_embeddings=77, vocab_size=49408, hidden_act="gelu",
            projection_dim=1024, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    return unet, vae, text_encoder, build_byte_tokenizer(), DDIMScheduler(**REFERENCE_SCHEDULER)


def build_byte_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a byte-level vocabulary and no merges, built offline.

    Vocabulary: the 256 byte symbols, the same with the end-of-word mark "</w>", then
    <|startoftext|> and <|endoftext|>: 514 tokens.
    """
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab["<|startoftext|>"] = 512
    vocab["<|endoftext|>"] = 513
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    symbols = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def save_tiny_model(folder: Path, seed: int = 0) -> None:
    """Write the tiny model in diffusers layout (unet/, vae/, text_encoder/, …)."""
    unet, vae, text_encoder, tokenizer, scheduler = build_tiny_components(seed)
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        '{"_class_name": "TextToVideoSDPipeline", "_diffusers_version": "0.42.1",\n'
        ' "unet": ["diffusers", "UNet3DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],\n'
        ' "text_encoder": ["transformers", "CLIPTextModel"],\n'
        ' "tokenizer": ["transformers", "CLIPTokenizer"],\n'
        ' "scheduler": ["diffusers", "DDIMScheduler"]}\n'
    )
