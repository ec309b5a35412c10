"""Takes: several seeds and prompts of one clip from one inversion, batched on the device.

Each take must be the single edit with its prompt and seed (Engine.transfer_takes); the
batch only shares the inversion, the source features and the model's passes."""

from __future__ import annotations

import numpy as np
import pytest

from backend.edit import load_engine
from backend.method.engine import Engine
from backend.results import Take, TransferResult, takes_of
from shared.settings import TransferSettings
from tests.conftest import SMALL_SETTINGS, moving_square_frames

# Batched model arithmetic may round apart from the single pass in the last bits of
# float32; the decoded frames then differ by at most one 8-bit level here and there.
LEVELS = 1


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return load_engine("tiny", device="cpu", cache_dir=tmp_path_factory.mktemp("cache"))


def small(**overrides) -> TransferSettings:
    return TransferSettings(**{"prompt": "a red train", "seed": 7, **SMALL_SETTINGS, **overrides})


def assert_same_edit(take: TransferResult, single: TransferResult) -> None:
    difference = np.abs(take.frames.astype(int) - single.frames.astype(int))
    assert take.frames.shape == single.frames.shape
    assert difference.max() <= LEVELS
    assert take.sidecar.seed == single.sidecar.seed
    assert take.sidecar.settings["prompt"] == single.sidecar.settings["prompt"]


def singles(engine: Engine, clip, settings: TransferSettings, takes: list[Take],
            **kwargs) -> list[TransferResult]:
    return [engine.transfer(clip, TransferSettings.from_dict(
        {**settings.to_dict(), "prompt": take.prompt, "seed": take.seed}), **kwargs)
        for take in takes]


def test_takes_of_is_every_prompt_with_every_seed_the_first_take_the_seed():
    assert takes_of(["a cat", "a dog"], 7, 2) == [
        Take("a cat", 7), Take("a cat", 8), Take("a dog", 7), Take("a dog", 8)]


def test_each_take_is_the_single_edit_with_its_seed_from_one_inversion(engine):
    clip = moving_square_frames(4, 64, 64)
    settings = small(prompt="a blue car")
    takes = takes_of([settings.prompt], 7, 3)
    engine.model_passes.clear()
    batched = engine.transfer_takes(clip, settings, takes)
    assert engine.model_passes["invert", "full"] > 0  # this clip's first edit: inverted once
    inverted = engine.model_passes["invert", "full"]
    assert [r.sidecar.seed for r in batched] == [7, 8, 9]
    assert not any(r.sidecar.inversion_from_cache for r in batched)
    engine.model_passes.clear()
    for take, single in zip(batched, singles(engine, clip, settings, takes), strict=True):
        assert_same_edit(take, single)
        assert single.sidecar.inversion_from_cache
    assert engine.model_passes["invert", "full"] == 0
    assert inverted > 0


def test_two_prompts_by_two_seeds_give_four_takes_each_its_single_edit(engine):
    clip = moving_square_frames(4, 64, 64)
    settings = small()
    takes = takes_of(["a red train", "a green bus"], 3, 2)
    batched = engine.transfer_takes(clip, settings, takes, batch_size=3)  # a batch of 3, then 1
    assert [(r.sidecar.settings["prompt"], r.sidecar.seed) for r in batched] == [
        ("a red train", 3), ("a red train", 4), ("a green bus", 3), ("a green bus", 4)]
    for take, single in zip(batched, singles(engine, clip, settings, takes), strict=True):
        assert_same_edit(take, single)
    assert not np.array_equal(batched[0].frames, batched[1].frames)  # two seeds, two edits


def test_takes_with_windows_are_their_single_edits(engine):
    clip = moving_square_frames(6, 64, 64)
    settings = small(num_frames=6, window_frames=4, window_overlap=2)
    takes = takes_of([settings.prompt], 11, 2)
    batched = engine.transfer_takes(clip, settings, takes)
    assert len(batched[0].sidecar.windows) == 2
    for take, single in zip(batched, singles(engine, clip, settings, takes), strict=True):
        assert_same_edit(take, single)


def test_takes_with_a_region_are_their_single_edits(engine):
    from tests.test_regions import square_clip

    clip, masks = square_clip(4)
    settings = small(region_grow=4, region_feather=4)
    takes = takes_of([settings.prompt], 5, 2)
    batched = engine.transfer_takes(clip, settings, takes, masks=masks[None])
    assert batched[0].alpha is not None
    for take, single in zip(batched, singles(engine, clip, settings, takes, masks=masks[None]),
                            strict=True):
        assert_same_edit(take, single)
        assert np.array_equal(take.alpha, single.alpha)


def test_wan_takes_are_their_single_edits(tiny_wan_dir, tmp_path):
    wan = load_engine(str(tiny_wan_dir), device="cpu", cache_dir=tmp_path / "cache")
    clip = moving_square_frames(5, 64, 64)
    settings = small(num_frames=5)
    takes = takes_of(["a red train", "a green bus"], 2, 1)
    batched = wan.transfer_takes(clip, settings, takes)
    assert batched[0].sidecar.backbone == "wan"
    for take, single in zip(batched, singles(wan, clip, settings, takes), strict=True):
        assert_same_edit(take, single)


def test_progress_names_the_takes(engine):
    clip = moving_square_frames(4, 64, 64)[::-1].copy()  # a clip not inverted yet
    phases: list[str] = []
    engine.transfer_takes(clip, small(seed=40), takes_of(["a red train"], 40, 3),
                          progress=lambda phase, step, total: phases.append(phase),
                          batch_size=2)
    assert {"encode", "invert", "sample takes 1-2", "sample take 3", "decode take 1",
            "decode take 3"} <= set(phases)
    assert "sample" not in phases


def test_transfer_takes_writes_a_video_and_frames_per_take_one_sidecar_and_a_contact_sheet(
        tmp_path, clip_path):
    import json

    import imageio.v3 as iio
    from PIL import Image

    from backend.cli import main, settings_flags
    from shared.sidecar import Sidecar

    out = tmp_path / "out.mp4"
    frames_dir = tmp_path / "frames"
    assert main(["transfer", str(clip_path), "--model", "tiny", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), *settings_flags(SMALL_SETTINGS),
                 "--seed", "4", "--takes", "2", "--prompt", "a red car", "--prompt", "a cat",
                 "-o", str(out), "--frames-dir", str(frames_dir)]) == 0
    assert not out.exists()
    for take in (1, 2, 3, 4):
        assert iio.imread(tmp_path / f"out-take{take}.mp4").shape[0] == 4
        assert len(list((frames_dir / f"take{take}").glob("*.png"))) == 4
    assert not (tmp_path / "out-take1.json").exists()  # one sidecar for every take
    sidecar = Sidecar.from_dict(json.loads((tmp_path / "out.json").read_text()))
    assert [(t["take"], t["prompt"], t["seed"], t["video"], t["frames_dir"])
            for t in sidecar.takes] == [
        (1, "a red car", 4, "out-take1.mp4", "frames/take1"),
        (2, "a red car", 5, "out-take2.mp4", "frames/take2"),
        (3, "a cat", 4, "out-take3.mp4", "frames/take3"),
        (4, "a cat", 5, "out-take4.mp4", "frames/take4")]
    assert sidecar.seed == 4 and sidecar.settings["prompt"] == "a red car"
    # Each entry is its take's own sidecar: what --from-take reads.
    assert [Sidecar.from_dict(t).settings["prompt"] for t in sidecar.takes] == [
        "a red car", "a red car", "a cat", "a cat"]
    shares = [t["cost"]["forward_equivalents"]["total"] for t in sidecar.takes]
    assert sidecar.cost["forward_equivalents"]["total"] == shares[0]
    sheet = Image.open(tmp_path / "out-contact.png")
    height, width = iio.imread(tmp_path / "out-take1.mp4").shape[1:3]
    scale = -(-192 // width)  # small frames are enlarged so their labels can be read
    assert sheet.size == (2 * scale * width, 2 * (scale * height + 14))  # seeds × prompts


def test_one_take_writes_exactly_what_it_always_did(tmp_path, clip_path):
    import json

    from backend.cli import main, settings_flags

    out = tmp_path / "out.mp4"
    assert main(["transfer", str(clip_path), "--model", "tiny", "--device", "cpu",
                 "--cache-dir", str(tmp_path / "cache"), *settings_flags(SMALL_SETTINGS),
                 "--prompt", "a red car", "-o", str(out)]) == 0
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_file()) == [
        "clip.mp4", "out.json", "out.mp4"]
    assert json.loads((tmp_path / "out.json").read_text())["takes"] is None
