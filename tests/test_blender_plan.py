"""The extension's plain-Python rules (no Blender needed): ranges, channels, names,
paths, retiming, settings, job updates, the settings snapshot, and the packaging helpers."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from types import SimpleNamespace

import pytest

import build  # the repository's build.py (stdlib only)
from backend.video import retime_indices as backend_retime_indices
from blender_addon import link, plan
from blender_addon.plan import Span, UserError
from blender_addon.strip_io import Snapshot
from shared.settings import TransferSettings
from tests.conftest import REPO_ROOT

# --------------------------------------------------------------------------- source checks


def test_nothing_selected_is_one_sentence():
    with pytest.raises(UserError, match="No strip is selected"):
        plan.check_source(None, "", None, False)


@pytest.mark.parametrize("strip_type", ["SOUND", "ADJUSTMENT"])
def test_strips_without_picture_are_refused(strip_type):
    with pytest.raises(UserError, match="shows no picture"):
        plan.check_source(strip_type, "s", Span(1, 1, 10), False)


def test_muted_and_single_frame_strips_are_refused():
    with pytest.raises(UserError, match="muted"):
        plan.check_source("MOVIE", "s", Span(1, 1, 10), True)
    with pytest.raises(UserError, match="at least 2 frames"):
        plan.check_source("IMAGE", "s", Span(1, 5, 6), False)
    plan.check_source("META", "s", Span(1, 5, 7), False)
    with pytest.raises(UserError, match="does not exist; relink"):
        plan.check_source("MOVIE", "s", Span(1, 5, 70), False, "/gone/clip.mp4")


# --------------------------------------------------------------------------- channels


def test_free_channel_is_first_empty_one_above_over_the_visible_range():
    source = Span(2, 10, 20)
    others = [source, Span(3, 15, 30), Span(4, 0, 5), Span(5, 19, 21)]
    # 3 overlaps; 4 ends before the source starts; so 4 is free.
    assert plan.free_channel_above(source, others) == 4


def test_touching_strips_do_not_overlap():
    source = Span(1, 10, 20)
    assert plan.free_channel_above(source, [Span(2, 0, 10), Span(2, 20, 30)]) == 2


def test_no_free_channel_is_a_user_error():
    source = Span(plan.MAX_CHANNEL - 1, 0, 10)
    with pytest.raises(UserError, match="Every channel above"):
        plan.free_channel_above(source, [Span(plan.MAX_CHANNEL, 5, 6)])


# --------------------------------------------------------------------------- frames and sizes


def test_all_visible_frames_render_when_under_the_limit():
    assert plan.frames_to_render(Span(1, 4, 9), 240) == [4, 5, 6, 7, 8]


def test_long_strips_are_sampled_evenly_keeping_both_ends():
    assert plan.frames_to_render(Span(1, 100, 1100), 5) == [100, 350, 600, 849, 1099]


@pytest.mark.parametrize(("size", "limit", "percent"), [
    ((1920, 1080), 768, 40), ((640, 360), 768, 100), ((100, 5000), 50, 1)])
def test_render_percentage_bounds_the_long_side(size, limit, percent):
    assert plan.render_percentage(*size, limit) == percent


@pytest.mark.parametrize(("count_in", "count_out"), [(4, 23), (24, 24), (30, 7), (1, 5)])
def test_retiming_matches_the_backend(count_in, count_out):
    assert plan.retime_indices(count_in, count_out) == \
        backend_retime_indices(count_in, count_out).tolist()


# --------------------------------------------------------------------------- names and paths


def test_strip_name_is_the_prompt_within_blenders_limit():
    assert plan.strip_name("  a  bear\nin snow ") == "a bear in snow"
    long_name = plan.strip_name("ü" * 100)
    assert len(long_name.encode()) <= plan.MAX_NAME_BYTES and long_name.endswith("…")
    assert plan.strip_name("   ") == "Understudy result"


def test_job_ids_are_safe_folder_names_and_unique():
    ids = {plan.new_job_id(now=0) for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"us-19700101-000000-[0-9a-f]{6}", job_id) for job_id in ids)
    assert not plan.is_safe_job_id("../x")


def test_result_folder_beside_a_saved_file_is_relative(tmp_path):
    folder, stored, temporary = plan.result_folder(str(tmp_path / "edit.blend"), "us-1", "/tmp")
    assert folder == str(tmp_path / "understudy" / "us-1")
    assert stored == "//understudy/us-1/" and not temporary


def test_result_folder_of_an_unsaved_file_is_temporary(tmp_path):
    folder, stored, temporary = plan.result_folder("", "us-1", str(tmp_path))
    assert folder == str(tmp_path / "understudy" / "us-1") and temporary
    assert stored.startswith(str(tmp_path))
    with pytest.raises(ValueError):
        plan.result_folder("", "../../etc", str(tmp_path))


def test_frame_file_names_are_numbered_in_order():
    assert plan.frame_file_names(3) == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]


# --------------------------------------------------------------------------- settings


def test_panel_ranges_come_from_the_shared_settings():
    assert plan.int_property_range("width") == {"default": 576, "min": 64, "max": 2048, "step": 8}
    # guided_steps is bounded by steps, so the panel allows steps' maximum
    assert plan.int_property_range("guided_steps")["max"] == plan.int_property_range("steps")["max"]
    for name in plan.PANEL_INT_SETTINGS:
        assert plan.int_property_range(name)["default"] == getattr(TransferSettings(prompt="x"), name)


def test_panel_refuses_unrunnable_settings_before_anything_is_sent():
    with pytest.raises(UserError, match="'steps' is 0"):
        plan.transfer_settings({"prompt": "a fox", "steps": 0}, 10)


def test_settings_sent_are_valid_backend_settings():
    values = {"prompt": "a fox", "source_prompt": " ", "negative_prompt": "", "seed": None,
              **{name: plan.int_property_range(name)["default"] for name in plan.PANEL_INT_SETTINGS}}
    settings = plan.transfer_settings(values, output_frames=23)
    assert settings["output_frames"] == 23
    assert "seed" not in settings and "source_prompt" not in settings
    assert "negative_prompt" not in settings
    parsed = TransferSettings.from_dict(settings)
    assert parsed.output_frames == 23 and parsed.seed is None


def test_short_strips_give_the_model_all_their_frames():
    values = {"prompt": "a fox", "num_frames": 24}
    assert plan.transfer_settings(values, 10, frames_sent=10)["num_frames"] == 10
    assert plan.transfer_settings(values, 100, frames_sent=100)["num_frames"] == 24


def test_empty_prompt_is_a_user_error():
    with pytest.raises(UserError, match="prompt is empty"):
        plan.transfer_settings({"prompt": "  "}, 10)


def test_panel_fields_are_backend_fields():
    names = {field.name for field in dataclasses.fields(TransferSettings)}
    assert set(plan.PANEL_INT_SETTINGS) <= names


# --------------------------------------------------------------------------- job updates


def test_progress_event_sets_phase_and_percent():
    update, fetch = plan.job_update({"type": "progress", "job_id": "j", "phase": "guide",
                                     "step": 5, "total": 20})
    assert update == {"status": "running", "phase": "guide", "percent": 25.0} and not fetch
    assert plan.progress_text("running", "guide", 25.0) == "guide 25%"


def test_result_ready_event_and_done_status_fetch():
    assert plan.job_update({"type": "result_ready", "job_id": "j"})[1]
    assert plan.job_update({"job_id": "j", "state": "done"})[1]


def test_failed_status_carries_the_servers_sentence():
    update, fetch = plan.job_update({"job_id": "j", "state": "failed",
                                     "error": {"code": "out_of_memory", "message": "Use fewer frames."}})
    assert update == {"status": "failed", "message": "Use fewer frames."} and not fetch


def test_cancelled_queued_and_unknown_updates():
    assert plan.job_update({"type": "cancelled"})[0]["status"] == "cancelled"
    assert plan.job_update({"state": "queued"})[0] == {"status": "submitted"}
    queued = plan.job_update({"type": "progress", "phase": "queued", "step": 0, "total": 1})[0]
    assert queued["status"] == "submitted"
    assert plan.job_update({"type": "something-new"}) == ({}, False)
    assert plan.progress_text("submitted", "", 0) == "queued"


def test_describe_server_reports_model_device_protocol():
    text = link.describe_server({"v": 1, "model": "tiny", "device": "cpu"})
    assert text == "Connected: model tiny on cpu, protocol 1."


def test_one_key_file_without_the_other_is_a_user_error():
    with pytest.raises(UserError, match="Set both"):
        link.load_keys(link.ServerConfig("tcp://127.0.0.1:1", server_key_file="/x/server.key"))
    assert link.load_keys(link.ServerConfig("tcp://127.0.0.1:1")) == {}


def test_missing_key_file_is_a_user_error(tmp_path):
    config = link.ServerConfig("tcp://127.0.0.1:1", str(tmp_path / "server.key"),
                               str(tmp_path / "client.key_secret"))
    with pytest.raises(UserError, match="no key file"):
        link.load_keys(config)


# --------------------------------------------------------------------------- snapshot


def test_snapshot_restores_everything_also_after_an_error():
    render = SimpleNamespace(percent=100, path="/out/", fmt="FFMPEG")
    snapshot = Snapshot()
    with pytest.raises(RuntimeError, match="render broke"):
        try:
            snapshot.set(render, "percent", 40)
            snapshot.remember(render, "path")
            render.path = "/tmp/x.png"
            snapshot.set(render, "fmt", "PNG")
            raise RuntimeError("render broke")
        finally:
            snapshot.restore()
    assert render == SimpleNamespace(percent=100, path="/out/", fmt="FFMPEG")


def test_snapshot_restores_the_oldest_value_of_an_attribute_set_twice():
    thing = SimpleNamespace(mute=False)
    snapshot = Snapshot()
    snapshot.set(thing, "mute", True)
    snapshot.set(thing, "mute", True)
    snapshot.restore()
    assert thing.mute is False


# --------------------------------------------------------------------------- packaging helpers


def test_vendored_package_must_import_itself_relatively(tmp_path):
    package = tmp_path / "shared"
    package.mkdir()
    (package / "good.py").write_text("import zmq\nfrom . import protocol\n")
    assert build.absolute_self_imports(package) == []
    (package / "bad.py").write_text("from shared.protocol import X\n")
    assert build.absolute_self_imports(package) == ["bad.py"]
    with pytest.raises(build.BuildError, match="from . import NAME"):
        build.vendor_package(package, tmp_path / "copy")
    assert build.absolute_self_imports(REPO_ROOT / "shared") == []


def test_manifest_lists_the_wheels():
    text = (REPO_ROOT / "blender_addon" / "blender_manifest.toml").read_text()
    filled = build.manifest_with_wheels(text, ["a.whl", "b.whl"])
    assert 'wheels = ["./wheels/a.whl", "./wheels/b.whl"]' in filled
    with pytest.raises(build.BuildError):
        build.manifest_with_wheels(filled, ["a.whl"])


def test_manifest_declares_id_versions_platforms_and_network():
    import tomllib

    manifest = tomllib.loads((REPO_ROOT / "blender_addon" / "blender_manifest.toml").read_text())
    assert manifest["id"] == "understudy" and manifest["type"] == "add-on"
    assert manifest["blender_version_min"] == "4.2.0"
    assert manifest["blender_version_max"] == "5.1.0"  # exclusive: 5.0.x is the last
    assert set(manifest["platforms"]) == set(build.WHEEL_PLATFORMS)
    assert manifest["permissions"]["network"]


def test_extension_modules_without_bpy_do_not_import_it():
    import subprocess

    code = ("import sys; import blender_addon.plan, blender_addon.link, blender_addon.strip_io, "
            "blender_addon.compat; print('bpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


# --------------------------------------------------------------------------- demo


def test_demo_contact_sheet_puts_source_above_result():
    import numpy as np

    from backend.blender_demo import contact_sheet

    source = np.zeros((24, 32, 64, 3), np.uint8)
    result = np.full((24, 32, 64, 3), 255, np.uint8)
    sheet = contact_sheet(source, result, columns=4, thumb_width=16)
    assert sheet.shape == (16, 64, 3)
    assert sheet[:8].max() == 0 and sheet[8:].min() == 255


def test_wheel_download_failure_is_one_clear_sentence(tmp_path, monkeypatch):
    # No index at all, as when PyPI cannot be reached: the build stops with a sentence.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(build.BuildError, match="Could not download the pyzmq .* check the network"):
        build.cached_wheels(sys.executable, "27.3.0", cache=tmp_path)
    assert not list(tmp_path.glob("*.whl"))


def test_cached_wheels_need_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    index = {}
    for platform in build.WHEEL_PLATFORMS:
        name = f"pyzmq-27.3.0-cp311-cp311-{platform}.whl"
        (tmp_path / name).write_bytes(b"wheel")
        index[f"pyzmq==27.3.0 {platform}"] = name
    (tmp_path / build.WHEEL_INDEX_NAME).write_text(json.dumps(index))
    wheels = build.cached_wheels(sys.executable, "27.3.0", cache=tmp_path)
    assert set(wheels) == set(build.WHEEL_PLATFORMS)
