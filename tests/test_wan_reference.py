"""The WanPipeline reference runs on the tiny Wan, and an Euler loop written with the
flow-matching pieces equals it bit for bit (what the Wan backbone's sampler must do)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from backend.backbones.flow_matching import euler_step, sampling_sigmas, sampling_timesteps
from backend.backbones.wan_tiny import save_tiny_wan
from tests.wan_reference import wan_initial_latents, wan_pipeline_video

SETTINGS = dict(prompt="a red fox runs through snow", negative_prompt="blurry, static", steps=3,
                shift=3.0, guidance=5.0, width=96, height=64, frames=9, max_sequence_length=32)


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    return save_tiny_wan(tmp_path_factory.mktemp("wan") / "tiny-wan", seed=0)


def test_initial_latents_have_wans_shape_and_follow_the_seed():
    latents = wan_initial_latents(7, width=96, height=64, frames=9)
    assert latents.shape == (1, 16, 3, 8, 12)
    assert torch.equal(latents, torch.randn((1, 16, 3, 8, 12), generator=torch.Generator("cpu").manual_seed(7)))
    assert wan_initial_latents(7, width=96, height=64, frames=9, channels=48, spatial_factor=16).shape == (
        1, 48, 3, 4, 6)


def test_reference_runs_on_the_tiny_wan_and_is_determined_by_the_latent(tiny_wan):
    latents = wan_initial_latents(0, width=96, height=64, frames=9)
    video = wan_pipeline_video(tiny_wan, latents=latents, **SETTINGS)
    assert video.shape == (9, 64, 96, 3) and video.dtype == "float32"
    assert 0.0 <= video.min() and video.max() <= 1.0
    assert (wan_pipeline_video(tiny_wan, latents=latents, **SETTINGS) == video).all()
    channels_first = wan_pipeline_video(tiny_wan, latents=latents, output_type="pt", **SETTINGS)
    assert channels_first.shape == (9, 3, 64, 96)
    other = wan_initial_latents(1, width=96, height=64, frames=9)
    assert not (wan_pipeline_video(tiny_wan, latents=other, **SETTINGS) == video).all()


def test_an_euler_loop_of_the_flow_matching_pieces_equals_the_pipeline(tiny_wan):
    """Prompts embedded by the pipeline; timesteps t = σ·1000; CFG v_u + g·(v_c − v_u);
    x ← x + (σ' − σ)·v. The final latent is the pipeline's, bit for bit."""
    latents = wan_initial_latents(0, width=96, height=64, frames=9)
    expected = wan_pipeline_video(tiny_wan, latents=latents, output_type="latent", **SETTINGS)
    changed_shift = wan_pipeline_video(tiny_wan, latents=latents, output_type="latent",
                                       **{**SETTINGS, "shift": 7.0})
    assert not (changed_shift == expected).all()  # the shift reaches the sampler

    pipe = WanPipeline.from_pretrained(tiny_wan)
    with torch.no_grad():
        positive, negative = pipe.encode_prompt(SETTINGS["prompt"], SETTINGS["negative_prompt"],
                                                max_sequence_length=SETTINGS["max_sequence_length"])
        sigmas = sampling_sigmas(SETTINGS["steps"], SETTINGS["shift"])
        sample = latents.clone()
        for index, timestep in enumerate(sampling_timesteps(sigmas)):
            batch_timestep = timestep.expand(sample.shape[0])
            conditional = pipe.transformer(sample, batch_timestep, positive, return_dict=False)[0]
            unconditional = pipe.transformer(sample, batch_timestep, negative, return_dict=False)[0]
            velocity = unconditional + SETTINGS["guidance"] * (conditional - unconditional)
            sample = euler_step(sample, velocity, sigmas[index], sigmas[index + 1])
    assert torch.equal(sample[0], torch.from_numpy(expected))
