"""The tiny random Wan saves in diffusers layout and loads through the real from_pretrained path."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import AutoTokenizer, UMT5EncoderModel

from backend.backbones.wan_tiny import (
    WAN_FULL_MODELS,
    build_byte_t5_tokenizer,
    build_tiny_wan,
    build_wan_random,
    save_tiny_wan,
    wan_full_configs,
)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan", seed=0)


def generate(pipe: WanPipeline, seed: int = 0, **overrides):
    arguments = dict(prompt="a red fox runs through snow", negative_prompt="blurry", num_frames=9,
                     width=96, height=64, num_inference_steps=2, guidance_scale=5.0,
                     max_sequence_length=32, generator=torch.Generator("cpu").manual_seed(seed),
                     output_type="np")
    arguments.update(overrides)
    return pipe(**arguments).frames


def states_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    left, right = first.state_dict(), second.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[key], right[key]) for key in left)


def test_the_folder_has_the_diffusers_layout(tiny_wan):
    index = json.loads((tiny_wan / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index["expand_timesteps"] is False
    for part in ("transformer", "vae", "text_encoder"):
        assert any(path.suffix == ".safetensors" for path in (tiny_wan / part).iterdir())
    scheduler = json.loads((tiny_wan / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["use_flow_sigmas"], scheduler["flow_shift"]) == (
        "flow_prediction", True, 3.0)


def test_each_component_loads_with_its_own_from_pretrained_and_equals_the_built_one(tiny_wan):
    built = build_tiny_wan(seed=0)
    transformer = WanTransformer3DModel.from_pretrained(tiny_wan, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(tiny_wan, subfolder="vae")
    text_encoder = UMT5EncoderModel.from_pretrained(tiny_wan, subfolder="text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(tiny_wan, subfolder="tokenizer")
    scheduler = UniPCMultistepScheduler.from_pretrained(tiny_wan, subfolder="scheduler")
    assert states_equal(transformer, built["transformer"])
    assert states_equal(vae, built["vae"])
    assert states_equal(text_encoder, built["text_encoder"])
    assert transformer.config.num_layers == 4 and transformer.config.num_attention_heads == 2
    assert transformer.config.attention_head_dim == 12 and transformer.config.text_dim == 24
    assert vae.config.z_dim == 16 and vae.config.scale_factor_spatial == 8
    assert scheduler.config.flow_shift == 3.0
    assert tokenizer("ab")["input_ids"] == build_byte_t5_tokenizer()("ab")["input_ids"]


def test_the_tokenizer_is_t5_style_eos_then_pad_on_the_right():
    tokenizer = build_byte_t5_tokenizer()
    encoded = tokenizer("ab", padding="max_length", max_length=6, truncation=True)
    assert encoded["input_ids"][2:] == [1, 0, 0, 0]  # </s> = 1 after the two bytes, <pad> = 0
    assert encoded["attention_mask"] == [1, 1, 1, 0, 0, 0]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.decode(tokenizer("ünï code")["input_ids"], skip_special_tokens=True) == "ünï code"


def test_wan_pipeline_loads_the_folder_and_generates_nine_frames_deterministically(tiny_wan):
    pipe = WanPipeline.from_pretrained(tiny_wan)
    pipe.set_progress_bar_config(disable=True)
    frames = generate(pipe)
    assert frames.shape == (1, 9, 64, 96, 3)
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert (generate(pipe) == frames).all()
    assert not (generate(pipe, seed=1) == frames).all()


def test_the_same_seed_builds_the_same_model_and_another_seed_another():
    first, again, other = build_tiny_wan(seed=5), build_tiny_wan(seed=5), build_tiny_wan(seed=6)
    for part in ("transformer", "vae", "text_encoder"):
        assert states_equal(first[part], again[part])
        assert not states_equal(first[part], other[part])


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_wan(seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_the_ti2v_variant_has_wan22_geometry_and_generates(tmp_path):
    folder = save_tiny_wan(tmp_path / "tiny-ti2v", seed=0, variant="ti2v")
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.expand_timesteps is True
    assert pipe.vae.config.z_dim == 48 and pipe.vae_scale_factor_spatial == 16
    assert pipe.transformer.config.in_channels == 48
    assert generate(pipe).shape == (1, 9, 64, 96, 3)


def test_an_unknown_variant_or_model_says_which_exist():
    with pytest.raises(ValueError, match="t2v, ti2v"):
        build_tiny_wan(variant="i2v")
    with pytest.raises(ValueError, match="Wan2.1-T2V-1.3B"):
        wan_full_configs("Wan3")


def test_full_configs_are_the_published_architectures():
    small = wan_full_configs("Wan2.1-T2V-1.3B")
    assert small["transformer"]["num_layers"] == 30 and small["transformer"]["num_attention_heads"] == 12
    assert small["transformer"]["ffn_dim"] == 8960 and small["transformer"]["text_dim"] == 4096
    assert small["scheduler"]["flow_shift"] == 3.0 and small["expand_timesteps"] is False
    assert small["text_encoder"]["d_model"] == 4096 and small["text_encoder"]["num_layers"] == 24
    five = wan_full_configs("Wan2.2-TI2V-5B")
    assert five["vae"]["z_dim"] == 48 and five["vae"]["scale_factor_spatial"] == 16
    assert five["expand_timesteps"] is True and five["scheduler"]["flow_shift"] == 5.0
    small["transformer"]["num_layers"] = 1  # a copy: the next call is unchanged
    assert wan_full_configs("Wan2.1-T2V-1.3B")["transformer"]["num_layers"] == 30


# VACE: the T2V transformer plus its context blocks (15 of the 1.3B's width, 8 of the 14B's).
@pytest.mark.parametrize("model, billions", [("Wan2.1-T2V-1.3B", (1.3, 1.5)), ("Wan2.1-T2V-14B", (13.5, 15.0)),
                                             ("Wan2.2-TI2V-5B", (4.8, 5.2)),
                                             ("Wan2.1-VACE-1.3B", (2.1, 2.2)),
                                             ("Wan2.1-VACE-14B", (17.2, 17.4))])
def test_full_configs_build_to_their_parameter_counts_on_the_meta_device(model, billions):
    """Shapes only (nothing is allocated): the transformer's size is its name's."""
    components = build_wan_random(model, device="meta", text_encoder=model == "Wan2.1-T2V-1.3B")
    count = sum(parameter.numel() for parameter in components["transformer"].parameters()) / 1e9
    assert billions[0] < count < billions[1]
    if components["text_encoder"] is not None:  # UMT5-XXL's encoder: 5.7 B
        encoder = sum(parameter.numel() for parameter in components["text_encoder"].parameters()) / 1e9
        assert 5.6 < encoder < 5.8
    assert next(components["transformer"].parameters()).dtype == torch.bfloat16
    assert next(components["vae"].parameters()).dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32
    assert list(WAN_FULL_MODELS) == ["Wan2.1-T2V-1.3B", "Wan2.1-T2V-14B", "Wan2.2-TI2V-5B",
                                     "Wan2.1-VACE-1.3B", "Wan2.1-VACE-14B"]
