"""`python build.py` packaging: per-platform zips with the vendored client and pyzmq wheels,
accepted by Blender's own extension tooling, installed and enabled in a real headless Blender."""

from __future__ import annotations

import tomllib
import zipfile

import pytest

from tests.blender_support import build_extension, run_blender


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    output = tmp_path_factory.mktemp("dist")
    build_extension(output)
    return output


def test_one_zip_per_platform_each_with_its_wheel(dist):
    zips = {path.name: path for path in dist.glob("*.zip")}
    assert sorted(zips) == ["understudy-0.1.0-linux_x64.zip", "understudy-0.1.0-macos_arm64.zip",
                            "understudy-0.1.0-macos_x64.zip", "understudy-0.1.0-windows_x64.zip"]
    expected_tags = {"linux_x64": "manylinux", "windows_x64": "win_amd64",
                     "macos_arm64": "macosx", "macos_x64": "macosx"}
    for name, path in zips.items():
        with zipfile.ZipFile(path) as archive:
            manifest = tomllib.loads(archive.read("blender_manifest.toml").decode())
            generated = manifest["build"]["generated"]  # Blender's per-platform section
            assert generated["platforms"] == [name.split("-")[-1][:-4].replace("_", "-")]
            wheels = generated["wheels"]
            assert len(wheels) == 1 and "cp311" in wheels[0]
            assert expected_tags[name.split("-")[-1][:-4]] in wheels[0]
            assert wheels[0][2:] in archive.namelist()


def test_zip_vendors_the_client_with_relative_imports(dist):
    with zipfile.ZipFile(dist / "understudy-0.1.0-linux_x64.zip") as archive:
        names = archive.namelist()
        assert {"__init__.py", "shared/client.py", "shared/protocol.py",
                "rules/channels.py", "job_flow/jobs.py", "vendored.py"} <= set(names)
        assert not [name for name in names if "__pycache__" in name or name.startswith("tests")]
        client = archive.read("shared/client.py").decode()
        assert "from shared" not in client and "from . import protocol" in client


def test_zip_installs_and_enables_in_blender(dist, tmp_path):
    result = run_blender({"scenario": "install",
                          "zip": str(dist / "understudy-0.1.0-linux_x64.zip")}, tmp_path)
    assert result["operators"] == [True, True, True, True]
    assert result["panel"] and result["scene_settings"] == 50
    assert result["address"] == "tcp://127.0.0.1:5555"
    assert result["client_module"] == "bl_ext.user_default.understudy.shared.client"
    assert result["disabled"] and not result["panel_after_disable"]


def test_panel_and_preferences_draw(dist, tmp_path):
    log = run_blender({"scenario": "draw", "zip": str(dist / "understudy-0.1.0-linux_x64.zip")},
                      tmp_path)
    assert {"prompt", "source_prompt", "use_random_seed", "seed", "steps", "guided_steps",
            "guidance_iterations", "negative_prompt", "framing", "takes"} <= set(log["props"])
    # No frame count to set: the panel says every visible frame of the strip is sent.
    assert "num_frames" not in log["props"]
    assert "Sends every visible frame of the active strip" in log["labels"]
    assert {"server_address", "server_key_file", "client_key_file", "timeout_s"} <= set(log["props"])
    # The backend on this computer: its project, settings and buttons; its state in the panel.
    assert {"backend_kind", "project_path", "local_model", "local_device", "local_state_dir",
            "local_cache_dir", "vae_slice", "gradient_checkpointing", "start_when_needed",
            "keep_running"} <= set(log["props"])
    assert {"understudy.transfer", "understudy.cancel", "understudy.collect",
            "understudy.test_connection", "understudy.backend_start", "understudy.backend_stop",
            "understudy.backend_restart", "understudy.check_memory"} <= set(log["operators"])
    assert "GPU memory: not checked yet" in log["labels"]  # the predicted peak, once checked
    assert "Backend stopped" in log["labels"]
    assert log["progress"] == [["rendering 25%", 0.25], ["guide 40%", 0.4]]
    assert log["lists"] == ["understudy_jobs"] and "Seed 7" in log["labels"]
    # The selected job's sidecar: the guided count used, not the request's automatic None.
    assert ("model tiny, seed 7, 3 steps, 2 guided, inversion from cache, 1.5 s on the server"
            in log["labels"])
    # Keep the plate: the region by name, its settings, and how the selected job used it.
    assert {"region_kind", "region_strip", "region_grow", "region_feather",
            "motion"} <= set(log["props"])
    assert "Changes only inside the matte 'dog matte'" in log["labels"]
    # The Look: its kind, the image (with its thumbnail), its strength, named in one line.
    assert {"look_kind", "look_image", "reference_strength"} <= set(log["props"])
    assert "The look from the image 'mascot sheet'" in log["labels"]
    assert ("1 region(s), grown 16 px, feathered 8 px: the plate is kept outside"
            in log["labels"])
