"""The engine on the tiny random model: taps, guidance, inversion, cache, progress, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backend.engine import Engine, Procedure, load_engine
from backend.errors import BadClipError, BadSettingsError, JobCancelled, OutOfMemoryError
from backend.features import TAP_NAMES, checkpointed_blocks, tap_modules, truncated_smm
from backend.guidance import pairwise_smm_loss
from shared.settings import TransferSettings
from tests.conftest import SMALL_SETTINGS, moving_square_frames


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def small(**overrides) -> TransferSettings:
    return TransferSettings(**{"prompt": "a red train", "seed": 7, **SMALL_SETTINGS, **overrides})


def test_taps_are_the_three_up_block_1_modules_with_smm_shapes(engine):
    unet = engine.components.unet
    block = unet.up_blocks[1]
    modules = tap_modules(unet)
    assert modules["upsampler"] is block.upsamplers[0]
    assert modules["resnet_conv2"] is block.resnets[1].conv2
    assert modules["temporal_conv"] is block.temp_convs[1]
    assert type(block).__name__ == "CrossAttnUpBlock3D"

    later_blocks_ran = []
    handle = unet.up_blocks[2].register_forward_hook(lambda *_: later_blocks_ran.append(True))
    try:
        latents = torch.randn(1, 4, 3, 8, 8)
        taps = truncated_smm(unet, latents, 500, engine._embed(["a cat"]))
    finally:
        handle.remove()
    assert later_blocks_ran == []  # the pass stopped after up_blocks[1]
    width = block.resnets[1].conv2.out_channels
    assert [tuple(t.shape) for t in taps] == [(1, 3, width)] * len(TAP_NAMES)


def test_guidance_lowers_the_loss(engine):
    unet = engine.components.unet
    text = engine._embed(["a red train"])
    torch.manual_seed(0)
    source = [tap[0] for tap in truncated_smm(unet, torch.randn(1, 4, 4, 8, 8), 900, text)]
    x = torch.randn(1, 4, 4, 8, 8, requires_grad=True)
    optimizer = torch.optim.Adam([x], lr=0.05)
    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        taps = truncated_smm(unet, x, 900, text)
        loss = sum(pairwise_smm_loss(s, t[0]) for s, t in zip(source, taps, strict=True))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradient(engine):
    unet = engine.components.unet
    text = engine._embed(["a dog"])
    latents = torch.randn(1, 4, 3, 8, 8)
    gradients = []
    for enabled in (False, True):
        x = latents.clone().requires_grad_(True)
        with checkpointed_blocks(unet, enabled), torch.enable_grad():
            sum(t.sum() for t in truncated_smm(unet, x, 700, text)).backward()
        gradients.append(x.grad)
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)
    assert "forward" not in vars(unet.down_blocks[0])  # the wrapper is removed afterwards


def test_inversion_then_unguided_sampling_reconstructs_the_source(engine):
    """DDIM inversion followed by plain DDIM sampling (same prompt, no CFG, no guidance,
    no restart, no low-pass) comes back near z₀. A random UNet's noise estimate is rough,
    so "near" is measured against the same sampler started from fresh noise."""
    plain = {"steps": 10, "inversion_steps": 10, "guided_steps": 0, "restart": False,
             "cfg_scale": 1.0, "source_prompt": "a yellow square", "prompt": "a yellow square"}
    frames = moving_square_frames(4, 64, 64)
    source, _ = engine._source_state(frames, small(**plain), Procedure(use_cache=False), _no_report())
    z0 = source.source_latent

    reconstructed = engine._sample(source, small(**plain, lowfreq_factor=1), 0, Procedure(), _no_report())
    # lowfreq_factor=8 on an 8×8 latent keeps only the mean: almost all fresh noise.
    from_noise = engine._sample(source, small(**plain, lowfreq_factor=8), 0, Procedure(), _no_report())
    reconstruction_error = (reconstructed - z0).abs().mean()
    noise_error = (from_noise - z0).abs().mean()
    assert reconstruction_error < 0.2 * noise_error


def test_cache_hit_runs_no_inversion_or_source_feature_passes(engine):
    frames = moving_square_frames(6, 80, 64)
    first = engine.transfer(frames, small(prompt="a blue bus"))
    assert first.metadata["inversion_from_cache"] is False
    engine.unet_passes.clear()
    second = engine.transfer(frames, small(prompt="a horse", seed=9))
    assert second.metadata["inversion_from_cache"] is True
    assert engine.unet_passes["invert", "full"] == 0
    assert engine.unet_passes["features", "truncated"] == 0
    assert engine.unet_passes["sample", "full"] > 0
    # A different source prompt is a different inversion.
    third = engine.transfer(frames, small(prompt="a horse", source_prompt="a square"))
    assert third.metadata["inversion_from_cache"] is False


def test_result_shape_sidecar_and_seed(engine):
    frames = moving_square_frames(8, 96, 64)
    result = engine.transfer(frames, small(seed=None, output_frames=10))
    assert result.frames.shape == (10, 64, 64, 3) and result.frames.dtype == np.uint8
    meta = result.metadata
    assert isinstance(meta["seed"], int)
    assert meta["settings"]["prompt"] == "a red train"
    assert meta["input_frame_indices"] == [0, 2, 5, 7]
    assert set(meta["timings_s"]) == {"encode_invert", "sample", "decode"}
    again = engine.transfer(frames, small(seed=meta["seed"], output_frames=10))
    assert np.abs(again.frames.astype(int) - result.frames.astype(int)).max() <= 1


def test_progress_phases_in_order_and_cancel_between_steps(engine):
    frames = moving_square_frames(4, 64, 64)
    events = []
    engine.transfer(frames, small(prompt="a cow", seed=1), progress=lambda *e: events.append(e))
    phases = list(dict.fromkeys(phase for phase, _, _ in events))
    assert phases == ["encode", "invert", "features", "sample", "decode"]
    assert ("sample", 3, 3) in events

    seen = []
    def cancel_once_sampling_starts():
        return any(e[0] == "sample" for e in seen)
    with pytest.raises(JobCancelled):
        engine.transfer(frames, small(prompt="a goat", seed=1), progress=lambda *e: seen.append(e),
                        cancelled=cancel_once_sampling_starts)
    assert [e for e in seen if e[0] == "sample"] == [("sample", 0, 3)]


def test_reference_procedure_matches_with_full_passes(engine):
    frames = moving_square_frames(4, 64, 64)
    ours = engine.transfer(frames, small(prompt="a cat", seed=3), procedure=Procedure(use_cache=False))
    engine.unet_passes.clear()
    reference = engine.transfer(frames, small(prompt="a cat", seed=3), procedure=Procedure(
        use_cache=False, truncate_guidance=False, cache_source_features=False))
    assert engine.unet_passes["guide", "full"] == 2 and engine.unet_passes["guide", "truncated"] == 0
    assert np.abs(ours.frames.astype(int) - reference.frames.astype(int)).max() <= 2


def test_inversion_grid_must_contain_the_sampling_timesteps(engine):
    with pytest.raises(BadSettingsError, match="multiple of 3"):
        engine.transfer(moving_square_frames(4, 64, 64), small(inversion_steps=4))


def _no_report():
    from backend.engine import _Reporter

    return _Reporter(None, None)


def test_out_of_gpu_memory_is_one_sentence_naming_what_helps(engine, monkeypatch):
    # No GPU here: make the UNet fail the way a full CUDA device does.
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.components.unet, "forward", exhausted)
    with pytest.raises(OutOfMemoryError, match="--gradient-checkpointing, fewer --frames"):
        engine.transfer(moving_square_frames(4, 64, 64), small(prompt="an ox", source_prompt="oom"))


def test_check_settings_refuses_before_any_work(engine):
    with pytest.raises(BadSettingsError, match="low-frequency"):
        engine.check_settings(small(lowfreq_factor=16), clip_length=8)
    with pytest.raises(BadClipError, match="has 3 frames but 4 are needed"):
        engine.check_settings(small(), clip_length=3)
    engine.check_settings(small(), clip_length=4)
