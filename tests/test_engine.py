"""The engine on the tiny random model: taps, guidance, inversion, cache, progress, cancel."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from backend.backbones.zeroscope_taps import (
    TAP_NAMES,
    tap_modules,
    truncated_smm,
)
from backend.edit import load_engine
from backend.errors import BadClipError, BadSettingsError, JobCancelled, OutOfMemoryError
from backend.method.engine import Engine, Procedure
from backend.results import Take
from shared.settings import TransferSettings
from shared.sidecar import Sidecar
from tests.conftest import SMALL_SETTINGS, moving_square_frames


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def small(**overrides) -> TransferSettings:
    return TransferSettings(**{"prompt": "a red train", "seed": 7, **SMALL_SETTINGS, **overrides})


def resolved(engine: Engine, **overrides) -> TransferSettings:
    """small(), with the model's settings filled in (for calls below transfer)."""
    return engine.resolve(small(**overrides))


def test_taps_are_the_three_up_block_1_modules_with_smm_shapes(engine):
    unet = engine.backbone.unet
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
        taps = truncated_smm(unet, latents, 500, engine.embed(["a cat"]))
    finally:
        handle.remove()
    assert later_blocks_ran == []  # the pass stopped after up_blocks[1]
    width = block.resnets[1].conv2.out_channels
    assert [tuple(t.shape) for t in taps] == [(1, 3, width)] * len(TAP_NAMES)


def guidance_problem(engine, frames: int, windows):
    """A fixed latent and source features per window, at one guided timestep."""
    unet = engine.backbone.unet
    text = engine.embed(["a red train"])
    generator = torch.Generator().manual_seed(0)
    source_latent = torch.randn(1, 4, frames, 8, 8, generator=generator)
    latent = torch.randn(1, 4, frames, 8, 8, generator=generator)
    source = [[tap[0] for tap in truncated_smm(unet, source_latent[:, :, s:e], 900, text)]
              for s, e in windows]
    return latent, text, source


@pytest.mark.parametrize("frames, windows", [(4, [(0, 4)]), (6, [(0, 4), (2, 6)])])
def test_the_engines_guidance_step_lowers_the_pairwise_smm_loss(engine, frames, windows):
    latent, text, source = guidance_problem(engine, frames, windows)
    settings = resolved(engine, guidance_iterations=10)
    before = engine.guidance_loss(latent, 900, text, source, windows)
    guided = engine.guide(latent, 900, text, source, windows, 0.05, settings, _no_report())
    after = engine.guidance_loss(guided, 900, text, source, windows)
    assert not torch.equal(guided, latent) and torch.equal(latent, latent.clone())
    assert after < before - 0.1 * (before - 3 * len(windows) / 4)  # 3 taps × 1/F: the floor


def test_gradient_checkpointing_gives_the_same_gradient(engine):
    unet = engine.backbone.unet
    text = engine.embed(["a dog"])
    latents = torch.randn(1, 4, 3, 8, 8)
    gradients = []
    for enabled in (False, True):
        x = latents.clone().requires_grad_(True)
        with engine.backbone.checkpointing(enabled), torch.enable_grad():
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
    one = [(0, 4)]
    embeddings = engine.embed_prompts(small(**plain), procedure=Procedure(use_cache=False))
    source, _ = engine._source_state(frames, one, small(**plain), Procedure(use_cache=False), _no_report(),
                                     embeddings.source)
    z0 = source.source_latent

    take = [Take("a yellow square", 0)]
    reconstructed = engine._sample(source, one, small(**plain, lowfreq_factor=1), take, Procedure(),
                                   _no_report(), embeddings)
    # lowfreq_factor=8 on an 8×8 latent keeps only the mean: almost all fresh noise.
    from_noise = engine._sample(source, one, small(**plain, lowfreq_factor=8), take, Procedure(),
                                _no_report(), embeddings)
    reconstruction_error = (reconstructed - z0).abs().mean()
    noise_error = (from_noise - z0).abs().mean()
    assert reconstruction_error < 0.2 * noise_error


def test_cache_hit_runs_no_inversion_or_source_feature_passes(engine):
    frames = moving_square_frames(6, 80, 64)
    first = engine.transfer(frames, small(prompt="a blue bus", source_prompt="a cache test"))
    assert first.sidecar.inversion_from_cache is False
    engine.model_passes.clear()
    second = engine.transfer(frames, small(prompt="a horse", seed=9, source_prompt="a cache test"))
    assert second.sidecar.inversion_from_cache is True
    assert engine.model_passes["invert", "full"] == 0
    assert engine.model_passes["features", "truncated"] == 0
    assert engine.model_passes["sample", "full"] > 0
    # A different source prompt is a different inversion.
    third = engine.transfer(frames, small(prompt="a horse", source_prompt="a square"))
    assert third.sidecar.inversion_from_cache is False


def test_result_shape_sidecar_and_seed(engine):
    frames = moving_square_frames(8, 96, 64)
    # guided_steps None: automatic, so the sidecar must record the count the edit used.
    result = engine.transfer(frames, small(seed=None, output_frames=10, guided_steps=None))
    # fit: 3:2 within 64×64 = 4,096 pixels is 72×48 (80×56 = 4,480 is over the budget)
    assert result.frames.shape == (10, 48, 72, 3) and result.frames.dtype == np.uint8
    meta = result.sidecar.to_dict()
    assert meta["framing"] == {"mode": "fit", "source_size": [96, 64], "crop_box": [0, 0, 96, 64],
                               "model_size": [72, 48], "upscale_size": None, "result_size": [72, 48]}
    assert meta["upscaler"] is None
    assert isinstance(meta["seed"], int)
    assert meta["settings"]["prompt"] == "a red train"
    assert meta["input_frame_indices"] == [0, 2, 5, 7]
    assert set(meta["timings_s"]) == {"embed", "encode_invert", "sample", "decode"}
    assert meta["version"] == 1 and meta["settings"]["guided_steps"] is None
    assert (meta["steps"], meta["guided_steps"]) == (3, 2)  # 3 − ⌊3·0.6⌋ guided of 3
    assert Sidecar.from_dict(json.loads(json.dumps(meta))) == result.sidecar
    again = engine.transfer(frames, small(seed=meta["seed"], output_frames=10, guided_steps=None))
    assert np.abs(again.frames.astype(int) - result.frames.astype(int)).max() <= 1


def test_progress_phases_in_order_and_cancel_between_steps(engine):
    frames = moving_square_frames(4, 64, 64)
    events = []
    engine.transfer(frames, small(prompt="a cow", seed=1, source_prompt="phases in order"),
                    progress=lambda *e: events.append(e))
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
    engine.model_passes.clear()
    reference = engine.transfer(frames, small(prompt="a cat", seed=3), procedure=Procedure(
        use_cache=False, truncate_guidance=False, cache_source_features=False))
    assert engine.model_passes["guide", "full"] == 2 and engine.model_passes["guide", "truncated"] == 0
    assert np.abs(ours.frames.astype(int) - reference.frames.astype(int)).max() <= 2


def test_inversion_grid_must_contain_the_sampling_timesteps(engine):
    with pytest.raises(BadSettingsError, match="multiple of 3"):
        engine.transfer(moving_square_frames(4, 64, 64), small(inversion_steps=4))


def _no_report():
    from backend.results import Reporter

    return Reporter(None, None)


def test_out_of_gpu_memory_is_one_sentence_naming_what_helps(engine, monkeypatch):
    # No GPU here: make the UNet fail the way a full CUDA device does.
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine.backbone.unet, "forward", exhausted)
    with pytest.raises(OutOfMemoryError, match="--gradient-checkpointing, fewer --frames"):
        engine.transfer(moving_square_frames(4, 64, 64), small(prompt="an ox", source_prompt="oom"))


def test_check_settings_refuses_before_any_work(engine):
    with pytest.raises(BadSettingsError, match="low-frequency"):
        engine.check_settings(small(lowfreq_factor=16), clip_length=8)
    with pytest.raises(BadClipError, match="has 3 frames but 4 are needed"):
        engine.check_settings(small(), clip_length=3)
    engine.check_settings(small(), clip_length=4)


# ---------------------------------------------------------------- the sampling loop's promises


def test_guided_steps_change_the_result_and_denoising_gets_the_guided_latent(engine, monkeypatch):
    frames = moving_square_frames(4, 64, 64)
    unguided = engine.transfer(frames, small(prompt="a fox", guided_steps=0))
    guide_outputs, denoise_inputs = [], []
    original_guide, original_denoise = engine.guide, engine.denoise

    def guide(*args, **kwargs):
        guide_outputs.append(original_guide(*args, **kwargs))
        return guide_outputs[-1]

    def denoise(latent, *args, **kwargs):
        denoise_inputs.append(latent)
        return original_denoise(latent, *args, **kwargs)

    monkeypatch.setattr(engine, "guide", guide)
    monkeypatch.setattr(engine, "denoise", denoise)
    guided = engine.transfer(frames, small(prompt="a fox", guided_steps=1))
    assert len(guide_outputs) == 1
    assert denoise_inputs[0] is guide_outputs[0]  # the first step denoises the guided latent
    assert not np.array_equal(guided.frames, unguided.frames)


def test_restart_costs_two_more_unet_passes_per_step_and_changes_the_result(engine):
    frames = moving_square_frames(4, 64, 64)
    results, passes = {}, {}
    for restart in (False, True):
        engine.model_passes.clear()
        results[restart] = engine.transfer(frames, small(prompt="an owl", restart=restart))
        passes[restart] = engine.model_passes["sample", "full"]
    steps = SMALL_SETTINGS["steps"]
    assert passes[False] == 2 * steps  # one CFG pair per step
    assert passes[True] == 2 * steps + 2 * (steps - 1)  # and one more after every step but the last
    assert not np.array_equal(results[True].frames, results[False].frames)


def test_seed_is_random_unless_given_and_always_recorded(engine):
    frames = moving_square_frames(4, 64, 64)
    first = engine.transfer(frames, small(prompt="a hen", seed=None))
    second = engine.transfer(frames, small(prompt="a hen", seed=None))
    assert isinstance(first.sidecar.seed, int) and isinstance(second.sidecar.seed, int)
    assert first.sidecar.seed != second.sidecar.seed
    assert not np.array_equal(first.frames, second.frames)
    replay = engine.transfer(frames, small(prompt="a hen", seed=first.sidecar.seed))
    assert np.array_equal(replay.frames, first.frames)
    assert replay.sidecar.seed == first.sidecar.seed


def test_a_clip_that_fits_one_window_takes_the_direct_path_bit_for_bit(engine, monkeypatch):
    """Windowing is invisible at ≤ 24 frames: the same frames as calling the model on the
    whole latent directly (the windows replaced by direct calls)."""
    import backend.method.engine as engine_module

    frames = moving_square_frames(6, 64, 64)
    settings = small(prompt="a lynx", num_frames=6)
    windowed = engine.transfer(frames, settings, procedure=Procedure(use_cache=False))
    assert windowed.sidecar.windows == [[0, 6]]

    def direct(run_window, latent, windows, frame_dim=2, after_window=None):
        out = run_window(latent, 0)
        if after_window is not None:
            after_window(0)
        return out

    monkeypatch.setattr(engine_module, "blend_windowed", direct)
    monkeypatch.setattr(engine_module, "window_slice", lambda tensor, window, frame_dim=2: tensor)
    plain = engine.transfer(frames, settings, procedure=Procedure(use_cache=False))
    assert np.array_equal(windowed.frames, plain.frames)


# ---------------------------------------------------------------- long clips


def test_a_long_clip_is_edited_in_windows_and_its_re_edit_hits_the_cache(engine):
    clip = np.concatenate([moving_square_frames(12, 64, 64)] * 5)  # 60 frames
    settings = small(prompt="a long train", num_frames=60, source_prompt="sixty frames")
    first = engine.transfer(clip, settings)
    assert first.frames.shape == (60, 64, 64, 3)
    assert first.sidecar.windows == [[0, 24], [12, 36], [24, 48], [36, 60]]
    assert first.sidecar.inversion_from_cache is False
    engine.model_passes.clear()
    again = engine.transfer(clip, small(prompt="a long tram", num_frames=60, source_prompt="sixty frames",
                                        seed=8))
    assert again.sidecar.inversion_from_cache is True
    assert engine.model_passes["invert", "full"] == 0
    assert engine.model_passes["features", "truncated"] == 0
    # Every model use ran per window: 4 windows × (CFG pair per step + restart pair).
    steps = SMALL_SETTINGS["steps"]
    assert engine.model_passes["sample", "full"] == 4 * (2 * steps + 2 * (steps - 1))
    assert engine.model_passes["guide", "truncated"] == 4 * SMALL_SETTINGS["guidance_iterations"]


def test_progress_counts_windows_and_cancel_stops_between_windows(engine):
    clip = np.concatenate([moving_square_frames(10, 64, 64)] * 3)  # 30 frames: 2 windows
    settings = small(prompt="a wolf", num_frames=30, source_prompt="thirty frames")
    events = []
    engine.transfer(clip, settings, progress=lambda *e: events.append(e))
    steps = SMALL_SETTINGS["steps"]
    assert [e for e in events if e[0] == "sample"] == [("sample", i, 2 * steps) for i in range(2 * steps + 1)]
    for phase, steps_of_phase in (("invert", SMALL_SETTINGS["inversion_steps"]),
                                  ("features", SMALL_SETTINGS["guided_steps"])):
        assert [e for e in events if e[0] == phase] == [
            (phase, i, 2 * steps_of_phase) for i in range(1, 2 * steps_of_phase + 1)]

    seen = []
    engine.model_passes.clear()
    with pytest.raises(JobCancelled):
        engine.transfer(clip, settings, progress=lambda *e: seen.append(e),
                        cancelled=lambda: ("sample", 1, 2 * steps) in seen)
    assert [e for e in seen if e[0] == "sample"] == [("sample", 0, 2 * steps), ("sample", 1, 2 * steps)]
    # Step 1: guidance over both windows, the CFG step over both, the restart step over
    # window 0 only; the cancel came before window 1's restart pass.
    assert engine.model_passes["sample", "full"] == 2 * 2 + 2
    assert engine.model_passes["guide", "truncated"] == 2 * SMALL_SETTINGS["guidance_iterations"]


def test_a_clip_over_the_frame_limit_is_one_sentence(engine):
    with pytest.raises(BadClipError, match=r"^250 frames is more than the limit of 240 frames per edit; "
                                           r"[^.]*--frame-limit\.$"):
        engine.check_settings(small(num_frames=250), clip_length=300)


def test_inversion_cache_keeps_the_most_recently_used_files_within_its_cap(tmp_path):
    from backend.method.inversion import InversionCache, SourceState

    def state(value: float) -> SourceState:
        latent = torch.full((1, 4, 2, 8, 8), value)
        return SourceState(latent, {1: latent}, 981, latent, {1: [[torch.zeros(2, 3)] * 3]})

    cache = InversionCache(tmp_path, max_bytes=10**9)
    cache.save("a", state(1.0))
    size = cache.path("a").stat().st_size
    cache.max_bytes = 2 * size  # room for two entries
    os.utime(cache.path("a"), (1, 1))
    cache.save("b", state(2.0))
    os.utime(cache.path("b"), (2, 2))
    loaded = cache.load("a", torch.device("cpu"))  # a hit makes "a" the most recently used
    assert loaded is not None and loaded.features[1][0][2].shape == (2, 3)
    cache.save("c", state(3.0))
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "inversion-a.safetensors", "inversion-c.safetensors"]
    cache.max_bytes = 0  # the file just written stays even alone over the cap
    cache.save("d", state(4.0))
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["inversion-d.safetensors"]


def test_guidance_scales_the_loss_before_backward_where_fp16_gradients_could_underflow(engine,
                                                                                       monkeypatch):
    """On CUDA in fp16 the loss is scaled (GradScaler) before each window's backward. The
    CPU GradScaler runs the same code: the scale is a power of two, so the step is the
    same as unscaled, and every window's loss went through the scaler."""
    windows = [(0, 4), (2, 6)]
    latent, text, source = guidance_problem(engine, 6, windows)
    settings = resolved(engine, guidance_iterations=3)
    plain = engine.guide(latent, 900, text, source, windows, 0.05, settings, _no_report())
    scaled_losses = []
    real_scaler = torch.amp.GradScaler

    class SpyScaler(real_scaler):
        def scale(self, outputs):
            scaled = super().scale(outputs)
            scaled_losses.append(scaled.item() / outputs.item())
            return scaled

    monkeypatch.setattr(torch.amp, "GradScaler", SpyScaler)
    monkeypatch.setattr(engine, "_scales_loss", lambda: True)
    scaled = engine.guide(latent, 900, text, source, windows, 0.05, settings, _no_report())
    assert len(scaled_losses) == 3 * len(windows) and min(scaled_losses) > 1000
    assert torch.allclose(scaled, plain, atol=1e-6)


# ---------------------------------------------------------------- framing and upscaling


def spy(monkeypatch, target, name: str, record: list) -> None:
    """Record every return value of target.<name> (a bound method) in `record`."""
    original = getattr(target, name)

    def recorded(*args, **kwargs):
        record.append(original(*args, **kwargs))
        return record[-1]

    monkeypatch.setattr(target, name, recorded)


def spy_first_argument(monkeypatch, target, name: str, record: list) -> None:
    """Record the first argument of every call to target.<name> in `record`."""
    original = getattr(target, name)
    monkeypatch.setattr(target, name, lambda first, *rest, **kw: record.append(first) or original(first, *rest, **kw))


def test_fit_runs_a_4_3_clip_within_the_budget_at_its_own_aspect(engine, monkeypatch):
    encoded = []
    spy_first_argument(monkeypatch, engine, "encode", encoded)
    clip = moving_square_frames(4, 160, 120)  # 4:3
    # A 16:9 budget of 128×72 = 9,216 pixels (ZeroScope's 576×320: tests/test_framing.py):
    # 80 rows · 4/3 = 106.7 → 112 columns, 8,960 pixels; 88 rows would need 112 × 88 = 9,856.
    result = engine.transfer(clip, small(width=128, height=72, source_prompt="four by three"))
    width, height = result.sidecar.framing["model_size"]
    assert (width, height) == (112, 80)
    assert width * height <= 128 * 72
    assert abs(width - height * 4 / 3) <= 8 and abs(height - width * 3 / 4) <= 8  # one latent cell
    assert [frames.shape for frames in encoded] == [(4, 80, 112, 3)]  # the model ran at that size
    assert result.frames.shape == (4, 80, 112, 3)


def test_crop_edits_the_centred_box_and_records_where_it_was(engine, monkeypatch):
    from backend.video import resize_frames

    encoded = []
    spy_first_argument(monkeypatch, engine, "encode", encoded)
    clip = moving_square_frames(4, 72, 128)  # 9:16
    result = engine.transfer(clip, small(width=128, height=72, framing="crop"))
    # The 128:72 band of a 72-wide frame: round(72·72/128) = 40 rows, from row (128 − 40)/2 = 44.
    assert result.sidecar.framing["crop_box"] == [0, 44, 72, 84]
    assert np.array_equal(encoded[0], resize_frames(clip[:, 44:84], 128, 72))
    assert result.frames.shape == (4, 72, 128, 3)


@pytest.fixture(scope="module")
def upscaling(tmp_path_factory) -> tuple[Engine, str]:
    """The tiny model with a second tiny model (another seed) as its upscaler, loaded
    from diffusers layout through the upscaler's real loading code."""
    from backend.backbones.zeroscope import save_tiny_model

    folder = tmp_path_factory.mktemp("tiny-xl")
    save_tiny_model(folder, seed=1)
    return load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"),
                       upscale_model=str(folder)), str(folder)


def test_upscaling_doubles_the_size_keeps_the_frame_count_and_starts_from_the_first_stage(
        upscaling, monkeypatch):
    from backend.video import resize_frames

    engine, folder = upscaling
    first_stage, upscaler_input = [], []
    spy(monkeypatch, engine, "decode", first_stage)
    spy_first_argument(monkeypatch, engine.upscaler, "encode", upscaler_input)
    engine.upscaler.model_passes.clear()
    events = []
    settings = small(num_frames=6, upscale="xl", upscale_width=128, upscale_height=128)
    result = engine.transfer(moving_square_frames(6, 64, 64), settings, progress=lambda *e: events.append(e))

    assert first_stage[0].shape == (6, 64, 64, 3)
    assert result.frames.shape == (6, 128, 128, 3)  # twice the size, every frame
    assert np.array_equal(upscaler_input[0], resize_frames(first_stage[0], 128, 128))
    assert not np.array_equal(result.frames, upscaler_input[0])  # the upscaler re-drew it
    steps = settings.upscale_step_count()
    assert steps == 2  # ⌊3 · 0.7⌋
    assert engine.upscaler.model_passes["sample", "full"] == 2 * steps  # a CFG pair per step
    meta = result.sidecar.to_dict()
    assert meta["framing"]["upscale_size"] == meta["framing"]["result_size"] == [128, 128]
    assert meta["upscaler"] == {"model": folder, "steps": 2}
    assert "upscale" in meta["timings_s"]
    phases = list(dict.fromkeys(phase for phase, _, _ in events))
    assert phases[-2:] == ["decode", "upscale"]
    total = 1 + steps + 2  # encode, one window per step, two decode slices of 4 frames
    assert [e for e in events if e[0] == "upscale"] == [("upscale", i, total) for i in range(total + 1)]
    assert engine.describe()["upscaler"] == folder


def test_bad_framing_and_upscaling_input_fails_before_any_work(engine):
    engine.model_passes.clear()
    with pytest.raises(BadClipError, match=r"^The clip is 300x64, [^.]*--framing crop\) to edit its centre\.$"):
        engine.transfer(moving_square_frames(4, 300, 64), small())
    with pytest.raises(BadSettingsError, match=r"^This engine was started without an upscaler[^.]*"
                                               r"hf download cerspense/zeroscope_v2_XL[^.]*\.$"):
        engine.transfer(moving_square_frames(4, 64, 64), small(upscale="xl"))
    assert not engine.model_passes  # no model work started
    engine.check_settings(small(framing="crop"), 4, (300, 64))  # crop takes the same clip
    with pytest.raises(BadClipError, match="--framing crop"):
        engine.check_settings(small(), 4, (300, 64))  # the server can ask before it queues a job
    assert engine.describe()["upscaler"] is None
