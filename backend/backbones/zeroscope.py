"""Loading the text-to-video components: ZeroScope, a local folder, or a tiny random model.

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

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet3DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from backend.errors import ModelNotFoundError

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
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Components:
    """Everything the pipeline needs, already on its device and dtype."""

    unet: UNet3DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    model_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for ZeroScope)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def choose_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelNotFoundError(
            f"Device {device!r} was asked for but this machine has no usable CUDA GPU; "
            f"use --device cpu (slow) or run on a GPU machine."
        )
    return torch.device(device)


def choose_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU unless told otherwise."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_components(model: str, device: str | None = None, dtype: str | None = None,
                    flag: str = "--model") -> Components:
    """Load `model`: a hub id (default ZeroScope), a local diffusers folder, "tiny", or
    "zeroscope-random" (ZeroScope's architecture with random weights, for timing).
    `flag` is the command-line flag that named it, for the missing-weights sentence."""
    torch_device = choose_device(device)
    torch_dtype = choose_dtype(dtype, torch_device)
    if model == TINY:
        parts = build_tiny_components()
    elif model == ZEROSCOPE_RANDOM:
        parts = build_zeroscope_random_components(torch_device)
    else:
        parts = _from_pretrained(model, torch_dtype, flag)
    unet, vae, text_encoder, tokenizer, scheduler = parts
    for module in (unet, vae, text_encoder):
        if module.dtype != torch_dtype:  # from_pretrained already loaded in torch_dtype
            module.to(dtype=torch_dtype)
        module.to(torch_device).eval().requires_grad_(False)
    return Components(unet, vae, text_encoder, tokenizer, scheduler, model, torch_device, torch_dtype)


def _from_pretrained(model: str, torch_dtype: torch.dtype, flag: str) -> tuple:
    source = Path(model)
    if model.startswith((".", "/", "~")) and not source.expanduser().is_dir():
        raise ModelNotFoundError(f"There is no model folder at {model}; check the {flag} path.")
    location = str(source.expanduser()) if source.expanduser().is_dir() else model
    try:
        unet = UNet3DConditionModel.from_pretrained(location, subfolder="unet", torch_dtype=torch_dtype)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", torch_dtype=torch_dtype)
        text_encoder = CLIPTextModel.from_pretrained(location, subfolder="text_encoder",
                                                     torch_dtype=torch_dtype)
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer")
        scheduler = DDIMScheduler.from_pretrained(location, subfolder="scheduler",
                                                  **REFERENCE_SCHEDULER)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"The weights of {model!r} are not on this machine and could not be downloaded; "
            f"on a machine with internet run `hf download {model}` (or copy the folder here "
            f"and pass it as {flag})."
        ) from error
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
