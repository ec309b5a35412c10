"""Regions (issue 20): the pure pieces against hand values, then the engine on the tiny
models (ZeroScope and Wan, one windowed case, crop framing) keeping the plate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backend.backbones.base import smm
from backend.edit import load_engine
from backend.errors import BadMaskError
from backend.masks import check_masks, read_masks
from backend.method.engine import Engine, Procedure
from backend.method.guidance import pairwise_smm_loss
from backend.method.regions import (
    composite,
    erode,
    feather,
    grow,
    guidance_masks,
    latent_frame_groups,
    masked_smm,
    plate_mask,
    present_frames,
    regions_loss,
)
from shared.settings import TransferSettings
from tests.conftest import SMALL_SETTINGS

# ---------------------------------------------------------------- grow and feather


def columns(mask_row: list[float], rows: int = 5) -> torch.Tensor:
    """A one-frame mask whose every row is `mask_row`: (1, rows, len(row))."""
    return torch.tensor([mask_row] * rows, dtype=torch.float32)[None]


def test_grow_dilates_by_a_square_of_g_pixels():
    mask = torch.zeros(1, 7, 7)
    mask[0, 3, 3] = 1
    grown = grow(mask, 2)
    expected = torch.zeros(1, 7, 7)
    expected[0, 1:6, 1:6] = 1
    assert torch.equal(grown, expected)
    assert torch.equal(grow(mask, 0), mask)


def test_grow_and_erode_by_running_sums_match_max_pooling():
    mask = (torch.rand(3, 23, 31, generator=torch.Generator().manual_seed(0)) > 0.93).float()
    for pixels in (1, 3, 7):
        pooled = torch.nn.functional.max_pool2d(mask[:, None], 2 * pixels + 1, stride=1,
                                                padding=pixels)[:, 0]
        assert torch.equal(grow(mask, pixels), pooled)
        assert torch.equal(erode(1 - mask, pixels), 1 - pooled)


def test_feather_ramps_inside_the_grown_region_and_is_exactly_zero_outside():
    grown = columns([0, 0, 1, 1, 1, 1, 1, 0, 0])
    # r = ⌈2/2⌉ = 1: erode keeps columns 3..5, the 3-wide box mean ramps 1/3, 2/3, 1.
    expected = columns([0, 0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, 0])
    feathered = feather(grown, 2)
    assert torch.allclose(feathered, expected, atol=1e-6)
    outside = grown == 0
    assert (feathered[outside] == 0).all()  # exactly, not nearly
    assert torch.equal(feather(grown, 0), grown)


def test_a_subject_touching_the_frame_edge_is_not_faded_there():
    grown = columns([1, 1, 1, 1, 0, 0])
    feathered = feather(grown, 2)
    assert feathered[0, 2, 0] == 1 and feathered[0, 2, 1] == 1
    assert feathered[0, 2, 4] == 0


def test_plate_mask_is_the_union_of_the_regions_grown_then_feathered():
    first, second = torch.zeros(1, 1, 9, 9), torch.zeros(1, 1, 9, 9)
    first[0, 0, 1, 1] = 1
    second[0, 0, 7, 7] = 0.6  # at least ½: inside
    m = plate_mask(torch.cat([first, second]), grow_px=1, feather_px=0)
    assert m[0, 0:3, 0:3].eq(1).all() and m[0, 6:9, 6:9].eq(1).all()
    assert m.sum() == 18


def test_wan_latent_frames_pool_their_four_pixel_frames():
    assert latent_frame_groups(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert latent_frame_groups(9, 3) == [(0, 1), (1, 5), (5, 9)]


# ---------------------------------------------------------------- masked SMM and its loss


def test_masked_smm_of_an_all_ones_mask_is_the_smm():
    features = torch.randn(4, 6, 5, 7)
    ones = torch.ones(1, 4, 5, 7)
    assert torch.allclose(masked_smm(features, ones)[0], smm(features), atol=1e-6)


def test_masked_smm_hand_values():
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]],  # frame 0, D = 1
                             [[[5.0, 6.0], [7.0, 8.0]]]])  # frame 1
    weights = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.5, 0.0]]]])
    # frame 0: (1 + 4) / 2 = 2.5; frame 1: 0.5·7 / 0.5 = 7
    assert torch.allclose(masked_smm(features, weights), torch.tensor([[[2.5], [7.0]]]))
    assert present_frames(weights).tolist() == [[True, True]]


def test_camera_motion_without_a_region_is_the_whole_frame_smm():
    features = torch.randn(3, 4, 6, 6)
    background = guidance_masks(None, "camera", (3, 6, 6))
    assert torch.equal(background, torch.ones(1, 3, 6, 6))
    assert torch.allclose(masked_smm(features, background)[0], smm(features), atol=1e-6)
    masks = torch.zeros(1, 3, 6, 6)
    masks[0, :, :3] = 1
    assert torch.equal(guidance_masks(masks, "camera", (3, 6, 6))[0, :, 3:], torch.ones(3, 3, 6))
    assert guidance_masks(masks, "camera", (3, 6, 6))[0, :, :3].eq(0).all()


def two_opposite_regions(frames: int = 4, size: int = 12) -> torch.Tensor:
    """Region 0 moves right along the top rows, region 1 left along the bottom rows."""
    masks = torch.zeros(2, frames, size, size)
    for f in range(frames):
        masks[0, f, 0:3, f:f + 3] = 1
        masks[1, f, 8:11, size - 3 - f:size - f] = 1
    return masks


def test_two_regions_give_two_loss_terms_each_read_from_its_own_cells():
    masks = two_opposite_regions()
    source, target = torch.randn(4, 5, 12, 12), torch.randn(4, 5, 12, 12)
    present = present_frames(masks)
    loss = regions_loss(masked_smm(source, masks), masked_smm(target, masks), present)
    terms = [pairwise_smm_loss(masked_smm(source, masks)[r], masked_smm(target, masks)[r])
             for r in range(2)]
    assert torch.allclose(loss, terms[0] + terms[1])
    outside = masks.amax(dim=0)[:, None].expand_as(target) == 0
    changed = target.clone()
    changed[outside] = torch.randn(int(outside.sum())) * 100
    again = regions_loss(masked_smm(source, masks), masked_smm(changed, masks), present)
    assert torch.equal(again, loss)
    inside_one = masks[0][:, None].expand_as(target) == 1
    moved = target.clone()
    moved[inside_one] += torch.randn(int(inside_one.sum()))
    moved_terms = masked_smm(moved, masks)
    assert torch.equal(moved_terms[1], masked_smm(target, masks)[1])  # region 1 untouched
    assert not torch.equal(moved_terms[0], masked_smm(target, masks)[0])


def test_a_region_absent_from_a_frame_leaves_that_frame_out_of_its_loss():
    masks = two_opposite_regions()
    masks[1, 2:] = 0  # region 1 leaves after frame 1
    source, target = torch.randn(4, 5, 12, 12), torch.randn(4, 5, 12, 12)
    present = present_frames(masks)
    loss = regions_loss(masked_smm(source, masks), masked_smm(target, masks), present)
    second = pairwise_smm_loss(masked_smm(source, masks)[1, :2], masked_smm(target, masks)[1, :2])
    first = pairwise_smm_loss(masked_smm(source, masks)[0], masked_smm(target, masks)[0])
    assert torch.allclose(loss, first + second)
    masks[1, 1:] = 0  # present in one frame: no motion, no term
    lone = regions_loss(masked_smm(source, masks), masked_smm(target, masks), present_frames(masks))
    assert torch.allclose(lone, first)


# ---------------------------------------------------------------- composite


def test_composite_is_the_source_exactly_where_m_is_zero():
    rng = np.random.default_rng(0)
    generated = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    m = np.zeros((2, 4, 4), np.float32)
    m[:, 1, 1] = 1
    m[:, 2, 2] = 0.5
    out = composite(generated, source, m)
    keep = m == 0
    assert np.array_equal(out[keep], source[keep])
    assert np.array_equal(out[:, 1, 1], generated[:, 1, 1])
    half = np.rint((generated[:, 2, 2].astype(np.float32) + source[:, 2, 2]) / 2)
    assert np.array_equal(out[:, 2, 2], half.astype(np.uint8))


# ---------------------------------------------------------------- reading and checks


def write_masks(folder, masks: np.ndarray):
    folder.mkdir(parents=True, exist_ok=True)
    for index, mask in enumerate(masks):
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{index:04d}.png")
    return folder


def test_read_masks_takes_a_folder_or_one_png_for_every_frame(tmp_path):
    masks = np.zeros((3, 16, 20), np.float32)
    masks[:, 4:8, 5:9] = 1
    folder = write_masks(tmp_path / "m", masks)
    assert np.array_equal(read_masks(folder, 3, (20, 16)), masks)
    one = read_masks(folder / "0000.png", 5, (20, 16))
    assert one.shape == (5, 16, 20) and np.array_equal(one[4], masks[0])


@pytest.mark.parametrize(("masks", "count", "size", "fragment"), [
    (np.ones((2, 8, 8)) * np.eye(8), 3, (8, 8), "has 2 frames but the clip has 3"),
    (np.ones((3, 8, 8)) * np.eye(8), 3, (16, 8), "is 8x8 but the clip is 16x8"),
    (np.zeros((3, 8, 8)), 3, (8, 8), "black in every frame"),
    (np.full((3, 8, 8), 0.2), 3, (8, 8), "black in every frame"),
    (np.ones((3, 8, 8)), 3, (8, 8), "white over every pixel"),
])
def test_bad_masks_are_one_sentence(masks, count, size, fragment):
    with pytest.raises(BadMaskError) as caught:
        check_masks(masks.astype(np.float32), count, size, "m.png")
    message = str(caught.value)
    assert fragment in message and message.count(". ") == 0 and message.endswith(".")


def test_an_unreadable_mask_is_one_sentence(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(BadMaskError, match="Could not read the mask broken.png"):
        read_masks(broken, 3, (8, 8))
    with pytest.raises(BadMaskError, match="There is no mask"):
        read_masks(tmp_path / "nothing.png", 3, (8, 8))


# ---------------------------------------------------------------- the engine keeps the plate


def square_clip(frames: int, width: int = 64, height: int = 64, step: int = 6):
    """A textured plate with a bright square moving right, and the square's mask."""
    rng = np.random.default_rng(3)
    plate = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    clip = np.repeat(plate[None], frames, axis=0)
    masks = np.zeros((frames, height, width), np.float32)
    for f in range(frames):
        left = 2 + f * step
        clip[f, 20:36, left:left + 16] = (240, 200, 40)
        masks[f, 20:36, left:left + 16] = 1
    return clip, masks


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def settings(**overrides) -> TransferSettings:
    return TransferSettings(**{**SMALL_SETTINGS, "prompt": "a red train", "seed": 5,
                               "region_grow": 4, "region_feather": 4, **overrides})


def assert_plate_kept(out: np.ndarray, clip: np.ndarray, masks: np.ndarray, grow_px: int) -> None:
    """Outside the grown region every pixel is the source's; inside, the edit changed some."""
    grown = grow(torch.as_tensor(masks), grow_px).numpy() > 0
    assert out.shape == clip.shape
    assert np.array_equal(out[~grown], clip[~grown])
    assert not np.array_equal(out[grown], clip[grown])


def test_a_moving_region_keeps_the_plate_and_the_edit_inside_it(engine):
    clip, masks = square_clip(4)
    result = engine.transfer(clip, settings(), masks=masks[None])
    assert_plate_kept(result.frames, clip, masks, 4)
    changed = (result.frames != clip).any(axis=-1)
    for frame in range(4):  # the change follows the region across the frame
        columns_changed = np.nonzero(changed[frame].any(axis=0))[0]
        assert columns_changed.min() >= 2 + frame * 6 - 4
        assert columns_changed.max() < 2 + frame * 6 + 16 + 4
    assert result.sidecar.regions == {"count": 1, "grow": 4, "feather": 4, "motion": "subject",
                                      "composited": True}


def test_outside_the_region_the_sampled_latent_is_the_source_latent_exactly(engine, monkeypatch):
    clip, masks = square_clip(4)
    seen = {}
    sample = engine._sample

    def watched(source, windows, settings, takes, procedure, report, embeddings, regions=None,
                conditioning=None):
        seen.update(source=source, regions=regions)
        seen["latent"] = sample(source, windows, settings, takes, procedure, report, embeddings,
                                regions, conditioning)
        return seen["latent"]

    monkeypatch.setattr(engine, "_sample", watched)
    engine.transfer(clip, settings(region_grow=0, region_feather=0), masks=masks[None])
    plate = (seen["regions"].latent == 0)[None, None].expand_as(seen["latent"])
    assert plate.any() and not plate.all()
    source = seen["source"].source_latent.float()
    assert torch.equal(seen["latent"][plate], source[plate])
    assert not torch.equal(seen["latent"][~plate], source[~plate])


def test_the_inversion_cache_is_region_free_and_reused_by_a_new_region(engine):
    clip, masks = square_clip(4)
    first = engine.transfer(clip, settings(prompt="a cat"), masks=masks[None])
    shifted = np.roll(masks, 3, axis=2)
    second = engine.transfer(clip, settings(prompt="a dog"), masks=shifted[None])
    assert second.sidecar.inversion_from_cache and first.sidecar.regions["count"] == 1
    assert_plate_kept(second.frames, clip, shifted, 4)


def test_camera_motion_without_a_region_is_todays_edit_bit_for_bit(engine):
    clip, _ = square_clip(4)
    plain = engine.transfer(clip, settings(), procedure=Procedure(use_cache=False))
    camera = engine.transfer(clip, settings(motion="camera"), procedure=Procedure(use_cache=False))
    assert np.array_equal(plain.frames, camera.frames)
    assert plain.sidecar.regions is None and camera.sidecar.regions["motion"] == "camera"


def test_camera_motion_with_a_region_regenerates_the_whole_frame(engine):
    clip, masks = square_clip(4)
    result = engine.transfer(clip, settings(motion="camera"), masks=masks[None])
    assert result.frames.shape == (4, 64, 64, 3)
    assert result.sidecar.regions["composited"] is False
    assert (result.frames != clip).any(axis=-1).mean() > 0.5


def test_two_regions_moving_apart_keep_the_plate_with_windows(engine):
    clip, right = square_clip(6, step=4)
    left = right[:, :, ::-1].copy()
    clip[:, :, ::-1][right > 0] = (40, 200, 240)  # a second square moving left
    masks = np.stack([right, left])
    result = engine.transfer(clip, settings(num_frames=6, window_frames=4, window_overlap=2),
                             masks=masks)
    assert result.sidecar.windows == [[0, 4], [2, 6]]
    assert_plate_kept(result.frames, clip, masks.max(axis=0), 4)
    assert result.sidecar.regions["count"] == 2


def test_under_crop_the_region_follows_the_box_and_the_result_is_the_source_frame(engine):
    clip, masks = square_clip(4, width=96, height=64, step=4)
    masks[:, :, :20] = 0  # the region stays inside the centred 64-wide box
    result = engine.transfer(clip, settings(framing="crop"), masks=masks[None])
    box = result.sidecar.framing["crop_box"]
    assert box == [16, 0, 80, 64]
    assert_plate_kept(result.frames, clip, masks, 4)


def test_under_fit_the_region_follows_the_fit_size_and_the_result_is_at_the_source_size(engine):
    clip, masks = square_clip(4, width=96, height=64, step=8)
    result = engine.transfer(clip, settings(), masks=masks[None])
    assert result.sidecar.framing["model_size"] == [72, 48]  # 3:2 within 64×64 pixels
    assert_plate_kept(result.frames, clip, masks, 4)


def test_wan_keeps_the_plate_with_four_frames_a_latent_frame(tiny_wan_dir, tmp_path):
    wan = load_engine(str(tiny_wan_dir), device="cpu", cache_dir=tmp_path / "cache")
    clip, masks = square_clip(9, step=4)
    result = wan.transfer(clip, settings(num_frames=9), masks=masks[None])
    assert result.sidecar.backbone == "wan"
    assert_plate_kept(result.frames, clip, masks, 4)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("model", ["tiny", "wan-tiny"])
def test_cli_mask_keeps_every_plate_pixel_outside_the_grown_region(tmp_path, model):
    from tests.test_cli import SMALL_FLAGS, backend, write_png_folder

    clip, masks = square_clip(4)
    clip_dir = write_png_folder(tmp_path / "clip", clip)
    mask_dir = write_masks(tmp_path / "mask", masks)
    still = tmp_path / "still.png"  # a second region: one PNG for every frame
    Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), ((48, 8), (48, 8)))).save(still)
    result = backend("transfer", str(clip_dir), "--prompt", "a heron", "--model", model,
                     *SMALL_FLAGS, "--mask", str(mask_dir), "--mask", str(still),
                     "--region-grow", "3", "--region-feather", "2", "--cache-dir",
                     str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4"),
                     "--frames-dir", str(tmp_path / "frames"))
    assert result.returncode == 0, result.stderr
    written = np.stack([np.asarray(Image.open(path))
                        for path in sorted((tmp_path / "frames").glob("*.png"))])
    both = np.maximum(masks, read_masks(still, 4, (64, 64)))
    assert_plate_kept(written, clip, both, 3)
    import json

    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["regions"] == {"count": 2, "grow": 3, "feather": 2, "motion": "subject",
                                  "composited": True}


@pytest.mark.parametrize(("make_mask", "fragment"), [
    (lambda folder: write_masks(folder, square_clip(3)[1]), "has 3 frames but the clip has 4"),
    (lambda folder: write_masks(folder, np.pad(square_clip(4)[1], ((0, 0), (0, 0), (0, 8)))),
     "is 72x64 but the clip is 64x64"),
    (lambda folder: write_masks(folder, np.zeros((4, 64, 64), np.float32)), "black in every frame"),
    (lambda folder: write_masks(folder, np.ones((4, 64, 64), np.float32)), "white over every pixel"),
    (lambda folder: (folder.mkdir(), (folder / "0.png").write_bytes(b"junk"))[0] or folder,
     "Could not read the mask"),
])
def test_cli_bad_masks_end_in_one_sentence_before_any_work(tmp_path, make_mask, fragment):
    from tests.test_cli import SMALL_FLAGS, assert_one_sentence_error, backend, write_png_folder

    clip_dir = write_png_folder(tmp_path / "clip", square_clip(4)[0])
    mask = make_mask(tmp_path / "mask")
    result = backend("transfer", str(clip_dir), "--prompt", "x", "--model", "tiny", *SMALL_FLAGS,
                     "--mask", str(mask), "--cache-dir", str(tmp_path / "c"),
                     "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, fragment)
    assert "encode" not in result.stderr and not (tmp_path / "o.mp4").exists()


# ---------------------------------------------------------------- one frame at a time, exactly


def whole_clip_regions(masks: torch.Tensor, motion: str, grow_px: int, feather_px: int,
                       box: tuple[int, int, int, int], model_frames: int, latent_frames: int,
                       latent_size: tuple[int, int]):
    """The regions as whole-clip compositions of the pure pieces (the reference)."""
    from backend.method.regions import binary, pad_frames, to_latent

    left, top, right, bottom = box
    boxed = binary(masks)[..., top:bottom, left:right]
    guidance = to_latent(pad_frames(guidance_masks(boxed, motion, boxed.shape[1:]), model_frames),
                         latent_frames, latent_size)
    plate = feather(grow(binary(masks).amax(dim=0), grow_px)[:, top:bottom, left:right], feather_px)
    latent = to_latent(pad_frames(plate, model_frames), latent_frames, latent_size)
    return plate, latent, guidance


@pytest.mark.parametrize(("grow_px", "feather_px", "box", "model_frames", "latent_frames"), [
    (4, 4, (0, 0, 40, 24), 6, 6),  # ZeroScope: a latent frame a frame
    (0, 0, (8, 0, 32, 24), 6, 6),  # crop box, no grow nor feather
    (3, 5, (0, 0, 40, 24), 9, 3),  # Wan: 4 frames a latent frame, the last 3 frames repeated
    (2, 20, (4, 2, 36, 22), 6, 6),  # (2r + 1)² = 441: counts in int16
])
def test_prepare_regions_frame_by_frame_equals_the_whole_clip_bit_for_bit(
        grow_px, feather_px, box, model_frames, latent_frames):
    from backend.method.regions import Plate, prepare_regions

    generator = torch.Generator().manual_seed(grow_px + feather_px)
    masks = torch.rand(2, 6, 24, 40, generator=generator)  # grey levels: ½ decides
    latent_size = ((box[2] - box[0]) // 4, (box[3] - box[1]) // 4)
    plate, latent, guidance = whole_clip_regions(masks, "subject", grow_px, feather_px, box,
                                                 model_frames, latent_frames, latent_size)
    frames = (masks[:, f].numpy() >= 0.5 for f in range(6))
    regions = prepare_regions(frames, 6, 2, "subject", grow_px, feather_px, box, model_frames,
                              latent_frames, latent_size)
    assert torch.equal(regions.latent, latent) and torch.equal(regions.guidance, guidance)
    assert all(torch.equal(regions.plate.frame(f), plate[f]) for f in range(6))
    expected_dtype = torch.int16 if feather_px == 20 else torch.uint8
    assert regions.plate.counts.dtype == expected_dtype  # 1 or 2 bytes a pixel, not 4
    assert torch.equal(Plate.of(plate, feather_px).frame(5), plate[5])
    camera = prepare_regions((masks[:, f].numpy() >= 0.5 for f in range(6)), 6, 2, "camera", grow_px,
                             feather_px, box, model_frames, latent_frames, latent_size)
    assert camera.plate is None and camera.latent is None
    assert torch.equal(camera.guidance, whole_clip_regions(
        masks, "camera", grow_px, feather_px, box, model_frames, latent_frames, latent_size)[2])


class CountingMasks:
    """RegionMasks that count the frames read and refuse to be read whole."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks, self.shape, self.reads = masks, masks.shape, []

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, key):
        self.reads.extend(np.atleast_1d(key[1]).tolist())
        return self.masks[key]

    def __array__(self, dtype=None, copy=None):
        raise AssertionError("the masks were read whole")


def test_the_engine_reads_each_used_mask_frame_once_and_as_levels(engine):
    """Every frame the edit uses is read once (the check and the regions share the read),
    none it skips; uint8 levels give the float masks' result exactly."""
    clip, masks = square_clip(6)
    levels = (masks * 255).astype(np.uint8)
    counting = CountingMasks(levels[None])
    chosen = settings(num_frames=3)
    by_levels = engine.transfer(clip, chosen, masks=counting)
    assert sorted(counting.reads) == by_levels.sidecar.input_frame_indices == [0, 2, 5]
    by_floats = engine.transfer(clip, chosen, masks=masks[None])
    assert np.array_equal(by_levels.frames, by_floats.frames)
    assert np.array_equal(by_levels.alpha, by_floats.alpha)


def test_a_mask_black_in_every_frame_used_is_refused_before_any_model_work(engine):
    clip, masks = square_clip(4)
    masks[1:] = 0  # the subject only in frame 0, which the edit skips
    engine.model_passes.clear()
    with pytest.raises(BadMaskError, match="The mask 1 is black in every frame"):
        engine.transfer(clip, settings(num_frames=2, start=1), masks=masks[None])
    assert not engine.model_passes


def test_the_checks_need_no_torch(tmp_path):
    """The server's front (and a Ray gateway) checks masks without importing torch."""
    import subprocess
    import sys

    script = (
        "import io, sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from backend.server.frames import check_mask_frames\n"
        "from shared.protocol import ProtocolError\n"
        "def png(level):\n"
        "    out = io.BytesIO()\n"
        "    frame = np.zeros((8, 8), np.uint8)\n"
        "    frame[2:5, 2:5] = level\n"
        "    Image.fromarray(frame).save(out, format='PNG')\n"
        "    return out.getvalue()\n"
        "check_mask_frames([[png(255), png(0)]], 2, (8, 8))\n"
        "try:\n"
        "    check_mask_frames([[png(0), png(127)]], 2, (8, 8))\n"
        "except ProtocolError as error:\n"
        "    print(error)\n"
        "print('torch' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    refusal, torch_imported = run.stdout.strip().splitlines()
    assert "The mask of region 1 is black in every frame" in refusal
    assert torch_imported == "False"
