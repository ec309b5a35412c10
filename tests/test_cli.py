"""`python -m backend transfer` end to end, and every bad-input path, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from backend.cli import settings_flags
from backend.video import write_video
from tests.conftest import REPO_ROOT, SMALL_SETTINGS, moving_square_frames

SMALL_FLAGS = settings_flags(SMALL_SETTINGS)


def backend(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


def assert_one_sentence_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_transfer_end_to_end_through_from_pretrained(tmp_path, clip_path, tiny_model_dir):
    out = tmp_path / "out.mp4"
    cache = tmp_path / "cache"
    common = [str(clip_path), "--model", str(tiny_model_dir), "--seed", "1",
              "--cache-dir", str(cache), *SMALL_FLAGS]
    first = backend("transfer", *common, "--prompt", "a red car", "-o", str(out),
                    "--frames-dir", str(tmp_path / "frames"))
    assert first.returncode == 0, first.stderr
    frames = iio.imread(out)
    assert frames.shape == (4, 48, 72, 3)  # fit: the clip's 3:2 within 64×64 pixels
    assert len(list((tmp_path / "frames").glob("*.png"))) == 4
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert sidecar["seed"] == 1 and sidecar["model"] == str(tiny_model_dir)
    assert sidecar["inversion_from_cache"] is False
    assert sidecar["settings"]["prompt"] == "a red car"

    second = backend("transfer", *common, "--prompt", "a blue train", "-o", str(tmp_path / "b.mp4"),
                     "--match-length")
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "b.json").read_text())["inversion_from_cache"] is True
    assert iio.imread(tmp_path / "b.mp4").shape[0] == 8  # retimed to the clip's 8 frames


def test_tiny_model_command_writes_diffusers_layout(tmp_path):
    result = backend("tiny-model", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "m" / part).is_dir()
    assert (tmp_path / "m" / "model_index.json").exists()


@pytest.mark.parametrize("make_clip, fragments", [
    (lambda d: d / "missing.mp4", ["no clip at"]),
    (lambda d: (d / "garbage.mp4").write_bytes(b"\x00garbage" * 50) and d / "garbage.mp4",
     ["Could not read garbage.mp4"]),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", ["not a supported clip"]),
    (lambda d: (d / "empty").mkdir() or d / "empty", ["no png or jpg frames"]),
    (lambda d: write_video(moving_square_frames(2), d / "short.mp4") or d / "short.mp4",
     ["has 2 frames but 4 are needed"]),
])
def test_bad_clips_end_in_one_sentence(tmp_path, make_clip, fragments):
    clip = make_clip(tmp_path)
    result = backend("transfer", str(clip), "--prompt", "x", "--model", "tiny", *SMALL_FLAGS,
                     "-o", str(tmp_path / "o.mp4"), "--cache-dir", str(tmp_path / "c"))
    assert_one_sentence_error(result, *fragments)
    assert not (tmp_path / "o.mp4").exists()


def test_absurd_resolution_is_refused(tmp_path):
    folder = tmp_path / "thin"
    folder.mkdir()
    for index in range(4):
        iio.imwrite(folder / f"{index}.png", np.zeros((8, 300, 3), dtype=np.uint8))
    result = backend("transfer", str(folder), "--prompt", "x", "--model", "tiny",
                     "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, "300×8")


def test_bad_settings_and_outputs_end_in_one_sentence(tmp_path, clip_path):
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model", "tiny",
                     "--width", "100", "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, "multiple of 8")
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model", "tiny",
                     "-o", str(tmp_path / "o.avi"))
    assert_one_sentence_error(result, "must end in .mp4")
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model", "tiny",
                     "--cache-max-gb", "-1", "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, "--cache-max-gb is -1.0; give a positive size")
    for no_prompt in ((), ("--prompt", "  ")):  # the settings' one check and wording
        result = backend("transfer", str(clip_path), *no_prompt, "--model", "tiny",
                         "-o", str(tmp_path / "o.mp4"))
        assert_one_sentence_error(result, "The prompt is empty; describe what the subject "
                                  "should become.")


def test_missing_weights_name_the_fetch_command(tmp_path, clip_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = backend("transfer", str(clip_path), "--prompt", "x", "--device", "cpu",
                     "--model", "cerspense/zeroscope_v2_576w", "-o", str(tmp_path / "o.mp4"),
                     env=offline)
    assert_one_sentence_error(result, "hf download cerspense/zeroscope_v2_576w",
                              "--model on the command line or the Model setting")
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model",
                     str(tmp_path / "no-such-folder"), "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, "no model folder")


def test_cuda_on_a_machine_without_it_is_one_sentence(tmp_path, clip_path):
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on GPU machines too.
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model", "tiny",
                     "--device", "cuda", "-o", str(tmp_path / "o.mp4"),
                     env={"CUDA_VISIBLE_DEVICES": ""})
    assert_one_sentence_error(result, "no usable CUDA GPU")


def test_a_60_frame_clip_gives_60_generated_frames_and_over_the_limit_one_sentence(tmp_path):
    from tests.synthetic import textured_clip

    clip = tmp_path / "long.mp4"
    write_video(textured_clip((1, 0), frames=60, size=(64, 64)), clip, fps=24)
    flags = settings_flags({k: v for k, v in SMALL_SETTINGS.items() if k != "num_frames"})
    common = [str(clip), "--model", "tiny", "--seed", "2", "--cache-dir", str(tmp_path / "c"), *flags]
    result = backend("transfer", *common, "--prompt", "a red car", "-o", str(tmp_path / "o.mp4"),
                     "--frames-dir", str(tmp_path / "frames"))
    assert result.returncode == 0, result.stderr
    frames = np.stack([iio.imread(path) for path in sorted((tmp_path / "frames").glob("*.png"))])
    assert frames.shape == (60, 64, 64, 3)  # every frame of the clip, each one generated
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["input_frame_indices"] == list(range(60))
    assert sidecar["windows"] == [[0, 24], [12, 36], [24, 48], [36, 60]]
    assert iio.immeta(tmp_path / "o.mp4")["fps"] == pytest.approx(24)

    over = backend("transfer", *common, "--prompt", "a red car", "--frame-limit", "50",
                   "-o", str(tmp_path / "over.mp4"))
    assert_one_sentence_error(over, "60 frames is more than the limit of 50", "--frame-limit")


# ---------------------------------------------------------------- framing and upscaling

PORTRAIT_FLAGS = settings_flags({**SMALL_SETTINGS, "width": 128, "height": 72})  # a 16:9 budget


def write_png_folder(folder, frames):
    """A lossless clip: numbered PNGs, so written pixels compare exactly."""
    folder.mkdir()
    for index, frame in enumerate(frames):
        iio.imwrite(folder / f"{index:03d}.png", frame)
    return folder


def test_a_9_16_clip_gives_a_9_16_result(tmp_path):
    clip = tmp_path / "phone.mp4"
    write_video(moving_square_frames(4, 72, 128), clip)
    result = backend("transfer", str(clip), "--prompt", "a heron", "--model", "tiny", *PORTRAIT_FLAGS,
                     "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4"))
    assert result.returncode == 0, result.stderr
    assert iio.imread(tmp_path / "o.mp4").shape == (4, 128, 72, 3)  # 72×128: 9:16, as the clip
    assert json.loads((tmp_path / "o.json").read_text())["framing"] == {
        "mode": "fit", "source_size": [72, 128], "crop_box": [0, 0, 72, 128],
        "model_size": [72, 128], "upscale_size": None, "result_size": [72, 128]}


def test_crop_writes_the_source_frames_with_the_edit_in_its_box(tmp_path):
    source = moving_square_frames(4, 72, 128)
    folder = write_png_folder(tmp_path / "phone", source)
    result = backend("transfer", str(folder), "--prompt", "a heron", "--model", "tiny", *PORTRAIT_FLAGS,
                     "--framing", "crop", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4"),
                     "--frames-dir", str(tmp_path / "frames"))
    assert result.returncode == 0, result.stderr
    written = np.stack([iio.imread(path) for path in sorted((tmp_path / "frames").glob("*.png"))])
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["framing"]["crop_box"] == [0, 44, 72, 84]
    assert sidecar["framing"]["model_size"] == [128, 72]
    assert written.shape == source.shape  # the source's own size
    assert np.array_equal(written[:, :44], source[:, :44]) and np.array_equal(written[:, 84:], source[:, 84:])
    assert not np.array_equal(written[:, 44:84], source[:, 44:84])  # the edit sits in the box
    assert iio.imread(tmp_path / "o.mp4").shape == source.shape


def test_upscale_xl_doubles_the_size_and_keeps_the_frame_count(tmp_path):
    from backend.backbones.zeroscope import save_tiny_model

    upscaler = tmp_path / "tiny-xl"
    save_tiny_model(upscaler, seed=1)
    clip = tmp_path / "square.mp4"
    write_video(moving_square_frames(8, 64, 64), clip)
    result = backend("transfer", str(clip), "--prompt", "a heron", "--model", "tiny", *SMALL_FLAGS,
                     "--upscale", "xl", "--upscale-model", str(upscaler), "--upscale-width", "128",
                     "--upscale-height", "128", "--cache-dir", str(tmp_path / "c"),
                     "-o", str(tmp_path / "o.mp4"))
    assert result.returncode == 0, result.stderr
    assert iio.imread(tmp_path / "o.mp4").shape == (4, 128, 128, 3)
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["framing"]["model_size"] == [64, 64]
    assert sidecar["framing"]["upscale_size"] == sidecar["framing"]["result_size"] == [128, 128]
    assert sidecar["upscaler"] == {"model": str(upscaler), "steps": 2}


def test_upscale_without_its_weights_fails_before_any_work_naming_the_download(tmp_path, clip_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = backend("transfer", str(clip_path), "--prompt", "x", "--model", "tiny", *SMALL_FLAGS,
                     "--upscale", "xl", "-o", str(tmp_path / "o.mp4"), env=offline)
    assert_one_sentence_error(result, "hf download cerspense/zeroscope_v2_XL", "--upscale-model")
    assert "encode" not in result.stderr and not (tmp_path / "o.mp4").exists()  # no phase began


def test_a_clip_wider_than_4_to_1_is_one_sentence_suggesting_crop(tmp_path):
    folder = write_png_folder(tmp_path / "wide", moving_square_frames(4, 296, 64))
    result = backend("transfer", str(folder), "--prompt", "x", "--model", "tiny", *SMALL_FLAGS,
                     "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.mp4"))
    assert_one_sentence_error(result, "296x64", "--framing crop")
    assert "encode" not in result.stderr


# ---------------------------------------------------------------- the Wan backbone


def test_a_60_frame_clip_on_tiny_wan_gives_60_generated_frames_and_its_re_edit_hits_the_cache(
        tmp_path, tiny_wan_dir):
    from tests.synthetic import textured_clip

    clip = tmp_path / "long.mp4"
    write_video(textured_clip((1, 0), frames=60, size=(64, 64)), clip, fps=16)
    flags = settings_flags({k: v for k, v in SMALL_SETTINGS.items() if k != "num_frames"})
    # A 21-frame window is 6 latent frames, so the clip's 16 latent frames take 4 windows.
    common = [str(clip), "--model", str(tiny_wan_dir), "--seed", "2", "--window-frames", "21",
              "--cache-dir", str(tmp_path / "c"), *flags]
    result = backend("transfer", *common, "--prompt", "a red car", "-o", str(tmp_path / "o.mp4"),
                     "--frames-dir", str(tmp_path / "frames"))
    assert result.returncode == 0, result.stderr
    frames = np.stack([iio.imread(path) for path in sorted((tmp_path / "frames").glob("*.png"))])
    assert frames.shape == (60, 64, 64, 3)  # every frame of the clip, each one generated
    assert all(not np.array_equal(a, b) for a, b in zip(frames, frames[1:], strict=False))
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["backbone"] == "wan" and sidecar["input_frame_indices"] == list(range(60))
    assert sidecar["windows"] == [[0, 6], [3, 9], [6, 12], [10, 16]]  # latent frames of 61
    assert sidecar["inversion_from_cache"] is False
    again = backend("transfer", *common, "--prompt", "a blue bus", "-o", str(tmp_path / "b.mp4"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "b.json").read_text())["inversion_from_cache"] is True


def test_missing_wan_weights_name_the_fetch_command(tmp_path, clip_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = backend("transfer", str(clip_path), "--prompt", "x", "--device", "cpu",
                     "--model", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "-o", str(tmp_path / "o.mp4"),
                     env=offline)
    assert_one_sentence_error(result, "hf download Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
