"""The extension's plain-Python rules (blender_addon/rules/, no Blender needed): ranges,
channels, names, paths, retiming, settings, job updates, the server's hello and memory
plan, regions; the settings snapshot, and the packaging helpers."""

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
from blender_addon.connection import link
from blender_addon.job_flow import batches
from blender_addon.rules import (
    channels,
    frames,
    job_updates,
    memory_plan,
    messages,
    names,
    panel_settings,
    regions,
    server_hello,
    states,
)
from blender_addon.rules.channels import Span
from blender_addon.rules.errors import UserError
from blender_addon.rules.states import Phase, Status
from blender_addon.vse import placement, pngio
from blender_addon.vse.strip_io import Snapshot
from shared.errors import ErrorCode
from shared.protocol import JOB_ID_PATTERN, EventType, JobState, check_job_id
from shared.settings import TransferSettings
from tests.conftest import REPO_ROOT

# --------------------------------------------------------------------------- source checks


def test_nothing_selected_is_one_sentence():
    with pytest.raises(UserError, match="No strip is selected"):
        channels.check_source(None, "", None, False)


@pytest.mark.parametrize("strip_type", ["SOUND", "ADJUSTMENT"])
def test_strips_without_picture_are_refused(strip_type):
    with pytest.raises(UserError, match="shows no picture"):
        channels.check_source(strip_type, "s", Span(1, 1, 10), False)


def test_colour_strips_are_refused_in_one_sentence():
    with pytest.raises(UserError, match="colour strip, in which nothing moves"):
        channels.check_source("COLOR", "s", Span(1, 1, 10), False)


def test_muted_and_single_frame_strips_are_refused():
    with pytest.raises(UserError, match="muted"):
        channels.check_source("MOVIE", "s", Span(1, 1, 10), True)
    with pytest.raises(UserError, match="at least 2 frames"):
        channels.check_source("IMAGE", "s", Span(1, 5, 6), False)
    channels.check_source("META", "s", Span(1, 5, 7), False)
    with pytest.raises(UserError, match="does not exist; relink"):
        channels.check_source("MOVIE", "s", Span(1, 5, 70), False, "/gone/clip.mp4")


# --------------------------------------------------------------------------- channels


def strips_at(*spans: tuple[int, int, int], kind: str = "MOVIE") -> list[channels.Neighbour]:
    return [channels.Neighbour(f"{kind.lower()}-{index}", Span(*span), kind)
            for index, span in enumerate(spans)]


def test_free_channel_is_first_empty_one_above_over_the_visible_range():
    source = Span(2, 10, 20)
    others = [channels.Neighbour("source", source), *strips_at((3, 15, 30), (4, 0, 5), (5, 19, 21))]
    # 3 overlaps; 4 ends before the source starts; so 4 is free.
    assert channels.result_channel(source, "source", others) == 4


def test_touching_strips_do_not_overlap():
    source = Span(1, 10, 20)
    assert channels.result_channel(source, "s", strips_at((2, 0, 10), (2, 20, 30))) == 2


def test_no_free_channel_is_a_user_error_saying_what_to_do():
    source = Span(channels.MAX_CHANNEL - 1, 0, 10)
    with pytest.raises(UserError, match="Every channel above channel 127 .* free one then click"):
        channels.result_channel(source, "s", strips_at((channels.MAX_CHANNEL, 5, 6)),
                            then="then click Collect Results")


def test_a_source_on_the_top_channel_is_told_to_move_down():
    with pytest.raises(UserError, match="on channel 128, the top channel.*move it down") as error:
        channels.result_channel(Span(channels.MAX_CHANNEL, 0, 10), "s", [])
    assert "above 128" not in str(error.value)


def test_the_result_goes_below_the_adjustment_layer_that_grades_the_source():
    source = Span(2, 0, 50)
    others = [*strips_at((6, 0, 50), kind="ADJUSTMENT"), *strips_at((3, 0, 50))]
    assert channels.result_channel(source, "s", others) == 4


def test_no_room_below_the_adjustment_layer_is_refused_in_one_sentence():
    source = Span(2, 0, 50)
    others = strips_at((3, 10, 20), kind="ADJUSTMENT")
    with pytest.raises(UserError, match="no free channel between 's' .*adjustment layer "
                                        "'adjustment-0' .*move the adjustment layer up"):
        channels.result_channel(source, "s", others)
    # An adjustment layer below the source, or elsewhere in time, does not count.
    assert channels.result_channel(source, "s", strips_at((1, 0, 50), (3, 60, 70),
                                                       kind="ADJUSTMENT")) == 3


def test_an_effect_fed_by_the_source_is_refused_before_any_work():
    effect = channels.Neighbour("glow", Span(3, 0, 50), "GLOW", inputs=("s",))
    with pytest.raises(UserError, match="'glow' takes 's' as its input.*transfer 'glow' itself"):
        channels.result_channel(Span(2, 0, 50), "s", [effect])


# --------------------------------------------------------------------------- frames and sizes


def test_every_visible_frame_is_rendered():
    assert server_hello.frames_to_render(Span(1, 4, 9), 240) == [4, 5, 6, 7, 8]
    assert len(server_hello.frames_to_render(Span(1, 1, 61), 60)) == 60


def test_a_strip_over_the_servers_frame_limit_is_one_sentence_naming_the_limit():
    with pytest.raises(UserError, match=r"shows 61 frames .* at most 60 frames per job; trim") \
            as error:
        server_hello.frames_to_render(Span(1, 1, 62), 60)
    assert str(error.value).count(".") == 1 and str(error.value).endswith(".")


def test_the_frame_limit_comes_from_hello():
    assert server_hello.server_frame_limit({"limits": {"max_frames": 240}}) == 240
    assert server_hello.server_frame_limit({}) == panel_settings.SETTINGS.MAX_FRAMES_CEILING


def test_server_limits_are_checked_before_rendering():
    hello = {"limits": {"max_side": 512, "max_prompt_chars": 10, "max_queue": 2},
             "queue_length": 0}
    server_hello.check_server_limits(hello, {"prompt": "a fox"}, (512, 288))
    with pytest.raises(UserError, match="768x432 pixels .* at most 512 .* render size limit"):
        server_hello.check_server_limits(hello, {"prompt": "a fox"}, (768, 432))
    with pytest.raises(UserError, match="prompt is 20 characters long; shorten it to 10 or fewer"):
        server_hello.check_server_limits(hello, {"prompt": "x" * 20}, (64, 64))
    with pytest.raises(UserError, match="already has 2 jobs"):
        server_hello.check_server_limits({**hello, "queue_length": 2}, {"prompt": "a"}, (64, 64))


@pytest.mark.parametrize(("size", "limit", "percent"), [
    ((1920, 1080), 768, 40), ((640, 360), 768, 100), ((100, 5000), 50, 1)])
def test_render_percentage_bounds_the_long_side(size, limit, percent):
    assert frames.render_percentage(*size, limit) == percent


@pytest.mark.parametrize(("count_in", "count_out"), [(4, 23), (24, 24), (30, 7), (1, 5)])
def test_retiming_matches_the_backend(count_in, count_out):
    assert frames.retime_indices(count_in, count_out) == \
        backend_retime_indices(count_in, count_out).tolist()


# --------------------------------------------------------------------------- names and paths


def test_strip_name_is_the_prompt_within_blenders_limit():
    assert names.strip_name("  a  bear\nin snow ") == "a bear in snow"
    long_name = names.strip_name("ü" * 100)
    assert len(long_name.encode()) <= names.MAX_NAME_BYTES and long_name.endswith("…")
    assert names.strip_name("   ") == "Understudy result"


def test_job_ids_follow_the_protocols_rule_and_are_unique():
    ids = {names.new_job_id(now=0) for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"us-19700101-000000-[0-9a-f]{6}", job_id) for job_id in ids)
    assert all(check_job_id(job_id) == job_id for job_id in ids)


@pytest.mark.parametrize("job_id", ["../x", "..", ".", "a/b", "a\\b", "", "-x", "x" * 65])
def test_a_job_id_the_protocol_refuses_gets_no_folder(tmp_path, job_id):
    assert not JOB_ID_PATTERN.fullmatch(job_id)
    with pytest.raises(ValueError):
        names.result_folder(str(tmp_path / "edit.blend"), job_id, str(tmp_path))


def test_every_id_the_protocol_accepts_is_a_folder_inside_the_result_folder(tmp_path):
    for job_id in ("a..", "a.b-c_d", "9" * 64, "us-20261201-120000-abcdef"):
        folder, _, _ = names.result_folder(str(tmp_path / "edit.blend"), job_id, "")
        assert os.path.dirname(folder) == str(tmp_path / names.RESULT_FOLDER)


def test_result_folder_beside_a_saved_file_is_relative(tmp_path):
    folder, stored, temporary = names.result_folder(str(tmp_path / "edit.blend"), "us-1", "/tmp")
    assert folder == str(tmp_path / "understudy" / "us-1")
    assert stored == "//understudy/us-1/" and not temporary


def test_result_folder_of_an_unsaved_file_is_temporary(tmp_path):
    folder, stored, temporary = names.result_folder("", "us-1", str(tmp_path))
    assert folder == str(tmp_path / "understudy" / "us-1") and temporary
    assert stored.startswith(str(tmp_path))
    with pytest.raises(ValueError):
        names.result_folder("", "../../etc", str(tmp_path))


def test_frame_file_names_are_numbered_in_order():
    assert names.frame_file_names(3) == ["frame_00001.png", "frame_00002.png", "frame_00003.png"]


# --------------------------------------------------------------------------- settings


def test_panel_ranges_come_from_the_shared_settings():
    # The model's size is the server's (its hello): 0 in the panel means "the model's".
    assert panel_settings.int_property_range("width") == {"default": 0, "min": 0, "max": 2048}
    assert panel_settings.setting_from_panel("width", 0) is None and panel_settings.setting_from_panel("width", 832) == 832
    # guided_steps is bounded by steps, so the panel allows steps' maximum
    assert panel_settings.int_property_range("guided_steps")["max"] == panel_settings.int_property_range("steps")["max"]
    for name in panel_settings.PANEL_INT_SETTINGS:
        default = panel_settings.setting_from_panel(name, panel_settings.int_property_range(name)["default"])
        assert default == getattr(TransferSettings(prompt="x"), name)


def test_panel_refuses_unrunnable_settings_before_anything_is_sent():
    with pytest.raises(UserError, match="'steps' is 0"):
        panel_settings.transfer_settings({"prompt": "a fox", "steps": 0}, 10)


def test_settings_sent_are_valid_backend_settings():
    values = {"prompt": "a fox", "source_prompt": " ", "negative_prompt": "", "seed": None,
              **{name: panel_settings.setting_from_panel(name, panel_settings.int_property_range(name)["default"])
                 for name in panel_settings.PANEL_INT_SETTINGS}}
    settings = panel_settings.transfer_settings(values, frames_sent=23)
    assert settings["output_frames"] == settings["num_frames"] == 23
    assert "seed" not in settings and "source_prompt" not in settings
    assert "negative_prompt" not in settings
    parsed = TransferSettings.from_dict(settings)
    assert parsed.output_frames == 23 and parsed.seed is None


def test_every_frame_sent_is_edited_and_comes_back():
    for sent in (10, 60):  # no panel value limits it: one generated frame per source frame
        settings = panel_settings.transfer_settings({"prompt": "a fox", "num_frames": 24}, sent)
        assert settings["num_frames"] == settings["output_frames"] == sent


def test_empty_prompt_is_a_user_error():
    with pytest.raises(UserError, match="prompt is empty"):
        panel_settings.transfer_settings({"prompt": "  "}, 10)


def test_panel_fields_are_backend_fields():
    names = {field.name for field in dataclasses.fields(TransferSettings)}
    assert set(panel_settings.PANEL_INT_SETTINGS) <= names
    assert set(panel_settings.PANEL_CHOICE_SETTINGS) <= names


def test_the_framing_choice_comes_from_the_shared_settings():
    from shared import settings

    framing = panel_settings.choice_property("framing")
    assert [item[0] for item in framing["items"]] == list(settings.spec_of("framing").choices)
    assert framing["default"] == settings.DEFAULTS["framing"] == "fit"
    sent = panel_settings.transfer_settings({"prompt": "a fox", "framing": "crop"}, 8)
    assert TransferSettings.from_dict(sent).framing == "crop"
    assert "num_frames" not in panel_settings.PANEL_INT_SETTINGS  # set from the strip, not the panel


# --------------------------------------------------------------------------- job updates


def test_progress_event_sets_phase_and_percent():
    update, fetch = job_updates.job_update({"type": "progress", "job_id": "j", "phase": "guide",
                                     "step": 5, "total": 20})
    assert update == {"status": "running", "phase": "guide", "percent": 25.0} and not fetch
    assert messages.progress_text("running", "guide", 25.0) == "guide 25%"


def test_result_ready_event_and_done_status_fetch():
    assert job_updates.job_update({"type": "result_ready", "job_id": "j"})[1]
    assert job_updates.job_update({"job_id": "j", "state": "done"})[1]


def test_failed_status_carries_the_servers_sentence():
    update, fetch = job_updates.job_update({"job_id": "j", "state": "failed",
                                     "error": {"code": "out_of_memory", "message": "Use fewer frames."}})
    assert update == {"status": "failed", "message": "Use fewer frames."} and not fetch


def test_cancelled_queued_and_unknown_updates():
    assert job_updates.job_update({"type": "cancelled"})[0]["status"] == "cancelled"
    assert job_updates.job_update({"state": "queued"})[0] == {"status": "submitted"}
    queued = job_updates.job_update({"type": "progress", "phase": "queued", "step": 0, "total": 1})[0]
    assert queued["status"] == "submitted"
    assert job_updates.job_update({"type": "something-new"}) == ({}, False)
    assert messages.progress_text("submitted", "", 0) == "queued"
    assert messages.progress_text(Status.RENDERING, Phase.RENDERING, 25) == "rendering 25%"
    assert messages.progress_text(Status.PLACING, Phase.PLACING, 50) == "placing 50%"
    assert messages.progress_text("running", Phase.WAITING, 40) == "waiting for the server"
    assert messages.progress_text(Status.UNPLACED, "", 100) == "not placed"


def test_every_server_event_and_job_state_updates_the_record():
    """The extension reads the server's whole vocabulary (shared/protocol.py), not a copy."""
    for kind in [*({"type": event} for event in EventType),
                 *({"state": state} for state in JobState)]:
        update, fetch = job_updates.job_update({"job_id": "j", "step": 1, "total": 2, **kind})
        assert update["status"] in Status, kind
        assert fetch == (kind in ({"type": EventType.RESULT_READY}, {"state": JobState.DONE}))
    # A status the server decides is the server's word for it.
    for state in (JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        assert Status(state.value) == state
    assert states.ACTIVE == {Status.SUBMITTED, Status.RUNNING}


def test_the_extension_compares_statuses_only_through_the_vocabularies():
    """No module but rules/states.py writes a status or phase as bare text: each word has
    one place."""
    import ast

    words = ({*Status, *Phase, *JobState, *EventType, *ErrorCode} - {""}) | {"finished"}
    found = []
    addon = REPO_ROOT / "blender_addon"
    for path in sorted(addon.rglob("*.py")):
        if path == addon / "rules" / "states.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                values = [node.left, *node.comparators]
            elif isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Attribute | ast.Tuple) for target in node.targets):
                values = [node.value]
            else:
                continue
            for value in values:
                for item in (value.elts if isinstance(value, ast.Tuple | ast.Set | ast.List)
                             else [value]):
                    if isinstance(item, ast.Constant) and item.value in words:
                        found.append(f"{path.relative_to(addon)}:{node.lineno} {item.value!r}")
    assert found == []


def test_lost_server_message_names_collect_results():
    text = messages.lost_server_message("The server at tcp://x stopped answering.")
    assert "stopped answering; the job may still finish" in text and "Collect Results" in text
    assert text.count(".") == 0 or text.endswith(".")


@pytest.mark.parametrize(("status", "words"), [
    (Status.CANCELLED, "Cancelled j1."),  # queued on the server (or rendering here): at once
    (Status.RUNNING, "Cancelling j1: the server stops it at its next step."),
    (Status.SUBMITTED, "Cancelling j1"),
    (Status.FAILED, "already failed on the server"),  # ended before the cancel arrived
    (Status.DONE, "already finished on the server; its result is collected"),
    (Status.PLACING, "already finished on the server"),
    (Status.UNPLACED, "already finished on the server"),
])
def test_cancel_report_says_where_the_job_stands(status, words):
    assert words in messages.cancel_report("j1", status)


SIDECAR_V1 = {
    "version": 1, "settings": {"prompt": "a fox", "steps": 3, "guided_steps": None}, "seed": 5,
    "model": "tiny", "steps": 3, "guided_steps": 2, "device": "cpu", "dtype": "float32",
    "input_frame_indices": [0, 2, 4], "windows": [[0, 3]], "inversion_from_cache": True,
    "timings_s": {"sample": 1.25, "decode": 0.25}, "framing": None, "upscaler": None,
    "worker": None}


def test_sidecar_summary_says_the_steps_the_edit_used_not_the_request():
    # The request left the guided count automatic (None); the engine used 2.
    assert messages.sidecar_summary(SIDECAR_V1) == (
        "model tiny, seed 5, 3 steps, 2 guided, inversion from cache, 1.5 s on the server")


def test_sidecar_summary_shows_a_previews_cost():
    cost = {"forward_equivalents": {"invert": 0.0, "sample": 43.8, "decode": 0.0, "total": 43.8},
            "seconds": {"invert": 0.1, "sample": 1.2, "decode": 0.2, "total": 1.5},
            "truncated_pass_share": 0.66}
    preview = {**SIDECAR_V1, "settings": {**SIDECAR_V1["settings"], "quality": "preview"},
               "cost": cost}
    assert messages.sidecar_summary(preview) == (
        "model tiny, seed 5, 3 steps (preview), 2 guided, inversion from cache, cost 44 FE, "
        "1.5 s on the server")


def test_sidecar_summary_reads_an_older_sidecar_without_a_version():
    older = {key: value for key, value in SIDECAR_V1.items()
             if key not in ("version", "steps", "framing", "upscaler", "worker")}
    older["inversion_from_cache"] = False
    assert messages.sidecar_summary(older) == (
        "model tiny, seed 5, 3 steps, 2 guided, inversion computed, 1.5 s on the server")


def test_sidecar_summary_of_an_unreadable_sidecar_is_one_sentence():
    assert messages.sidecar_summary({**SIDECAR_V1, "version": 2}) == (
        "The result's sidecar has version 2, newer than this Understudy reads (1); update "
        "Understudy on this side.")
    assert messages.sidecar_summary({"model": "tiny", "seed": 7}) == (
        "The result's sidecar lacks 'settings'; it was not written by this Understudy's engine, "
        "so run the job again.")
    assert messages.sidecar_summary({}) == ""  # no result yet: nothing to say


def test_describe_server_reports_model_device_protocol():
    text = link.describe_server({"v": 1, "model": "tiny", "device": "cpu"})
    assert text == "Connected: model tiny on cpu, protocol 1."
    wan = {"v": 1, "model": "wan-tiny", "device": "cuda", "engine": {"backbone": {
        "name": "wan", "native_size": [832, 480], "window_frames": 81, "side_multiple": 16}}}
    assert link.describe_server(wan) == ("Connected: model wan-tiny (wan, 832x480, 81-frame "
                                         "windows) on cuda, protocol 1.")


def test_a_model_size_off_the_servers_grid_is_refused_before_rendering():
    hello = {"engine": {"backbone": {"name": "wan", "native_size": [832, 480], "side_multiple": 16}}}
    with pytest.raises(UserError, match="model width is 72 and the server's model takes multiples of 16"):
        server_hello.check_server_limits(hello, {"prompt": "x", "width": 72}, (64, 64))
    server_hello.check_server_limits(hello, {"prompt": "x", "width": 64}, (64, 64))
    server_hello.check_server_limits(hello, {"prompt": "x"}, (64, 64))  # the model's own size
    server_hello.check_server_limits({}, {"prompt": "x", "width": 72}, (64, 64))  # an older server


def test_one_key_file_without_the_other_is_a_user_error():
    with pytest.raises(UserError, match="Set both"):
        link.load_keys(link.ServerConfig("tcp://127.0.0.1:1", server_key_file="/x/server.key"))
    assert link.load_keys(link.ServerConfig("tcp://127.0.0.1:1")) == {}


def test_missing_key_file_is_a_user_error(tmp_path):
    config = link.ServerConfig("tcp://127.0.0.1:1", str(tmp_path / "server.key"),
                               str(tmp_path / "client.key_secret"))
    with pytest.raises(UserError, match="no key file") as caught:
        link.load_keys(config)
    assert caught.value.code == ErrorCode.BAD_KEY_FILE


@pytest.mark.parametrize("code", [ErrorCode.QUEUE_FULL, ErrorCode.TOO_BIG_FOR_GPU,
                                  ErrorCode.UNKNOWN_JOB, ErrorCode.SERVER_UNAVAILABLE])
def test_a_client_error_keeps_its_code_as_the_extensions_error(code):
    """link.guarded turns a client error into the extension's one sentence and keeps its
    code, so a caller can tell one failure from another."""
    def refused():
        raise link.client_api().error_from_reply({"code": code, "message": "Refused."})

    with pytest.raises(UserError, match="Refused.") as caught:
        link.guarded(refused)
    assert caught.value.code == code and isinstance(caught.value.__cause__, Exception)


# --------------------------------------------------------------------------- render batches


def run_ticks(renderer: batches.BatchRenderer, seconds_per_frame: float) -> list[list[int]]:
    """Drive the renderer as the timer does: each tick renders its batch at this speed."""
    ticks = []
    while not renderer.finished:
        batch = renderer.next_batch()
        ticks.append(batch)
        renderer.record(len(batch), seconds_per_frame * len(batch))
    return ticks


def test_first_tick_renders_one_frame_then_batches_fill_the_tick_budget():
    renderer = batches.BatchRenderer(list(range(1, 61)), tick_budget_s=0.1)
    ticks = run_ticks(renderer, seconds_per_frame=0.02)
    assert ticks[0] == [1]  # the bar moves after one frame, whatever the strip
    assert [len(batch) for batch in ticks[1:-1]] == [5] * 11
    assert sum(ticks, []) == list(range(1, 61))  # every frame once, in order
    assert renderer.complete and renderer.percent == 100.0


def test_slow_frames_still_render_one_per_tick():
    renderer = batches.BatchRenderer(list(range(10)), tick_budget_s=0.1)
    assert all(len(batch) == 1 for batch in run_ticks(renderer, seconds_per_frame=0.088))


def test_progress_counts_frames_rendered():
    renderer = batches.BatchRenderer(list(range(8)), tick_budget_s=0.1)
    renderer.record(len(renderer.next_batch()), 0.05)
    assert renderer.done == 1 and renderer.percent == 12.5
    assert renderer.next_batch() == [1, 2]  # 0.1 s at 0.05 s a frame


def test_cancel_takes_effect_between_batches():
    renderer = batches.BatchRenderer(list(range(30)), tick_budget_s=0.1)
    renderer.record(len(renderer.next_batch()), 0.01)
    renderer.cancel()
    assert renderer.finished and not renderer.complete
    assert renderer.next_batch() == [] and renderer.done == 1


def test_background_mode_renders_everything_in_one_batch():
    renderer = batches.BatchRenderer(list(range(5, 65)), tick_budget_s=None)
    assert run_ticks(renderer, seconds_per_frame=0.088) == [list(range(5, 65))]


def test_time_per_frame_follows_the_measurements():
    renderer = batches.BatchRenderer(list(range(100)), tick_budget_s=1.0)
    renderer.record(1, 0.5)
    renderer.record(1, 0.1)
    assert renderer.seconds_per_frame == pytest.approx(0.3)
    assert renderer.batch_size() == 3


# --------------------------------------------------------------------------- placement


def test_a_picture_result_covers_the_sources_area_whatever_its_size():
    source = placement.Placement(placement.PICTURE, 1920, 1080, scale_x=0.5, scale_y=0.5,
                                 offset_x=100.0, offset_y=-40.0, rotation=0.3, origin=(0.2, 0.7),
                                 crop=(192, 96, 108, 0), flip_x=True,
                                 blend_type="SCREEN", blend_alpha=0.6)
    look = placement.result_look(source, 576, 320)
    # Shown size on the canvas: result pixels x result scale == media pixels x source scale.
    assert 576 * look["scale_x"] == pytest.approx(1920 * 0.5)
    assert 320 * look["scale_y"] == pytest.approx(1080 * 0.5)
    assert look["crop"] == (58, 29, 32, 0)  # the same fraction of the picture, in result pixels
    assert (look["offset_x"], look["offset_y"], look["rotation"]) == (100.0, -40.0, 0.3)
    assert look["origin"] == (0.2, 0.7) and look["flip_x"] and not look["flip_y"]
    assert (look["blend_type"], look["blend_alpha"]) == ("SCREEN", 0.6)


def test_a_canvas_result_covers_the_canvas_and_keeps_only_the_blending():
    source = placement.Placement(placement.CANVAS, 1080, 1920, blend_type="ADD", blend_alpha=0.5)
    look = placement.result_look(source, 320, 576)
    assert (320 * look["scale_x"], 576 * look["scale_y"]) == pytest.approx((1080, 1920))
    assert look["crop"] == (0, 0, 0, 0) and look["offset_x"] == look["rotation"] == 0.0
    assert (look["blend_type"], look["blend_alpha"]) == ("ADD", 0.5)


def shown_columns(source: placement.Placement, canvas_width: int, left: int, width: int):
    """Where columns [left, left + width) of a canvas_width-wide result land across the
    source's displayed picture, in media pixels (the result placed by result_look)."""
    look = placement.result_look(source, canvas_width, 1)
    media_per_result = look["scale_x"] / source.scale_x
    return left * media_per_result, (left + width) * media_per_result


def test_a_fit_result_of_another_shape_covers_the_whole_picture():
    # 9:16 media sent at 432x768; fit within 576x320 pixels runs at 320x576 (not exactly 9:16).
    source = placement.Placement(placement.PICTURE, 1080, 1920, scale_x=0.5625, scale_y=0.5625)
    look = placement.result_look(source, 320, 576)
    shown = (320 * look["scale_x"], 576 * look["scale_y"])
    assert shown == pytest.approx((1080 * 0.5625, 1920 * 0.5625))  # 607.5 x 1080: the source's
    assert placement.result_canvas({"source_size": [432, 768], "crop_box": [0, 0, 432, 768],
                                    "result_size": [320, 576]}, 320, 576) is None


def test_a_crop_result_lies_over_its_box_and_nothing_else():
    # 1920x1080 media sent at 768x432; crop to a square model size: the centred 432x432 box.
    framing = {"mode": "crop", "source_size": [768, 432], "crop_box": [168, 0, 600, 432],
               "model_size": [64, 64], "result_size": [64, 64]}
    canvas = placement.result_canvas(framing, 64, 64)
    assert (canvas.height, canvas.top) == (64, 0)
    # The canvas has the frame's shape, the result its own pixels (not resampled) ...
    assert canvas.width / canvas.height == pytest.approx(768 / 432, abs=1 / 64)
    assert canvas.left + canvas.result_width <= canvas.width
    # ... and on the picture it covers the box's columns within a media pixel or two.
    source = placement.Placement(placement.PICTURE, 1920, 1080, scale_x=0.5, scale_y=0.5)
    start, end = shown_columns(source, canvas.width, canvas.left, canvas.result_width)
    assert abs(start - 168 * 1920 / 768) <= 2 and abs(end - 600 * 1920 / 768) <= 2
    # A 9:16 frame cropped to 16:9: a band across the middle, rows placed the same way.
    band = placement.result_canvas({"source_size": [54, 96], "crop_box": [0, 33, 54, 63]},
                                   576, 320)
    assert (band.left, band.width) == (0, 576)
    assert band.top == pytest.approx(33 * 320 / 30, abs=0.5)
    assert band.height == pytest.approx(96 * 320 / 30, abs=0.5)


@pytest.mark.parametrize("framing", [None, {}, {"source_size": [10, 10]},
                                     {"source_size": [10, 10], "crop_box": [0, 0, 20, 10]},
                                     {"source_size": "x", "crop_box": [0, 0, 5, 5]}])
def test_a_sidecar_without_a_usable_box_places_the_result_over_the_whole_frame(framing):
    assert placement.result_canvas(framing, 64, 64) is None


def test_a_result_frame_goes_on_its_transparent_canvas():
    import numpy as np

    pixels = np.full((2, 3, 4), 200, np.uint8)
    canvas = pngio.on_canvas(pixels, 7, 4, 2, 1)
    assert canvas.shape == (4, 7, 4)
    assert (canvas[1:3, 2:5] == 200).all()
    assert canvas[..., 3].sum() == 6 * 200  # transparent everywhere else


def test_movie_and_image_strips_send_their_own_picture():
    assert placement.mode_for("MOVIE") == placement.mode_for("IMAGE") == placement.PICTURE
    for kind in ("SCENE", "META", "TEXT", "TRANSFORM", "CROSS"):
        assert placement.mode_for(kind) == placement.CANVAS


def test_placement_survives_the_job_record():
    source = placement.Placement(placement.PICTURE, 160, 128, scale_x=0.5, crop=(1, 2, 3, 4))
    assert placement.Placement.from_json(source.to_json()) == source


# --------------------------------------------------------------------------- PNG


def test_rgba_png_round_trips_through_pillow():
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    data = pngio.encode_rgba(pixels)
    assert pngio.png_size(data) == (7, 5)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGBA"
        assert (np.asarray(image) == pixels).all()


def test_alpha_is_resampled_to_the_result_size():
    import numpy as np

    alpha = np.zeros((128, 160), np.uint8)
    alpha[32:96, 40:120] = 255  # a centred box, half of each side
    small = pngio.resize_nearest(alpha, 64, 64)
    assert small.shape == (64, 64)
    assert small[16:48, 16:48].min() == 255 and small[:16].max() == 0 and small[:, 48:].max() == 0


# --------------------------------------------------------------------------- regions (issue 20)


def test_a_region_that_cannot_mark_a_subject_is_one_sentence_before_rendering():
    source = Span(2, 10, 30)
    assert regions.check_region(regions.REGION_NONE, "", "clip", source) is None
    assert regions.check_region(regions.REGION_MASK, "Dog", "clip", source, shapes=4) == regions.Region(
        regions.REGION_MASK, "Dog")
    assert regions.check_region(regions.REGION_STRIP, "matte", "clip", source,
                             matte=Span(5, 1, 40)).label == "the matte strip 'matte'"
    refusals = [
        (dict(kind=regions.REGION_MASK, name=""), "no mask is chosen"),
        (dict(kind=regions.REGION_MASK, name="Dog"), "The mask 'Dog' has no shapes"),
        (dict(kind=regions.REGION_STRIP, name=""), "no strip is chosen"),
        (dict(kind=regions.REGION_STRIP, name="gone"), "'gone' is not in this scene"),
        (dict(kind=regions.REGION_STRIP, name="clip", matte=source), "cannot be its own matte"),
        # The frame count: the matte must show every frame of the strip.
        (dict(kind=regions.REGION_STRIP, name="short", matte=Span(5, 10, 29)),
         "shows frames 10-28 but 'clip' shows frames 10-29"),
    ]
    for arguments, words in refusals:
        with pytest.raises(UserError, match=re.escape(words)) as caught:
            regions.check_region(source_name="clip", source=source, **arguments)
        assert str(caught.value).endswith(".") and ". " not in str(caught.value)


def test_a_rendered_region_must_fit_the_frames_mark_a_subject_and_keep_a_plate():
    import numpy as np

    region = regions.Region(regions.REGION_MASK, "Dog")
    black, white = np.zeros((4, 6), np.uint8), np.full((4, 6), 255, np.uint8)
    half, under = black.copy(), black.copy()
    half[:, :3] = regions.SUBJECT_GREY  # half way to white is the subject
    under[:, :3] = regions.SUBJECT_GREY - 1
    frames = [regions.MatteFrame.of(grey) for grey in (black, half)]
    assert frames[1] == regions.MatteFrame(6, 4, subject=True, plate=True)
    regions.check_region_frames(region, frames, (6, 4))  # one frame with a subject is enough
    cases = [([black, black], (6, 4), "The mask 'Dog' is black in every frame"),
             ([white, white], (6, 4), "The mask 'Dog' is white over the whole picture"),
             ([under, under], (6, 4), "black in every frame"),  # 127 is not the subject
             ([half, half], (5, 4), "rendered at 6x4, not at the strip's 5x4")]
    for greys, size, words in cases:
        with pytest.raises(UserError, match=re.escape(words)):
            regions.check_region_frames(region, [regions.MatteFrame.of(grey) for grey in greys], size)


def test_the_extensions_subject_grey_is_the_engines_region_threshold():
    from backend.masks import REGION_THRESHOLD

    assert regions.SUBJECT_GREY == round(REGION_THRESHOLD * 255 + 0.5)  # 127.5 → 128


def test_a_matte_is_its_brightest_channel_over_black():
    import numpy as np

    rgba = np.array([[[255, 255, 255, 255], [255, 255, 255, 0], [0, 200, 10, 255],
                      [255, 0, 0, 128]]], np.uint8)
    assert pngio.matte_grey(rgba).tolist() == [[255, 0, 200, 128]]


def test_grey_png_round_trips_through_pillow():
    import io

    import numpy as np
    from PIL import Image

    grey = np.random.default_rng(1).integers(0, 256, (5, 7), dtype=np.uint8)
    with Image.open(io.BytesIO(pngio.encode_grey(grey))) as image:
        assert image.mode == "L" and (np.asarray(image) == grey).all()


def test_the_layer_over_the_source_gives_the_servers_composite():
    import numpy as np

    # Hand values: m = 0 (the plate), ½ (the feathered edge), 1 (the subject).
    source = np.array([[[100, 100, 100], [100, 0, 200], [10, 20, 30]]], np.uint8)
    generated = np.array([[[7, 7, 7], [200, 100, 0], [250, 240, 230]]], np.float32)
    alpha = np.array([[0, 128, 255]], np.uint8)
    weight = alpha[..., None] / 255.0
    composite = np.rint(weight * generated + (1 - weight) * source).astype(np.uint8)
    layer = pngio.layer_over_source(np.dstack([composite, alpha]), source)
    assert layer[0, 0].tolist() == [0, 0, 0, 0]  # transparent: the source shows
    assert layer[0, 2].tolist() == [250, 240, 230, 255]  # the generated subject
    assert np.abs(layer[0, 1, :3].astype(int) - [200, 100, 0]).max() <= 1  # gen, to rounding
    # Over the source (straight alpha) the layer gives the composite back, to rounding;
    # laying the composite itself over the source would mix the edge twice.
    over = weight * layer[..., :3] + (1 - weight) * source
    assert np.abs(over - composite).max() <= 0.5
    twice = weight * composite + (1 - weight) * source
    assert np.abs(twice - composite).max() > 20


def test_a_mask_renders_on_a_free_channel():
    others = [channels.Neighbour("a", Span(128, 1, 50)), channels.Neighbour("b", Span(127, 60, 90))]
    assert channels.free_channel(Span(2, 10, 30), others) == 127
    busy = [channels.Neighbour(f"s{channel}", Span(channel, 1, 50)) for channel in range(1, 129)]
    with pytest.raises(UserError, match="Every channel is taken between frames 10 and 29"):
        channels.free_channel(Span(2, 10, 30), busy)


def test_a_region_goes_only_to_a_server_that_announces_it_takes_regions():
    region = regions.Region(regions.REGION_MASK, "Dog")
    settings = {"prompt": "a fox"}
    server_hello.check_server_limits({"limits": {"max_regions": 8}}, settings, (96, 64), region)
    server_hello.check_server_limits({"limits": {}}, settings, (96, 64))  # no region: as before
    with pytest.raises(UserError, match=re.escape(
            "The server does not take regions (it is older than this extension), so it "
            "cannot keep the plate outside the mask 'Dog'; update the server")):
        server_hello.check_server_limits({"limits": {"max_side": 4096}}, settings, (96, 64), region)


def test_the_panel_says_how_a_region_was_used():
    assert messages.region_summary({}) == ""
    assert messages.region_summary({"regions": {"count": 1, "grow": 16, "feather": 8,
                                            "motion": "subject", "composited": True}}) == (
        "1 region(s), grown 16 px, feathered 8 px: the plate is kept outside")
    assert "whole frame was regenerated" in messages.region_summary(
        {"regions": {"count": 0, "motion": "camera", "composited": False}})


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

    rules = sorted(f"blender_addon.rules.{path.stem}"
                   for path in (REPO_ROOT / "blender_addon" / "rules").glob("*.py"))
    plain = [*rules, "blender_addon.connection.link", "blender_addon.connection.install",
             "blender_addon.connection.lock", "blender_addon.connection.process",
             "blender_addon.vse.strip_io", "blender_addon.vse.compat",
             "blender_addon.vse.placement", "blender_addon.vse.pngio",
             "blender_addon.job_flow.batches"]
    code = f"import sys; import {', '.join(plain)}; print('bpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False", out.stderr


def extension_imports() -> dict[str, set[str]]:
    """module -> the extension's modules it imports (function-local imports included), by
    dotted name under blender_addon ("job_flow.jobs")."""
    import ast

    root = REPO_ROOT / "blender_addon"
    modules = {".".join(path.relative_to(root).with_suffix("").parts): path
               for path in root.rglob("*.py")}
    modules = {name.removesuffix(".__init__").removesuffix("__init__"): path
               for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue  # the extension imports itself only relatively
            base = package[:len(package) - (node.level - 1)] + (node.module or "").split(".")
            prefix = ".".join(part for part in base if part)
            for alias in node.names:
                for target in (f"{prefix}.{alias.name}".strip("."), prefix):
                    if target in modules and target != name:
                        found.add(target)
                        break
        graph[name] = found
    return graph


def test_the_extensions_imports_run_one_way():
    """No import circle in the extension, and the job flow's steps import neither jobs.py
    nor each other: jobs.py calls them and records what came of them."""
    graph = extension_imports()
    assert "job_flow.jobs" in graph and graph["job_flow.jobs"] >= {
        "job_flow.rendering", "job_flow.following", "job_flow.collecting"}
    steps = {"job_flow.rendering", "job_flow.following", "job_flow.collecting"}
    for step in steps:
        assert not graph[step] & (steps | {"job_flow.jobs"}), (step, graph[step])
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


# --------------------------------------------------------------------------- demo


def test_demo_contact_sheet_puts_source_above_result():
    import numpy as np

    from backend.tools.blender_demo import contact_sheet

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


# --------------------------------------------------------------------------- Make Room


def test_the_refusal_under_a_grade_names_its_source_for_make_room():
    with pytest.raises(channels.NoRoomUnderGrade) as caught:
        channels.result_channel(Span(2, 0, 50), "s", strips_at((3, 0, 50), kind="ADJUSTMENT"))
    assert caught.value.source_name == "s" and isinstance(caught.value, UserError)


def test_make_room_moves_the_grade_and_everything_above_it_over_the_frames_up_one():
    source = Span(2, 10, 50)
    others = [channels.Neighbour("s", source),
              channels.Neighbour("grade", Span(3, 0, 60), "ADJUSTMENT"),
              channels.Neighbour("title", Span(4, 20, 30), "TEXT"),
              channels.Neighbour("logo", Span(6, 0, 15)),  # above, though nothing lands on it
              channels.Neighbour("later", Span(4, 70, 90)),  # not over the source's frames
              channels.Neighbour("below", Span(1, 0, 60))]
    moves = channels.make_room(source, "s", others)
    assert moves == [("logo", 7), ("title", 5), ("grade", 4)]  # highest first
    # After the moves the result has channel 3, under the grade.
    moved = dict(moves)
    after = [channels.Neighbour(o.name, Span(moved.get(o.name, o.span.channel), o.span.start,
                                         o.span.end), o.type) for o in others]
    assert channels.result_channel(source, "s", after) == 3


def test_make_room_also_moves_what_a_moved_strip_would_land_on():
    source = Span(1, 0, 10)
    others = [channels.Neighbour("grade", Span(2, 0, 30), "ADJUSTMENT"),
              channels.Neighbour("tail", Span(3, 25, 40)),  # after the source, but on the grade's way
              channels.Neighbour("tail top", Span(4, 35, 50)),
              channels.Neighbour("apart", Span(3, 45, 60))]  # meets nothing that moves
    assert channels.make_room(source, "s", others) == [("tail top", 5), ("tail", 4), ("grade", 3)]


def test_make_room_without_a_grade_in_the_way_moves_nothing():
    assert channels.make_room(Span(2, 0, 10), "s", strips_at((3, 0, 10))) == []
    assert channels.make_room(Span(2, 0, 10), "s", strips_at((3, 20, 30), kind="ADJUSTMENT")) == []


def test_make_room_at_the_top_channel_is_one_sentence():
    others = [channels.Neighbour("grade", Span(channels.MAX_CHANNEL, 0, 10), "ADJUSTMENT")]
    with pytest.raises(UserError, match="'grade' is on channel 128, the top channel"):
        channels.make_room(Span(channels.MAX_CHANNEL - 1, 0, 10), "s", others)


# --------------------------------------------------------------------------- GPU memory


GPU = {"name": "NVIDIA L4", "total_bytes": 24 * 2**30, "free_bytes": 23 * 2**30,
       "budget_bytes": 23 * 2**30, "assumed": False}


def test_the_servers_gpu_in_one_line():
    assert server_hello.gpu_text({"gpu": GPU}) == "GPU NVIDIA L4, 24.0 GiB (23.0 GiB free)"
    assert server_hello.gpu_text({"gpu": {**GPU, "name": "assumed 16 GiB", "total_bytes": 16 * 2**30,
                                  "assumed": True}}) == "GPU assumed 16 GiB, 16.0 GiB"
    assert server_hello.gpu_text({"gpu": None}) == server_hello.gpu_text({}) == ""


def test_the_memory_line_sets_the_predicted_peak_against_the_servers_gpu():
    fits = {"type": "plan", "gpu": GPU, "fits": True, "peak_bytes": 30 * 2**30,
            "predicted_peak_bytes": int(12.8 * 2**30),
            "savers": ["gradient_checkpointing", "vae_slice_1"], "message": None}
    assert memory_plan.memory_line(fits) == ("Predicted peak 12.8 GiB of 23.0 GiB GPU memory, with "
                                      "gradient checkpointing, vae slice 1.")
    assert memory_plan.memory_line({**fits, "savers": []}) == "Predicted peak 12.8 GiB of 23.0 GiB GPU memory."
    refusal = "This edit needs about 30.0 GiB of GPU memory even with every saver on, and 23.0 GiB are free; edit fewer frames per window (--window-frames), a smaller --width/--height, or use a GPU with more memory."
    assert memory_plan.memory_line({**fits, "fits": False, "message": refusal}) == refusal
    assert memory_plan.memory_line({**fits, "predicted_peak_bytes": None}) == (
        "Not planned (memory 'off'); the server's GPU has 23.0 GiB.")
    assert memory_plan.memory_line({"type": "plan", "gpu": None, "fits": True}) == (
        "The server has no GPU to plan for (it runs on a CPU).")


# --------------------------------------------------------------------------- the Look (issue 28)


def test_a_look_goes_only_to_a_server_whose_model_takes_references():
    from blender_addon.rules.look import (
        LOOK_FILE,
        LOOK_NONE,
        check_look,
        check_look_size,
        look_refusal,
        look_text,
        server_takes,
    )

    assert server_takes({"max_references": 3}) == 3
    assert server_takes({}) == server_takes({"max_references": True}) == server_takes(None) == 0
    for hello in ({"max_references": 0}, {}):  # none, or an older server that does not say
        with pytest.raises(UserError, match="The server's model takes no reference image") as caught:
            check_look(hello, True)
        assert str(caught.value).count(". ") == 0 and str(caught.value).endswith(".")
    check_look({}, False)  # no Look: any server
    check_look({"max_references": 3}, True)
    assert look_refusal({"max_references": 1}, True) is None
    check_look_size(16, 4096, "'x'")
    with pytest.raises(UserError, match="8x40 pixels, too small"):
        check_look_size(8, 40, "'x'")
    with pytest.raises(UserError, match="at most 4096 pixels"):
        check_look_size(4097, 40, "'x'")
    assert look_text(LOOK_NONE, "") == "The prompt alone gives the look"
    assert look_text(LOOK_FILE, "") == "Pick the picture of the new subject's look"
    assert look_text(LOOK_FILE, "a.png") == "The look from the file 'a.png'"
