"""The backbone contract, run against every backbone (ZeroScope and Wan, tiny random
models loaded from diffusers layout through the real from_pretrained path), and the
equality of a plain edit with diffusers' own text-to-video pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.backbones.base import Backbone
from backend.backbones.loading import load_backbone
from backend.errors import BadSettingsError, ModelNotFoundError
from backend.method.engine import Engine
from shared.settings import TransferSettings
from tests.conftest import moving_square_frames

BACKBONES = ("zeroscope", "wan")
# Inversion then regeneration must come closer to the source as the step count grows.
# The tiny random UNet's DDIM flow is rough at few steps (its error is not monotone below
# 16 steps), so ZeroScope is compared from 16 steps; Wan's Euler flow from 4.
RECONSTRUCTION_STEPS = {"zeroscope": (16, 32), "wan": (4, 16)}
CLIP_FRAMES = {"zeroscope": 2, "wan": 5}  # Wan: 4k + 1 frames, two latent frames


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request, tiny_model_dir, tiny_wan_dir) -> tuple[str, Backbone]:
    folder = tiny_model_dir if request.param == "zeroscope" else tiny_wan_dir
    return request.param, load_backbone(str(folder), device="cpu")


def test_the_folders_model_index_picks_the_backbone(backbone):
    name, loaded = backbone
    assert loaded.facts.name == name
    assert loaded.facts.side_multiple % loaded.latent_cell == 0


def test_shapes_of_encode_decode_embed_predict_and_taps(backbone):
    name, b = backbone
    frames = CLIP_FRAMES[name] * 2 + 1  # 5 (ZeroScope) and 11 (Wan: padded to 13)
    padded = b.model_frames(frames)
    assert padded == {"zeroscope": 5, "wan": 13}[name]
    latent_frames = b.latent_frames(padded)
    assert latent_frames == {"zeroscope": 5, "wan": 4}[name]
    clip = moving_square_frames(padded, 64, 32)
    z0 = b.encode(clip, 4)
    cell = b.latent_cell
    assert z0.shape == (1, b.latent_channels, latent_frames, 32 // cell, 64 // cell)
    decoded = np.concatenate([decode() for decode in b.decode_slices(z0, 4)])
    assert decoded.shape == (padded, 32, 64, 3) and decoded.dtype == np.uint8
    embedding = b.embed(["a red train", "a dog"])
    assert embedding.shape[0] == 2 and embedding.ndim == 3
    t = b.schedule.timesteps(10)[3]
    with torch.no_grad():
        out = b.predict(z0, t, embedding[:1])
        taps = b.taps(z0, t, embedding[:1], truncated=True)
    assert out.shape == z0.shape
    assert len(taps) == len(b.tap_names)
    assert all(tap.shape[:2] == (1, latent_frames) and tap.dtype == torch.float32 for tap in taps)


def test_truncated_taps_equal_the_full_pass_taps_and_stop_the_model(backbone):
    name, b = backbone
    latent = torch.randn(1, b.latent_channels, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    text = b.embed(["a red train"])
    t = b.schedule.timesteps(10)[2]
    after = b.unet.up_blocks[2] if name == "zeroscope" else b.transformer.proj_out
    later_ran = []
    handle = after.register_forward_hook(lambda *_: later_ran.append(True))
    try:
        with torch.no_grad():
            truncated = b.taps(latent, t, text, truncated=True)
            assert later_ran == []  # the model stopped after the taps
            full = b.taps(latent, t, text, truncated=False)
            assert later_ran == [True]
    finally:
        handle.remove()
    for short, whole in zip(truncated, full, strict=True):
        assert torch.equal(short, whole)


def test_truncated_taps_carry_gradients_and_checkpointing_gives_the_same_ones(backbone):
    _, b = backbone
    latent = torch.randn(1, b.latent_channels, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    text = b.embed(["a dog"])
    t = b.schedule.timesteps(10)[1]
    gradients = []
    for enabled in (False, True):
        x = latent.clone().requires_grad_(True)
        with b.checkpointing(enabled), torch.enable_grad():
            sum(tap.sum() for tap in b.taps(x, t, text, truncated=True)).backward()
        gradients.append(x.grad)
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)


def test_inversion_then_regeneration_reconstructs_better_as_the_steps_grow(backbone):
    """Invert z₀ with the source prompt, then sample it back with the same prompt (no CFG,
    no guidance, no restart, starting from the inverted noise): the error to z₀ shrinks
    as the step count grows, and is well below the source's own size at the finer grid."""
    name, b = backbone
    z0 = b.encode(moving_square_frames(CLIP_FRAMES[name], 32, 32), 4)
    text = b.embed(["a yellow square"])
    errors = []
    for steps in RECONSTRUCTION_STEPS[name]:
        with torch.no_grad():
            _, top, noisiest = b.schedule.invert(lambda x, t: b.predict(x, t, text), z0, steps, steps)
            x = b.schedule.start_latent(z0, noisiest, top, b.schedule.timesteps(steps)[0])
            for index, t in enumerate(b.schedule.timesteps(steps)):
                x = b.schedule.step(b.predict(x, t, text), steps, index, x)
        errors.append(float((x - z0).abs().mean()))
    assert errors[1] < 0.85 * errors[0]


def test_a_wan_edit_of_a_length_that_is_not_4k_plus_1_returns_every_frame(tiny_wan_dir):
    engine = Engine(load_backbone(str(tiny_wan_dir), device="cpu"))
    settings = TransferSettings(prompt="a red train", seed=3, num_frames=7, width=64, height=64,
                                steps=2, inversion_steps=2, guided_steps=1, guidance_iterations=1)
    result = engine.transfer(moving_square_frames(7, 64, 64), settings)
    assert result.frames.shape == (7, 64, 64, 3)  # padded to 9, decoded, the extra two dropped
    assert result.sidecar.backbone == "wan"
    assert result.sidecar.windows == [[0, 3]]  # latent frames: (9 − 1)/4 + 1
    assert result.sidecar.settings["cfg_scale"] == 5.0  # Wan's default, recorded


def test_wan_refuses_sides_off_its_16_px_grid_and_a_block_it_does_not_have(tiny_wan_dir):
    engine = Engine(load_backbone(str(tiny_wan_dir), device="cpu"))
    settings = dict(prompt="a train", width=72, height=64)
    with pytest.raises(BadSettingsError, match="multiples of 16"):
        engine.check_settings(TransferSettings(**settings), 5)
    with pytest.raises(BadSettingsError, match="'guidance_block' is 9; this Wan model has 4 blocks"):
        engine.check_settings(TransferSettings(prompt="a train", width=64, height=64,
                                               guidance_block=9), 5)


def test_zeroscope_refuses_a_guidance_block(tiny_model_dir):
    engine = Engine(load_backbone(str(tiny_model_dir), device="cpu"))
    with pytest.raises(BadSettingsError, match="feature taps are fixed"):
        engine.check_settings(TransferSettings(prompt="a train", width=64, height=64,
                                               guidance_block=1), 5)


def test_missing_wan_weights_are_one_sentence_naming_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"^The weights of 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers' "
                                                 r"are not on this machine[^.]*`hf download "
                                                 r"Wan-AI/Wan2.1-T2V-1.3B-Diffusers`[^.]*\.$"):
        load_backbone("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", device="cpu")


# ---------------------------------------------------------------- equality with diffusers


def plain_sampling(engine: Engine, prompt: str, **overrides) -> TransferSettings:
    """`--iterations 0 --no-restart --init noise --prompt-prefix ""`: plain text-to-video."""
    return engine.resolve(TransferSettings(
        prompt=prompt, seed=11, guidance_iterations=0, restart=False, init="noise",
        prompt_prefix="", **overrides))


def final_latent(engine: Engine, clip: np.ndarray, settings: TransferSettings,
                 monkeypatch) -> tuple[torch.Tensor, np.ndarray]:
    """The latent the edit decodes, and the edit's frames."""
    latents = []
    original = engine.decode
    monkeypatch.setattr(engine, "decode", lambda latent, *a, **k: latents.append(latent) or original(latent, *a, **k))
    result = engine.transfer(clip, settings)
    return latents[0], result.frames


@pytest.fixture(scope="module")
def tiny_ti2v_dir(tmp_path_factory):
    """A tiny random Wan 2.2 TI2V (expand_timesteps, 48-channel latents, 16 px cells)."""
    from backend.backbones.wan_tiny import save_tiny_wan

    return save_tiny_wan(tmp_path_factory.mktemp("tiny-ti2v"), variant="ti2v")


@pytest.mark.parametrize("variant", ["t2v", "ti2v"])
def test_a_plain_wan_edit_equals_diffusers_wan_pipeline(variant, tiny_wan_dir, tiny_ti2v_dir,
                                                        monkeypatch):
    from tests.wan_reference import wan_initial_latents, wan_pipeline_video

    folder = tiny_wan_dir if variant == "t2v" else tiny_ti2v_dir
    engine = Engine(load_backbone(str(folder), device="cpu"))
    settings = plain_sampling(engine, "a red train on a bridge", num_frames=9, width=64, height=64,
                              steps=4, inversion_steps=4)
    latent, frames = final_latent(engine, moving_square_frames(9, 64, 64), settings, monkeypatch)
    b = engine.backbone
    initial = wan_initial_latents(11, 64, 64, 9, channels=b.latent_channels,
                                  spatial_factor=b.latent_cell)
    reference = dict(folder=folder, prompt="a red train on a bridge",
                     negative_prompt=settings.negative_prompt, steps=4, shift=engine.backbone.schedule.shift,
                     guidance=settings.cfg_scale, width=64, height=64, frames=9, latents=initial)
    expected = torch.from_numpy(wan_pipeline_video(**reference, output_type="latent"))
    assert torch.equal(latent[0], expected)
    video = wan_pipeline_video(**reference, output_type="np")
    assert np.abs(frames.astype(np.float64) - video * 255).max() <= 0.5 + 1e-3


def test_a_plain_zeroscope_edit_equals_diffusers_text_to_video_pipeline(tiny_model_dir, monkeypatch):
    from diffusers import TextToVideoSDPipeline

    engine = Engine(load_backbone(str(tiny_model_dir), device="cpu"))
    settings = plain_sampling(engine, "a red train on a bridge", num_frames=4, width=64, height=64,
                              steps=4, inversion_steps=4)
    latent, frames = final_latent(engine, moving_square_frames(4, 64, 64), settings, monkeypatch)
    b = engine.backbone
    shape = (1, 4, 4, 64 // 8, 64 // 8)
    initial = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(11))
    pipe = TextToVideoSDPipeline(vae=b.vae, text_encoder=b.text_encoder, tokenizer=b.tokenizer,
                                 unet=b.unet, scheduler=b.scheduler)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a red train on a bridge", negative_prompt=settings.negative_prompt,
                    num_inference_steps=4, guidance_scale=settings.cfg_scale, height=64, width=64,
                    num_frames=4, latents=initial.clone(), output_type="latent").frames
    assert torch.equal(latent, expected)
    video = pipe(prompt="a red train on a bridge", negative_prompt=settings.negative_prompt,
                 num_inference_steps=4, guidance_scale=settings.cfg_scale, height=64, width=64,
                 num_frames=4, latents=initial.clone(), output_type="np").frames[0]
    assert np.abs(frames.astype(np.float64) - np.asarray(video) * 255).max() <= 0.5 + 1e-3


NOISE_STD = {  # the forward process's noise level at a timestep, for a clean latent of zeros
    "zeroscope": lambda b, t: float((1 - b.scheduler.alphas_cumprod[t]) ** 0.5),
    "wan": lambda b, t: b.schedule.sigma_of(t),
}


def test_restart_re_noises_the_next_level_back_to_the_steps_own(backbone):
    """From the level after step i (a clean latent of zeros at that noise level), a restart
    gives a latent with the noise level of step i's timestep."""
    name, b = backbone
    steps, index = 10, 7
    timesteps = b.schedule.timesteps(steps)
    noise = torch.randn(1, 4, 8, 64, 64, generator=torch.Generator().manual_seed(5))
    latent = NOISE_STD[name](b, timesteps[index + 1]) * noise
    restarted = b.schedule.restart(latent, steps, index, torch.Generator().manual_seed(6))
    assert float(restarted.std()) == pytest.approx(NOISE_STD[name](b, timesteps[index]), rel=0.02)
    assert float(latent.std()) < 0.8 * float(restarted.std())  # it did move up a level


def test_wan_guides_the_block_its_setting_names_and_stops_after_it(tiny_wan_dir):
    engine = Engine(load_backbone(str(tiny_wan_dir), device="cpu"))
    b = engine.backbone
    assert engine.resolve(TransferSettings(prompt="x")).guidance_block == 4 * 14 // 30 == 1
    latent = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    text, t = b.embed(["a dog"]), b.schedule.timesteps(10)[0]
    ran = []
    hooks = [block.register_forward_hook(lambda *_, index=index: ran.append(index))
             for index, block in enumerate(b.transformer.blocks)]
    try:
        taps = {}
        for block in (1, 2):
            ran.clear()
            b.use_settings(engine.resolve(TransferSettings(prompt="x", guidance_block=block)))
            with torch.no_grad():
                taps[block] = b.taps(latent, t, text, truncated=True)[0]
            assert ran == list(range(block + 1))
    finally:
        for hook in hooks:
            hook.remove()
    assert not torch.equal(taps[1], taps[2])


def test_the_zeroscope_upscaler_is_refused_after_wan(tiny_wan_dir):
    from backend.edit import load_engine

    engine = load_engine(str(tiny_wan_dir), device="cpu", upscale_model="tiny")
    with pytest.raises(BadSettingsError, match=r"^The upscaler \(zeroscope\) runs only after its own "
                                               r"backbone, not after wan; set upscale to 'none'\.$"):
        engine.check_settings(TransferSettings(prompt="a train", width=64, height=64,
                                               upscale="xl"), 5)
