"""Video in and out: every supported container, frame choice and retiming."""

from __future__ import annotations

import imageio.v3 as iio
import numpy as np
import pytest

from backend.errors import BadClipError
from backend.video import (
    check_frames,
    read_clip,
    resize_frames,
    retime_frames,
    retime_indices,
    sample_indices,
    write_frames_dir,
)
from tests.conftest import moving_square_frames


@pytest.mark.parametrize("suffix, options", [
    (".mp4", {"fps": 12, "codec": "libx264"}),
    (".mov", {"fps": 12, "codec": "libx264"}),
    (".mkv", {"fps": 12, "codec": "libx264"}),
    (".webm", {"fps": 12, "codec": "libvpx-vp9"}),
    (".gif", {"duration": 100, "loop": 0}),
])
def test_reads_every_supported_container(tmp_path, suffix, options):
    frames = moving_square_frames(6, 64, 48)
    path = tmp_path / f"clip{suffix}"
    iio.imwrite(path, frames, **options)
    clip = read_clip(path)
    assert clip.frames.shape == (6, 48, 64, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(10.0 if suffix == ".gif" else 12.0)
    # Lossy codecs blur the noisy backdrop, but the bright square stays where it was.
    for read, written in zip(clip.frames, frames, strict=True):
        square = written.sum(-1) > 400
        assert read[square].mean() > 150 and read[~square].mean() < 80


def test_reads_numbered_frames_in_numeric_order(tmp_path):
    frames = moving_square_frames(11, 32, 32)
    for index, frame in enumerate(frames):  # 0.png … 10.png: text order would put 10 after 1
        iio.imwrite(tmp_path / f"{index}.png", frame)
    assert np.array_equal(read_clip(tmp_path).frames, frames)
    write_frames_dir(frames, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["00000.png", "00001.png"]


def test_sample_indices_spread_evenly_or_take_a_range():
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(24, 24).tolist() == list(range(24))
    assert sample_indices(10, 3, start=5).tolist() == [5, 6, 7]
    with pytest.raises(BadClipError, match="has 3 frames but 4"):
        sample_indices(3, 4)
    with pytest.raises(BadClipError, match="Frames 8…10 were asked for"):
        sample_indices(10, 3, start=8)


def test_retime_holds_frames():
    assert retime_indices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert retime_indices(24, 10).tolist() == [0, 2, 4, 7, 9, 12, 14, 16, 19, 21]
    frames = np.arange(3)[:, None, None, None] * np.ones((3, 2, 2, 3), np.uint8)
    assert retime_frames(frames, 5)[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2]


def test_check_frames_normalises_and_refuses():
    grey = np.zeros((3, 20, 20), dtype=np.uint8)
    assert check_frames(grey).shape == (3, 20, 20, 3)
    rgba_float = np.ones((2, 20, 20, 4), dtype=np.float32)
    out = check_frames(rgba_float)
    assert out.dtype == np.uint8 and out.shape == (2, 20, 20, 3) and out.max() == 255
    with pytest.raises(BadClipError, match="only 1 frame"):
        check_frames(np.zeros((1, 20, 20, 3), np.uint8))
    with pytest.raises(BadClipError, match="no frames"):
        check_frames([])


def test_resize_stretches_to_the_model_size():
    assert resize_frames(moving_square_frames(2, 96, 64), 576, 320).shape == (2, 320, 576, 3)
