"""Random Wan models: a tiny one saved in diffusers layout for tests, full-size configs for benches.

No weights can be downloaded here, so the Wan backbone's loading code is exercised on a tiny
random WanPipeline with the real component types (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel, a T5-style tokenizer, the scheduler class the hub repo ships), written
with `save_pretrained` and read back through `from_pretrained`. Its frames are noise, never
quality.

Two tiny variants:
    "t2v"   Wan 2.1 T2V geometry: VAE z_dim 16, spatial factor 8, temporal factor 4.
    "ti2v"  Wan 2.2 TI2V-5B geometry: VAE z_dim 48 with a 2×2 pixel patch (spatial factor
            16), residual VAE blocks, and the pipeline's `expand_timesteps` (one timestep
            per latent token).

The full-size configs (wan_full_configs) are the published architectures of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers, …-14B-Diffusers and Wan2.2-TI2V-5B-Diffusers; with
build_wan_random they give honest time and memory figures on a GPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

# What the hub's Wan repos ship as scheduler/ (diffusers' conversion script): UniPC in flow
# mode. The Wan backbone samples with its own Euler steps and reads only `flow_shift` here.
HUB_SCHEDULER_CLASS = "UniPCMultistepScheduler"
HUB_FLOW_SHIFT = {"Wan2.1-T2V-1.3B": 3.0, "Wan2.1-T2V-14B": 3.0, "Wan2.2-TI2V-5B": 5.0,
                  "Wan2.1-VACE-1.3B": 3.0, "Wan2.1-VACE-14B": 3.0}
# The tiny VACE's context blocks: after blocks 0 and 2 of its 4 (VACE puts one on every
# other block of the 1.3B, as here); its context has VACE's 96 channels (16 inactive + 16
# reactive latent channels + 64 for the mask's 8×8 pixels per latent cell).
TINY_VACE_LAYERS = [0, 2]
VACE_IN_CHANNELS = 96

TINY_TEXT_WIDTH = 24
TINY_VARIANTS = ("t2v", "ti2v")

# Special tokens first, as in T5/UMT5: pad 0, end of sequence 1.
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"


def build_byte_t5_tokenizer(model_max_length: int = 512):
    """A T5-style fast tokenizer over bytes, built offline with the `tokenizers` package.

    Vocabulary: <pad> = 0, </s> = 1, <unk> = 2, then the 256 byte-level symbols (259
    tokens). Every byte is one token (BPE with no merges); like T5 it appends </s> to each
    text and pads with <pad> on the right.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, UNK_TOKEN: 2}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN,
        model_max_length=model_max_length, padding_side="right",
    )


def build_tiny_wan(seed: int = 0, variant: str = "t2v", vace: bool = False) -> dict:
    """The components of a tiny random WanPipeline, keyed as WanPipeline's arguments
    (vace: WanVACEPipeline's, its transformer a WanVACETransformer3DModel with context
    blocks at TINY_VACE_LAYERS; the t2v variant only).

    Transformer: 4 blocks × 2 heads × 12 (inner width 24), patch (1, 2, 2); VAE base_dim 8,
    one ResNet per level, Wan's temporal down-sampling [False, True, True]; UMT5 encoder
    d_model 24, 2 layers; the byte T5 tokenizer; UniPC(flow_shift 3) as the hub ships.
    Deterministic for its seed; the global torch RNG is left as it was.
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in TINY_VARIANTS or (vace and variant != "t2v"):
        raise ValueError(f"unknown tiny Wan variant {variant!r}; use one of {', '.join(TINY_VARIANTS)}"
                         f" (VACE: t2v)")
    tokenizer = build_byte_t5_tokenizer()
    wan22 = variant == "ti2v"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        shape = dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
            in_channels=48 if wan22 else 16, out_channels=48 if wan22 else 16,
            text_dim=TINY_TEXT_WIDTH, freq_dim=32, ffn_dim=32, num_layers=4,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        )
        transformer = (WanVACETransformer3DModel(**shape, vace_layers=TINY_VACE_LAYERS,
                                                 vace_in_channels=VACE_IN_CHANNELS)
                       if vace else WanTransformer3DModel(**shape))
        if wan22:
            # Wan 2.2's VAE: 48 latent channels, 2×2 pixel patch before the encoder
            # (3 → 12 channels), spatial factor 16; neutral normalisation statistics.
            vae = AutoencoderKLWan(
                base_dim=8, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
                latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1],
                num_res_blocks=1, temperal_downsample=[False, True, True],
            )
        else:
            # Wan 2.1's VAE layout; latents_mean/std stay the real model's defaults.
            vae = AutoencoderKLWan(
                base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                temperal_downsample=[False, True, True],
            )
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), d_model=TINY_TEXT_WIDTH, d_kv=12, d_ff=48, num_layers=2,
            num_heads=2, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        ))
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
        flow_shift=3.0,
    )
    return {
        "transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer, "scheduler": scheduler, "expand_timesteps": wan22,
    }


def save_tiny_wan(folder: Path, seed: int = 0, variant: str = "t2v", vace: bool = False) -> Path:
    """Write a tiny random WanPipeline (vace: WanVACEPipeline) to `folder` in diffusers
    layout; returns the folder.

    model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/ (safetensors),
    as the pipeline's save_pretrained writes them: WanPipeline.from_pretrained(folder) (or
    WanVACEPipeline's) and each component's own from_pretrained(folder, subfolder=…) load
    it offline.
    """
    from diffusers import WanPipeline, WanVACEPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = build_tiny_wan(seed, variant, vace)
    if vace:
        parts.pop("expand_timesteps")  # WanVACEPipeline has no such argument
        WanVACEPipeline(**parts).save_pretrained(folder)
    else:
        WanPipeline(**parts).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------- full size

_UMT5_XXL_ENCODER = {
    # google/umt5-xxl, the text encoder of every Wan 2.1/2.2 model (encoder half only).
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "pad_token_id": 0,
    "eos_token_id": 1, "decoder_start_token_id": 0, "tie_word_embeddings": False,
}
_WAN21_VAE = {
    # AutoencoderKLWan's defaults are Wan 2.1's VAE (its latents_mean/std included).
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True],
}
_WAN22_VAE = {
    # Wan 2.2's VAE. Its 48 published latents_mean/std are left out: with random weights
    # the normalisation is 0/1 (they change no time or memory figure).
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
    "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
    "scale_factor_temporal": 4, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48,
}


def _transformer(heads: int, ffn: int, layers: int, channels: int,
                 vace_layers: list[int] | None = None) -> dict:
    """A WanTransformer3DModel's config; with vace_layers, a WanVACETransformer3DModel's."""
    config = {
        "patch_size": [1, 2, 2], "num_attention_heads": heads, "attention_head_dim": 128,
        "in_channels": channels, "out_channels": channels, "text_dim": 4096, "freq_dim": 256,
        "ffn_dim": ffn, "num_layers": layers, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
    }
    if vace_layers is not None:
        config.update(vace_layers=vace_layers, vace_in_channels=VACE_IN_CHANNELS)
    return config


_FULL_CONFIGS = {
    "Wan2.1-T2V-1.3B": {"transformer": _transformer(12, 8960, 30, 16), "vae": _WAN21_VAE,
                        "expand_timesteps": False},
    "Wan2.1-T2V-14B": {"transformer": _transformer(40, 13824, 40, 16), "vae": _WAN21_VAE,
                       "expand_timesteps": False},
    "Wan2.2-TI2V-5B": {"transformer": _transformer(24, 14336, 30, 48), "vae": _WAN22_VAE,
                       "expand_timesteps": True},
    # Wan2.1-VACE-1.3B-diffusers and -14B-diffusers: the T2V architectures plus context
    # blocks on every other block (1.3B) or every fifth (14B), as diffusers' conversion
    # script (scripts/convert_wan_to_diffusers.py, "Wan-VACE-1.3B" / "Wan-VACE-14B") writes them.
    "Wan2.1-VACE-1.3B": {"transformer": _transformer(12, 8960, 30, 16, list(range(0, 30, 2))),
                         "vae": _WAN21_VAE, "expand_timesteps": False},
    "Wan2.1-VACE-14B": {"transformer": _transformer(40, 13824, 40, 16, list(range(0, 40, 5))),
                        "vae": _WAN21_VAE, "expand_timesteps": False},
}
WAN_FULL_MODELS = tuple(_FULL_CONFIGS)


def wan_full_configs(model: str = "Wan2.1-T2V-1.3B") -> dict:
    """The published architecture of a Wan model as config dicts (nothing is built).

    Keys: transformer (WanTransformer3DModel), vae (AutoencoderKLWan), text_encoder
    (UMT5Config), scheduler (UniPCMultistepScheduler, as the hub ships), expand_timesteps
    (WanPipeline). `model` is one of WAN_FULL_MODELS. Returns fresh copies.
    """
    if model not in _FULL_CONFIGS:
        raise ValueError(f"unknown Wan model {model!r}; use one of {', '.join(WAN_FULL_MODELS)}")
    configs = copy.deepcopy(_FULL_CONFIGS[model])
    configs["text_encoder"] = dict(_UMT5_XXL_ENCODER)
    configs["scheduler"] = {
        "prediction_type": "flow_prediction", "use_flow_sigmas": True,
        "num_train_timesteps": 1000, "flow_shift": HUB_FLOW_SHIFT[model],
    }
    return configs


def build_wan_random(model: str = "Wan2.1-T2V-1.3B", device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     text_encoder: bool = True) -> dict:
    """A Wan model's full architecture with random weights, built directly on `device`.

    For benches: time and memory do not depend on the weight values. Parameters are made
    in `dtype` (the text encoder alone is 5.7 B parameters: 11 GB in bfloat16); the VAE
    stays float32 as Wan runs it. `device="meta"` builds shapes only (counting parameters).
    Returns the components keyed as WanPipeline's arguments (tokenizer: the byte T5 one).
    """
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
        WanVACETransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    configs = wan_full_configs(model)
    network = (WanVACETransformer3DModel if "vace_layers" in configs["transformer"]
               else WanTransformer3DModel)
    previous_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**configs["vae"])
        torch.set_default_dtype(dtype)
        try:
            transformer = network(**configs["transformer"])
            encoder = UMT5EncoderModel(UMT5Config(**configs["text_encoder"])) if text_encoder else None
        finally:
            torch.set_default_dtype(previous_dtype)
    return {
        "transformer": transformer.eval(), "vae": vae.eval(),
        "text_encoder": encoder.eval() if encoder is not None else None,
        "tokenizer": build_byte_t5_tokenizer(),
        "scheduler": UniPCMultistepScheduler(**configs["scheduler"]),
        "expand_timesteps": configs["expand_timesteps"],
    }
