"""The panel's Look end to end: the built extension in a real headless Blender (5.0 and
4.2 LTS) takes the new subject's look from an image strip at the current frame and sends
it with the job to a real server running the tiny Wan VACE; a server whose model takes
no reference is refused in one sentence before anything is rendered."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.blender_support import blender_lts_python, build_extension, make_clip, run_blender
from tests.server_support import ServerProcess


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> str:
    return str(build_extension(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(make_clip(tmp_path_factory.mktemp("clip") / "walk.mp4"))


@pytest.fixture(scope="module")
def look(tmp_path_factory) -> str:
    """A picture of the new subject: a yellow disc on blue, 48×40."""
    rows, columns = np.mgrid[:40, :48]
    pixels = np.zeros((40, 48, 3), np.uint8)
    pixels[...] = (30, 60, 200)
    pixels[(rows - 20) ** 2 + (columns - 24) ** 2 < 144] = (250, 220, 30)
    path = tmp_path_factory.mktemp("look") / "look.png"
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture(scope="module")
def vace_server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("vace-server") / "state", "--model",
                            "wan-vace-tiny").start()
    yield process
    process.stop()


@pytest.mark.parametrize("version", ["5.0", "4.2"])
def test_the_look_from_an_image_strip_reaches_the_server_and_the_result_lands(
        extension_zip, clip, look, vace_server, tmp_path, version):
    import sys

    python = sys.executable if version == "5.0" else blender_lts_python()
    result = run_blender({"scenario": "look", "zip": extension_zip, "clip": clip, "look": look,
                          "address": vace_server.address}, tmp_path, python=python)
    assert result["blender_version"][:2] == [int(part) for part in version.split(".")]
    assert result["outcome"]["ok"], result["outcome"]
    [new] = result["new_strips"]
    assert new["type"] == "IMAGE"
    [job] = result["jobs"]
    assert job["status"] == "done" and job["result_strip"] == new["name"]
    folder = vace_server.state_dir / "jobs" / job["job_id"]
    [sent] = sorted((folder / "references").glob("*.png"))
    with Image.open(sent) as picture:  # the strip's picture, as Blender read it
        assert picture.size == (48, 40)
        assert np.array_equal(np.asarray(picture.convert("RGB")),
                              np.asarray(Image.open(look).convert("RGB")))
    request = json.loads((folder / "request.json").read_text())
    assert request["settings"]["reference_strength"] == pytest.approx(0.8)


def test_a_look_to_a_server_whose_model_takes_none_is_one_sentence_before_rendering(
        extension_zip, clip, look, tmp_path):
    server = ServerProcess(tmp_path / "state").start()  # the tiny ZeroScope: no references
    try:
        result = run_blender({"scenario": "look", "zip": extension_zip, "clip": clip,
                              "look": look, "address": server.address}, tmp_path)
        assert not result["outcome"]["ok"]
        assert "The server's model takes no reference image" in result["outcome"]["error"]
        assert result["new_strips"] == [] and result["jobs"] == []
        assert not list((server.state_dir / "jobs").iterdir())
    finally:
        server.stop()
