"""The Wan VACE backbone on a tiny random WanVACEPipeline in diffusers layout: a plain
edit with a reference equals diffusers' WanVACEPipeline (the whole frame, and a region
with its plate kept), references steer the result, the plate outside a region stays
exact, and bad references are refused in one sentence before any model work."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from backend.backbones.loading import load_backbone
from backend.errors import BadReferenceError, BadSettingsError
from backend.method.engine import Engine
from backend.method.regions import generation_mask
from backend.references import read_reference
from shared.settings import MAX_REFERENCE_SIDE, TransferSettings
from tests.conftest import moving_square_frames
from tests.vace_reference import vace_pipeline_latent

PROMPT = "a golden locomotive"
FRAMES, SIDE, STEPS, SEED = 9, 64, 3, 11  # 9 frames: 3 latent frames of 8×8


def picture(seed: int, height: int = 48, width: int = 40) -> np.ndarray:
    """A reference: smooth colour ramps with a seeded tint, (H, W, 3) uint8."""
    tint = np.random.default_rng(seed).integers(0, 255, 3)
    ramp = np.linspace(0, 1, height * width).reshape(height, width, 1)
    return (ramp * tint).astype(np.uint8)


@pytest.fixture(scope="module")
def engine(tiny_wan_vace_dir) -> Engine:
    return Engine(load_backbone(str(tiny_wan_vace_dir), device="cpu"))


def plain(engine: Engine, **overrides) -> TransferSettings:
    """`--iterations 0 --no-restart --init noise --prompt-prefix ""`: plain VACE sampling."""
    values = dict(prompt=PROMPT, seed=SEED, guidance_iterations=0, restart=False, init="noise",
                  prompt_prefix="", num_frames=FRAMES, width=SIDE, height=SIDE, steps=STEPS,
                  inversion_steps=STEPS)
    return engine.resolve(TransferSettings(**{**values, **overrides}))


def edit(engine: Engine, settings: TransferSettings, monkeypatch, **inputs) -> dict:
    """One edit; what it decoded, the frames the model got, the source state and regions
    its plate was kept with, and its result."""
    seen: dict = {}
    decode, keep, condition = engine.decode, engine.keep_plate, engine.conditioning_for
    monkeypatch.setattr(engine, "decode", lambda latent, *a, **k: seen.setdefault(
        "latent", latent) is None or decode(latent, *a, **k))
    monkeypatch.setattr(engine, "keep_plate", lambda latent, source, timestep, regions: (
        seen.update(source=source, regions=regions) or keep(latent, source, timestep, regions)))
    monkeypatch.setattr(engine, "conditioning_for", lambda frames, *a: (
        seen.setdefault("frames", frames) is None or condition(frames, *a)))
    seen["result"] = engine.transfer(moving_square_frames(FRAMES, SIDE, SIDE), settings, **inputs)
    monkeypatch.undo()
    return seen


def initial_latent(references: int) -> torch.Tensor:
    """The noise both sides start from: one draw of the references' and the clip's frames."""
    return torch.randn((1, 16, references + 3, 8, 8), generator=torch.Generator("cpu").manual_seed(SEED))


def diffusers_settings(engine: Engine, settings: TransferSettings) -> dict:
    return dict(prompt=PROMPT, negative_prompt=settings.negative_prompt, steps=STEPS,
                shift=engine.backbone.schedule.shift, guidance=settings.cfg_scale, width=SIDE,
                height=SIDE, frames=FRAMES)


def test_a_plain_vace_edit_with_a_reference_equals_diffusers_vace_pipeline(
        engine, tiny_wan_vace_dir, monkeypatch):
    """The whole frame generated, no control video (diffusers' video=None, mask=None)."""
    settings = plain(engine)
    reference = picture(1)
    ours = edit(engine, settings, monkeypatch, references=[reference])["latent"]
    expected = vace_pipeline_latent(tiny_wan_vace_dir, **diffusers_settings(engine, settings),
                                    latents=initial_latent(1), references=[reference])
    assert torch.equal(ours[0], expected[:, 1:])


def test_a_vace_edit_in_a_region_equals_diffusers_with_the_plate_kept_each_step(
        engine, tiny_wan_vace_dir, monkeypatch):
    """VACE's mask is the grown region, its control video the clip with the region grey;
    the pipeline keeps the plate as the engine does: the initial latent and every step's
    latent blended with the source's inverted latent outside the region."""
    settings = plain(engine, region_grow=4, region_feather=2)
    masks = np.zeros((1, FRAMES, SIDE, SIDE), np.uint8)
    masks[:, :, 18:42, 4:60] = 255
    reference = picture(2)
    seen = edit(engine, settings, monkeypatch, references=[reference], masks=masks)
    source, regions = seen["source"], seen["regions"]
    generate = generation_mask(regions.plate, (SIDE, SIDE), FRAMES)
    assert 0 < generate.float().mean() < 1
    pixels = torch.from_numpy(seen["frames"]).float()
    video = (2.0 * (pixels / 255.0) - 1.0) * (1 - generate.float()[..., None])
    grid = engine.backbone.schedule.timesteps(STEPS)

    def kept(latents: torch.Tensor, timestep) -> torch.Tensor:
        return torch.cat([latents[:, :, :1],
                          Engine.keep_plate(latents[:, :, 1:], source, timestep, regions)], dim=2)

    expected = vace_pipeline_latent(
        tiny_wan_vace_dir, **diffusers_settings(engine, settings),
        latents=kept(initial_latent(1), grid[0]), references=[reference], video=video,
        mask=generate, after_step=lambda index, latents: kept(
            latents, grid[index + 1] if index + 1 < STEPS else None))
    assert torch.equal(seen["latent"][0], expected[:, 1:])


GUIDED = dict(guidance_iterations=1, guided_steps=1, restart=True, init="lowfreq")


def test_the_reference_and_its_strength_steer_the_result_and_the_same_reproduces_it(
        engine, monkeypatch):
    """Guided, restarted: the reference's slot is sampled along the whole route."""
    settings = plain(engine, **GUIDED)

    def frames(references, **overrides):
        changed = TransferSettings(**{**settings.to_dict(), **overrides})
        return edit(engine, changed, monkeypatch, references=references)["result"].frames

    first = frames([picture(1)])
    assert np.array_equal(frames([picture(1)]), first)
    assert not np.array_equal(frames([picture(3)]), first)
    assert not np.array_equal(frames([picture(1)], reference_strength=0.5), first)
    assert not np.array_equal(frames([]), first)
    both = frames([picture(1), picture(3)])
    assert both.shape == first.shape and not np.array_equal(both, first)


def test_the_plate_outside_a_region_is_the_sources_exactly(engine, monkeypatch):
    settings = plain(engine, **GUIDED, region_grow=2, region_feather=2)
    masks = np.zeros((1, FRAMES, SIDE, SIDE), np.uint8)
    masks[:, :, 20:38, 8:56] = 255
    result = edit(engine, settings, monkeypatch, references=[picture(4)], masks=masks)["result"]
    source = moving_square_frames(FRAMES, SIDE, SIDE)
    outside = result.alpha == 0
    assert outside.any() and not outside.all()
    assert np.array_equal(result.frames[outside], source[outside])
    assert not np.array_equal(result.frames[~outside], source[~outside])


def test_inversion_is_the_references_own_so_a_new_reference_reuses_it(engine, tmp_path,
                                                                         monkeypatch):
    """The inversion and the source's features run unconditioned (the context's scale
    0: Wan 2.1 T2V's own pass), so they are cached per clip, whatever the references."""
    cached = Engine(engine.backbone, tmp_path / "cache")
    settings = plain(cached, **GUIDED)
    clip = moving_square_frames(FRAMES, SIDE, SIDE)
    first = cached.transfer(clip, settings, references=[picture(1)])
    second = cached.transfer(clip, settings, references=[picture(5)])
    assert not first.sidecar.inversion_from_cache and second.sidecar.inversion_from_cache


# ---------------------------------------------------------------- refusals


def test_a_reference_to_a_backbone_without_references_is_refused(tiny_wan_dir):
    plain_wan = Engine(load_backbone(str(tiny_wan_dir), device="cpu"))
    passes = plain_wan.model_passes.copy()
    with pytest.raises(BadReferenceError, match="The wan backbone takes no reference image"):
        plain_wan.transfer(moving_square_frames(5, SIDE, SIDE),
                           TransferSettings(prompt=PROMPT, width=SIDE, height=SIDE, steps=2),
                           references=[picture(1)])
    assert plain_wan.model_passes == passes


def test_too_many_references_and_a_clip_beyond_one_window_are_refused(engine):
    clip = moving_square_frames(FRAMES, SIDE, SIDE)
    with pytest.raises(BadReferenceError, match="4 reference images were given; the wan-vace "
                                                "backbone takes at most 3"):
        engine.transfer(clip, plain(engine), references=[picture(k) for k in range(4)])
    with pytest.raises(BadReferenceError, match="reference 2 is 8x8 pixels, too small"):
        engine.transfer(clip, plain(engine), references=[picture(1), picture(1, 8, 8)])
    with pytest.raises(BadSettingsError, match="edits at most 5 frames at once"):
        engine.transfer(clip, plain(engine, window_frames=5, window_overlap=1))


def test_unreadable_tiny_and_huge_reference_files_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(BadReferenceError, match="is not a readable image"):
        read_reference(tmp_path / "notes.png")
    with pytest.raises(BadReferenceError, match="There is no reference image at"):
        read_reference(tmp_path / "missing.png")
    Image.fromarray(picture(1, 10, 30)).save(tmp_path / "small.png")
    with pytest.raises(BadReferenceError, match="30x10 pixels, too small"):
        read_reference(tmp_path / "small.png")
    Image.new("L", (MAX_REFERENCE_SIDE + 1, 16)).save(tmp_path / "wide.png")
    with pytest.raises(BadReferenceError, match=f"scale it down to at most {MAX_REFERENCE_SIDE}"):
        read_reference(tmp_path / "wide.png")
    Image.fromarray(picture(1)).save(tmp_path / "good.jpg")
    assert read_reference(tmp_path / "good.jpg").shape == (48, 40, 3)


# ---------------------------------------------------------------- the memory plan


def test_the_memory_plan_counts_the_references_latent_frames(monkeypatch):
    """The plan holds as many references as the backbone takes (its bound for any edit):
    with none taken, guidance and the CFG step would hold less."""
    import backend.backbones.wan_vace as wan_vace
    from backend.edit import engine_phases
    from backend.memory.planner import plan_edit

    settings = TransferSettings(prompt="a plan", source_prompt="a plan", steps=2, guided_steps=1,
                                inversion_steps=2)

    def plan():
        return plan_edit(engine_phases, "wan-vace-tiny", FRAMES, (SIDE, SIDE), "cpu",
                         settings=settings, host_terms=False).phases

    with_references = plan()
    monkeypatch.setattr(wan_vace, "MAX_REFERENCES", 0)
    without = plan()
    for phase in ("guide", "cfg"):
        assert with_references[phase] > without[phase], phase
    assert with_references["invert"] == without["invert"]  # inversion runs unconditioned
    # VACE is conditioned on the whole clip, so it edits one window: a plan of more is
    # refused in the engine's sentence, before any work.
    with pytest.raises(BadSettingsError, match="edits at most 81 frames at once; give fewer --frames"):
        plan_edit(engine_phases, "wan-vace-tiny", 85, (SIDE, SIDE), "cpu", settings=settings)


def test_a_conditioned_truncated_pass_reads_the_full_passs_tap_and_its_gradient(engine):
    """The truncated pass runs only the context blocks that reach the tapped block; its
    tap equals the full pass's, with the references' frames before the clip's."""
    b = engine.backbone
    b.use_settings(plain(engine, guidance_block=1))  # after block 1: one context block of two
    clip = moving_square_frames(FRAMES, SIDE, SIDE)
    conditioning = b.conditioning(clip, None, [picture(1)], 1.0)
    latent = torch.randn((1, 16, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    text = b.embed(["a plan"])
    with b.conditioned(conditioning):
        full = b.taps(latent, 500.0, text, truncated=False)[0]
        x = latent.clone().requires_grad_(True)
        truncated = b.taps(x, 500.0, text, truncated=True)[0]
        truncated.sum().backward()
    assert truncated.shape == (1, 4, 24) and torch.allclose(truncated, full, atol=1e-6)
    assert x.grad.abs().sum() > 0
    assert len(b.transformer.vace_blocks) == 2  # every context block is back
    unconditioned = b.taps(latent[:, :, 1:], 500.0, text, truncated=True)[0]
    assert not torch.allclose(unconditioned, full[:, 1:], atol=1e-4)


# ---------------------------------------------------------------- the command line


def test_transfer_takes_a_reference_and_refuses_one_to_a_backbone_without_them(tmp_path):
    """`transfer --reference` end to end on the tiny VACE; on the tiny ZeroScope the
    reference is refused in one sentence before anything loads."""
    from backend.video import write_video
    from tests.test_cli import assert_one_sentence_error, backend

    clip = tmp_path / "clip.mp4"
    write_video(moving_square_frames(FRAMES, SIDE, SIDE), clip, fps=12)
    Image.fromarray(picture(1)).save(tmp_path / "look.png")
    common = [str(clip), "--prompt", PROMPT, "--reference", str(tmp_path / "look.png"),
              "--frames", str(FRAMES), "--width", str(SIDE), "--height", str(SIDE),
              "--steps", "2", "--inversion-steps", "2", "--guided-steps", "1", "--iterations", "1",
              "--reference-strength", "0.7", "--cache-dir", str(tmp_path / "cache")]
    done = backend("transfer", *common, "--model", "wan-vace-tiny", "-o", str(tmp_path / "out.mp4"))
    assert done.returncode == 0, done.stderr
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["backbone"] == "wan-vace" and sidecar["settings"]["reference_strength"] == 0.7
    look = np.asarray(Image.open(tmp_path / "look.png").convert("RGB"))
    assert sidecar["references"] == [{"width": 40, "height": 48,
                                      "sha256": hashlib.sha256(look.tobytes()).hexdigest()}]
    refused = backend("transfer", *common, "--model", "tiny", "-o", str(tmp_path / "no.mp4"))
    assert_one_sentence_error(refused, "The zeroscope backbone takes no reference image")
    assert not (tmp_path / "no.mp4").exists()
