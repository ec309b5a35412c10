"""Framing and upscaling through a real job server on loopback (tests/server_support.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from backend.cli import settings_flags
from backend.video import decode_pngs, encode_png
from shared.client import Client, JobRejected
from tests.conftest import REPO_ROOT, moving_square_frames
from tests.server_support import QUICK_SETTINGS, ServerProcess, settings, subprocess_env
from tests.test_cli import write_png_folder

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
PHONE = moving_square_frames(4, 72, 128)  # 9:16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("framing-server") / "state").start()
    yield process
    process.stop()


def test_a_9_16_clip_comes_back_9_16_and_the_sidecar_says_how(server):
    with Client(server.address, timeout_s=30.0) as client:
        assert client.hello()["engine"]["upscaler"] is None  # this server cannot upscale
        client.submit("phone", settings(width=128, height=72), [encode_png(f) for f in PHONE])
        result = client.wait("phone", timeout_s=WAIT_S)
    assert decode_pngs(result.frames).shape == (4, 128, 72, 3)
    assert result.sidecar["framing"] == {
        "mode": "fit", "source_size": [72, 128], "crop_box": [0, 0, 72, 128],
        "model_size": [72, 128], "upscale_size": None, "result_size": [72, 128]}


def test_upscaling_on_a_server_without_an_upscaler_is_refused_at_submit(server):
    with Client(server.address, timeout_s=30.0) as client, pytest.raises(JobRejected) as caught:
        client.submit("no-xl", settings(upscale="xl", steps=2, inversion_steps=2), [encode_png(f) for f in PHONE])
    assert "hf download cerspense/zeroscope_v2_XL" in str(caught.value)
    assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")


def test_crop_through_the_server_lands_where_the_source_was(server, tmp_path):
    """The server returns the box alone; the command line puts it back into the source."""
    folder = write_png_folder(tmp_path / "phone", PHONE)
    flags = settings_flags({**QUICK_SETTINGS, "width": 128, "height": 72})
    result = subprocess.run(
        [sys.executable, "-m", "backend", "transfer", str(folder), "--prompt", "a heron", *flags,
         "--framing", "crop", "--server", server.address, "-o", str(tmp_path / "o.mp4"),
         "--frames-dir", str(tmp_path / "frames")],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    written = np.stack([iio.imread(path) for path in sorted((tmp_path / "frames").glob("*.png"))])
    sidecar = json.loads((tmp_path / "o.json").read_text())
    assert sidecar["framing"]["crop_box"] == [0, 44, 72, 84]
    assert written.shape == PHONE.shape
    assert np.array_equal(written[:, :44], PHONE[:, :44]) and np.array_equal(written[:, 84:], PHONE[:, 84:])


def test_a_server_with_an_upscaler_says_so_and_doubles_the_size(tmp_path):
    upscaling = ServerProcess(tmp_path / "state", "--upscale-model", "tiny").start()
    try:
        with Client(upscaling.address, timeout_s=30.0) as client:
            assert client.hello()["engine"]["upscaler"] == "tiny"
            square = [encode_png(frame) for frame in moving_square_frames(6, 64, 64)]
            client.submit("xl", settings(upscale="xl", steps=2, inversion_steps=2, upscale_width=128,
                                         upscale_height=128), square)
            result = client.wait("xl", timeout_s=WAIT_S)
            with pytest.raises(JobRejected, match="--framing crop"):  # refused before it queues
                client.submit("wide", settings(), [encode_png(f) for f in moving_square_frames(4, 296, 64)])
    finally:
        upscaling.stop()
    assert decode_pngs(result.frames).shape == (4, 128, 128, 3)
    assert result.sidecar["framing"]["upscale_size"] == [128, 128]
    assert result.sidecar["upscaler"] == {"model": "tiny", "steps": 1}
