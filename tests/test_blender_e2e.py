"""End to end: the built extension in a real headless Blender against a real server process
(`python -m backend serve --model tiny`). Each scenario runs in its own bpy process."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.client import Client, JobCancelledError
from tests.blender_support import blender_lts_python, build_extension, make_clip, run_blender
from tests.conftest import REPO_ROOT
from tests.server_support import (
    LONG,
    NO_WARM_UP,
    ServerProcess,
    clip_pngs,
    settings,
    unused_address,
    wait_for_event,
)


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> str:
    return str(build_extension(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(make_clip(tmp_path_factory.mktemp("clip") / "walk.mp4"))


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory) -> str:
    return str(make_clip(tmp_path_factory.mktemp("long-clip") / "walk60.mp4", frames=60,
                         width=64, height=64))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("server") / "state").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """Sleeps at every step, so a job is still running when the test cancels it."""
    process = ServerProcess(tmp_path_factory.mktemp("slow-server") / "state",
                            "--test-step-delay", "0.5").start()
    yield process
    process.stop()


def jobs_on(server: ServerProcess) -> set[str]:
    """The jobs the server has accepted (its state folder holds one folder per job)."""
    return {path.name for path in (server.state_dir / "jobs").iterdir()}


def assert_nothing_reached(server: ServerProcess, jobs_before: set[str]) -> None:
    """No job arrived since `jobs_before` was taken. A subset, not equality: a job of an
    earlier test finishing meanwhile may prune an old folder of this module-wide server."""
    assert jobs_on(server) <= jobs_before


def assert_source_unchanged(result: dict) -> None:
    before = {s["name"]: s for s in result["before"]["strips"]}
    after = {s["name"]: s for s in result["after"]["strips"]}
    for name, state in before.items():
        assert after[name] == state, name
    for key in ("frames", "render", "view"):
        assert result["after"][key] == result["before"][key], key


def assert_result_strip(result: dict, source_name: str, channel: int) -> dict:
    assert result["outcome"]["ok"], result["outcome"]
    source = next(s for s in result["before"]["strips"] if s["name"] == source_name)
    [new] = result["new_strips"]
    assert new["type"] == "IMAGE" and new["name"] == "a red fox"
    assert new["channel"] == channel
    assert new["frame_final_start"] == source["frame_final_start"]
    assert new["frame_final_duration"] == source["frame_final_duration"]
    [job] = result["jobs"]
    assert job["status"] == "done" and job["result_strip"] == new["name"] and job["seed"] != ""
    return new


@pytest.fixture(params=["5.0", "4.2"])
def blender(request) -> tuple[str, list[int]]:
    """Which Blender runs the scenario: the bpy 5.0 wheel here, or 4.2 LTS beside it."""
    if request.param == "5.0":
        return sys.executable, [5, 0]
    return blender_lts_python(), [4, 2]


def test_trimmed_movie_strip_round_trip(extension_zip, clip, server, tmp_path, blender):
    python, version = blender
    blend = tmp_path / "project" / "edit.blend"
    blend.parent.mkdir()
    # Guided steps 0 in the panel: automatic, so the request says None and the engine
    # picks 2 of the 3 steps; the summary must say what was used.
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "save": str(blend), "blocker": True,
                          "settings": {"guided_steps": 0}},
                         tmp_path, python=python)
    assert result["blender_version"][:2] == version
    source = next(s for s in result["before"]["strips"] if s["name"] == "source")
    assert (source["frame_offset_start"], source["frame_offset_end"]) == (3.0, 4.0)
    # Channel 3 holds a strip overlapping the source, so the result goes to 4.
    new = assert_result_strip(result, "source", channel=4)
    job_id = result["jobs"][0]["job_id"]
    assert new["directory"] == f"//understudy/{job_id}/"
    frames = sorted((blend.parent / "understudy" / job_id).glob("frame_*.png"))
    assert [f.name for f in frames] == new["elements"]
    assert len(frames) == source["frame_final_duration"] == 23
    assert frames[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The server's sidecar is kept beside the frames, and the panel's summary reads it.
    sidecar = json.loads((blend.parent / "understudy" / job_id / "sidecar.json").read_text())
    assert sidecar["version"] == 1
    assert sidecar["model"] == "tiny" and str(sidecar["seed"]) == result["jobs"][0]["seed"]
    assert sidecar["settings"]["guided_steps"] is None  # the request: automatic
    assert (sidecar["steps"], sidecar["guided_steps"]) == (3, 2)  # what the edit used
    seconds = sum(sidecar["timings_s"].values())
    cost = sidecar["cost"]["forward_equivalents"]["total"]
    assert cost > 0
    assert result["jobs"][0]["summary"] == (
        f"model tiny, seed {sidecar['seed']}, 3 steps, 2 guided, inversion computed, "
        f"cost {cost:.0f} FE, {seconds:.1f} s on the server")
    assert not (blend.parent / "understudy" / job_id / "source").exists()  # frames sent: gone
    assert_source_unchanged(result)


def test_sixty_frame_strip_gives_sixty_generated_frames(extension_zip, long_clip, server,
                                                        tmp_path):
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": long_clip,
                          "address": server.address, "trim": [0, 0]}, tmp_path)
    new = assert_result_strip(result, "source", channel=3)
    assert new["frame_final_duration"] == 60
    folder = Path(result["jobs"][0]["frames_path"])
    files = [folder / name for name in new["elements"]]
    assert len(files) == 60
    # One generated frame per source frame: no frame is held (held frames are identical).
    assert len({file.read_bytes() for file in files}) == 60
    assert_source_unchanged(result)


def test_strip_over_the_servers_frame_limit_is_one_sentence_before_rendering(
        extension_zip, clip, tmp_path):
    limited = ServerProcess(tmp_path / "limited", "--max-frames", "20").start()
    try:
        result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                              "address": limited.address}, tmp_path)
        assert jobs_on(limited) == set()  # nothing reached the server
    finally:
        limited.stop()
    error = result["outcome"]["error"].strip()
    assert error == ("Error: 'source' shows 23 frames and the server edits at most 20 frames per "
                     "job; trim the strip or cut it into parts of 20 frames or fewer.")
    assert result["after"] == result["before"] and result["new_strips"] == []


@pytest.mark.parametrize("kind", ["meta", "scene"])
def test_meta_and_scene_strips_as_source(extension_zip, clip, server, tmp_path, kind, blender):
    python, version = blender
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "kind": kind}, tmp_path, python=python)
    assert result["blender_version"][:2] == version
    source_name = result["source"]
    source = next(s for s in result["before"]["strips"] if s["name"] == source_name)
    assert source["type"] == kind.upper()
    new = assert_result_strip(result, source_name, channel=source["channel"] + 1)
    # Unsaved file: the frames go to a temporary folder and the job says so.
    assert "temporary folder" in result["jobs"][0]["message"]
    assert Path(new["directory"], new["elements"][0]).is_file()
    assert_source_unchanged(result)


def test_image_sequence_result_takes_its_place_on_the_canvas(extension_zip, clip, server,
                                                             tmp_path, blender):
    from PIL import Image

    python, _ = blender
    images = tmp_path / "images"
    images.mkdir()
    for index in range(12):  # 40x30 frames, a bright square moving right
        frame = Image.new("RGB", (40, 30), (20, 40, 120))
        frame.paste((250, 200, 0), (3 * index, 10, 3 * index + 8, 18))
        frame.save(images / f"shot_{index:03d}.png")
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "kind": "images", "images": str(images)},
                         tmp_path, python=python)
    new = assert_result_strip(result, "images", channel=4)
    source = next(s for s in result["before"]["strips"] if s["name"] == "images")
    # The 40x30 picture shows 36x its size on the 1920x1080 canvas; the result frames (framing
    # fit: its 4:3 within 64x64 pixels is 72x56) are scaled to cover the same 1440x1080 area.
    assert source["transform"][:2] == [36.0, 36.0]
    assert new["transform"][:2] == pytest.approx([36.0 * 40 / 72, 36.0 * 30 / 56], abs=1e-4)
    assert new["frame_final_duration"] == 12
    assert_source_unchanged(result)


def test_interface_renders_in_batches_then_follows_progress(extension_zip, clip, server,
                                                            tmp_path):
    jobs_before = jobs_on(server)
    result = run_blender({"scenario": "interface_polling", "zip": extension_zip, "clip": clip,
                          "address": server.address, "out": str(tmp_path)}, tmp_path)
    ticks = result["ticks"]
    assert result["render_timer"] and result["timer_registered"]
    # The first tick renders one frame: the bar moves (and Cancel answers) from the start.
    assert ticks[0]["frames"] == 1 and ticks[0]["percent"] == pytest.approx(100 / 23)
    assert [tick["frames"] for tick in ticks] == sorted(tick["frames"] for tick in ticks)
    assert len(ticks) > 2 and ticks[-1]["status"] == "submitted"
    # Between ticks the scene is as the editor left it (nothing muted, nothing moved).
    assert all(tick["scene_as_before"] for tick in ticks)
    assert_result_strip(result, "source", channel=3)
    # Observed per server message applied, not per tick: the server always reports
    # progress (at least its "save" step) before result_ready, however fast the job runs
    # (a warm cache, an idle queue), so the record shows running before placing.
    applied = [status for _, status in result["applied"]]
    assert "running" in applied and "placing" in applied, result["applied"]
    assert applied.index("running") < applied.index("placing")
    statuses = [status for status, _, _ in result["seen"]]
    assert statuses.index("placing") < statuses.index("done"), result["seen"]
    assert_source_unchanged(result)
    # Cancelled after its first batch: stopped before the next, nothing sent or kept.
    cancel = result["cancel"]
    assert cancel["outcome"]["ok"] and cancel["rendered"] == 1 < cancel["total"]
    assert cancel["tick_after"] is None and cancel["job"]["status"] == "cancelled"
    assert not cancel["folder_left"]
    assert len(jobs_on(server) - jobs_before) == 1  # the first job only
    # A file saved mid-render and reopened: the job was never sent, and says so.
    reopened = result["reopened"]
    assert reopened["before"] == "rendering" and reopened["job"]["status"] == "cancelled"
    assert "nothing was sent" in reopened["job"]["message"] and reopened["render_timer_idle"]


def test_server_down_is_one_sentence_and_changes_nothing(extension_zip, clip, tmp_path):
    with unused_address() as address:  # held bound (not listening) for the whole run
        result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                              "address": address, "timeout_s": 1.0}, tmp_path)
    assert not result["outcome"]["ok"]
    assert "Could not reach a server" in result["outcome"]["error"]
    assert "Traceback" not in result["outcome"]["error"]
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_nothing_selected_is_one_sentence(extension_zip, clip, server, tmp_path):
    result = run_blender({"scenario": "nothing_selected", "zip": extension_zip, "clip": clip,
                          "address": server.address}, tmp_path)
    assert not result["outcome"]["ok"]
    assert "No strip is selected" in result["outcome"]["error"]
    assert result["after"] == result["before"]


def test_rejected_job_is_one_sentence_and_changes_nothing(extension_zip, clip, server, tmp_path):
    # More guided steps than steps: the server's settings check rejects the job.
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address,
                          "settings": {"steps": 2, "guided_steps": 5}}, tmp_path)
    assert not result["outcome"]["ok"]
    assert "guided_steps" in result["outcome"]["error"]
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_cancel_a_running_job(extension_zip, clip, slow_server, tmp_path):
    # Cancel once the server reports progress: the job stops at its next step, and
    # Collect Results waits for that.
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": slow_server.address, "wait": False, "cancel": True,
                          "cancel_once_running": True,
                          "settings": {"steps": 30, "inversion_steps": 30}}, tmp_path)
    outcome = result["outcome"]
    assert outcome["ok"] and outcome["cancel"]["ok"] and outcome["collect"]["ok"], outcome
    assert outcome["cancelled_job"]["status"] == "running"
    assert outcome["cancelled_job"]["message"].startswith("Cancelling")
    [job] = result["jobs"]
    assert job["status"] == "cancelled"
    assert result["new_strips"] == []
    assert_source_unchanged(result)


def test_cancel_a_job_still_queued(extension_zip, clip, slow_server, tmp_path):
    # Another job runs first, so Cancel reaches this one while it waits: the server
    # cancels it at once, and Collect Results, with nothing left to wait for, says so.
    # (A loaded machine gave this order to the test above before it waited for progress.)
    with Client(slow_server.address) as other:
        other.submit("ahead-of-the-transfer", settings(**LONG), clip_pngs(6))
        wait_for_event(other, "ahead-of-the-transfer", "progress")
        try:
            result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                                  "address": slow_server.address, "wait": False,
                                  "cancel": True}, tmp_path)
        finally:
            other.cancel("ahead-of-the-transfer")
            with pytest.raises(JobCancelledError):
                other.wait("ahead-of-the-transfer", timeout_s=300)
    outcome = result["outcome"]
    assert outcome["ok"] and outcome["cancel"]["ok"] and outcome["collect"]["ok"], outcome
    assert outcome["cancelled_job"]["status"] == "cancelled"
    [job] = result["jobs"]
    assert job["status"] == "cancelled"
    assert result["new_strips"] == []
    assert_source_unchanged(result)


def test_reopening_a_file_collects_a_finished_job(extension_zip, clip, server, tmp_path):
    blend = tmp_path / "project" / "edit.blend"
    blend.parent.mkdir()
    first = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                         "address": server.address, "wait": False, "save_after": str(blend)},
                        tmp_path)
    [job] = first["jobs"]
    assert job["status"] == "submitted" and first["new_strips"] == []
    # Meanwhile (Blender closed) the job finishes on the server.
    client = Client(server.address)
    try:
        client.wait(job["job_id"], timeout_s=120)
    finally:
        client.close()

    reopened = run_blender({"scenario": "reopen", "zip": extension_zip, "blend": str(blend),
                            "address": server.address}, tmp_path)
    [job_after] = reopened["jobs"]
    assert job_after["status"] == "done"
    result_strip = next(s for s in reopened["strips"] if s["name"] == job_after["result_strip"])
    assert result_strip["type"] == "IMAGE" and result_strip["channel"] == 3
    assert result_strip["frame_final_duration"] == job["length"] == 23
    assert (blend.parent / "understudy" / job["job_id"] / "frame_00023.png").is_file()


def test_test_connection_reports_model_device_protocol(extension_zip, server, tmp_path):
    result = run_blender({"scenario": "test_connection", "zip": extension_zip,
                          "address": server.address}, tmp_path)
    assert result["outcome"]["ok"]
    assert result["report"] == ("Connected: model tiny (zeroscope, 576x320, 24-frame windows) on "
                                "cpu, protocol 1.")


def test_check_memory_shows_the_predicted_peak_against_the_servers_gpu(extension_zip, clip,
                                                                      tmp_path):
    """The panel's GPU line: the strip as it would be sent, planned by a server told its
    GPU has 1 GiB (a tiny model's edit fits with no saver). While the server is still
    making the plan, the button does not freeze Blender waiting: it says to press again."""
    gate = tmp_path / "plan-gate"
    gpu_server = ServerProcess(tmp_path / "gpu-server", "--assume-gpu-memory-gb", "1",
                               "--test-plan-gate", str(gate), *NO_WARM_UP).start()
    try:
        result = run_blender({"scenario": "check_memory", "zip": extension_zip, "clip": clip,
                              "address": gpu_server.address, "gate": str(gate)}, tmp_path)
    finally:
        gpu_server.stop()
    assert not result["pending"]["ok"], result
    assert ("The server is still working out the GPU memory of this size" in
            result["pending"]["error"]), result
    assert result["outcome"]["ok"], result
    assert re.fullmatch(r"Predicted peak \d+\.\d MiB of 1\.0 GiB GPU memory\.", result["report"])


def test_curve_keys_right_and_wrong(extension_zip, tmp_path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    for folder in (keys, stranger):
        subprocess.run([sys.executable, "-m", "backend", "keys", str(folder)], cwd=REPO_ROOT,
                       check=True, capture_output=True)
    secure = ServerProcess(tmp_path / "secure-server", "--keys", str(keys)).start()
    try:
        good = run_blender({"scenario": "test_connection", "zip": extension_zip,
                            "address": secure.address,
                            "server_key_file": str(keys / "server.key"),
                            "client_key_file": str(keys / "client.key_secret")}, tmp_path)
        wrong = run_blender({"scenario": "test_connection", "zip": extension_zip,
                             "address": secure.address, "timeout_s": 3.0,
                             "server_key_file": str(keys / "server.key"),
                             "client_key_file": str(stranger / "client.key_secret")}, tmp_path)
        keyless = run_blender({"scenario": "test_connection", "zip": extension_zip,
                               "address": secure.address, "timeout_s": 3.0}, tmp_path)
    finally:
        secure.stop()
    assert good["outcome"]["ok"] and good["report"].startswith("Connected: model tiny")
    assert not wrong["outcome"]["ok"]
    assert "does not accept this client's key" in wrong["report"]
    assert not keyless["outcome"]["ok"] and "CURVE keys" in keyless["report"]
    for report in (wrong["report"], keyless["report"]):
        assert "Traceback" not in report and report.endswith(".") and "\n" not in report


def test_no_free_channel_is_refused_before_anything_reaches_the_server(extension_zip, clip,
                                                                       server, tmp_path):
    jobs_before = jobs_on(server)
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "fill_above": True}, tmp_path)
    assert_nothing_reached(server, jobs_before)
    assert "Every channel above channel 2 is taken" in result["outcome"]["error"]
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_a_result_that_cannot_be_placed_is_placed_by_collect_once_a_channel_is_free(
        extension_zip, clip, server, tmp_path, blender):
    python, _ = blender
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "wait": False, "block_then_collect": True},
                         tmp_path, python=python)
    outcome = result["outcome"]
    blocked = outcome["blocked_job"]
    assert blocked["status"] == "unplaced" and "Collect Results" in blocked["message"]
    assert Path(blocked["frames_path"], "frame_00023.png").is_file()  # kept for the next try
    assert outcome["collect"]["ok"]
    new = assert_result_strip(result, "source", channel=3)
    assert new["elements"] == [f"frame_{index:05d}.png" for index in range(1, 24)]


def test_an_unwritable_result_folder_is_refused_before_rendering(extension_zip, clip, server,
                                                                 tmp_path):
    jobs_before = jobs_on(server)
    blend = tmp_path / "project" / "edit.blend"
    blend.parent.mkdir()
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "save": str(blend), "folder_taken": True},
                         tmp_path)
    assert f"The result folder {blend.parent / 'understudy'} cannot be written" in \
        result["outcome"]["error"]
    assert_nothing_reached(server, jobs_before)
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_an_effect_fed_by_the_source_is_refused_before_any_work(extension_zip, clip, server,
                                                                tmp_path, blender):
    python, _ = blender
    jobs_before = jobs_on(server)
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "fed_effect": True}, tmp_path, python=python)
    assert "The effect strip 'blur' takes 'source' as its input" in result["outcome"]["error"]
    assert_nothing_reached(server, jobs_before)
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_colour_strip_is_refused_in_one_sentence(extension_zip, clip, server, tmp_path):
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "kind": "color"}, tmp_path)
    assert "'colour' is a colour strip, in which nothing moves" in result["outcome"]["error"]
    assert result["after"] == result["before"] and result["new_strips"] == []


def test_saving_an_unsaved_file_moves_its_results_beside_it(extension_zip, clip, server, tmp_path,
                                                            blender):
    python, _ = blender
    blend = tmp_path / "later" / "edit.blend"
    blend.parent.mkdir()
    result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                          "address": server.address, "save_after": str(blend)},
                         tmp_path, python=python)
    [job] = result["jobs"]
    assert job["frames_dir"] == f"//understudy/{job['job_id']}/" and job["message"] == ""
    [new] = result["new_strips"]
    assert new["directory"] == job["frames_dir"]
    beside = blend.parent / "understudy" / job["job_id"]
    assert sorted(path.name for path in beside.glob("frame_*.png")) == new["elements"]
    assert (beside / "sidecar.json").is_file()
    reopened = run_blender({"scenario": "reopen", "zip": extension_zip, "blend": str(blend),
                            "address": server.address}, tmp_path, python=python)
    strip = next(s for s in reopened["strips"] if s["name"] == new["name"])
    assert strip["directory"] == job["frames_dir"]


def test_a_lost_server_names_collect_results_and_shows_waiting(extension_zip, clip, tmp_path):
    doomed = ServerProcess(tmp_path / "doomed", "--test-step-delay", "0.5").start()
    try:
        result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": clip,
                              "address": doomed.address, "wait": False, "timeout_s": 1.0,
                              "kill_pid": doomed.process.pid,
                              "settings": {"steps": 30, "inversion_steps": 30}}, tmp_path)
    finally:
        doomed.stop()
    collect = result["outcome"]["collect"]
    assert not collect["ok"] and "Collect Results once the server is back" in collect["error"]
    [job] = result["jobs"]
    assert job["status"] in ("submitted", "running") and job["phase"] == "waiting"
    assert result["progress"] == "waiting for the server"
    phase, message, progress = result["interface"]  # the polling timer said the same
    assert phase == "waiting" and progress == "waiting for the server"
    assert "Collect Results once the server is back" in message


@pytest.mark.parametrize("kind", ["pip", "text"])
def test_the_result_composites_where_the_source_did_and_stays_graded(
        extension_zip, clip, server, tmp_path, kind, blender):
    import numpy as np
    from PIL import Image

    python, version = blender
    background = tmp_path / "green.png"
    Image.new("RGB", (16, 16), (40, 200, 60)).save(background)
    result = run_blender({"scenario": "composite", "zip": extension_zip, "clip": clip,
                          "address": server.address, "kind": kind, "background": str(background),
                          "out": str(tmp_path)}, tmp_path, python=python)
    assert result["blender_version"][:2] == version
    # Channel 5 grades; 3 is free: the result goes between, so it is graded too.
    new = assert_result_strip(result, result["source"], channel=3)
    before, after = (np.asarray(Image.open(result[name]).convert("RGB")).astype(int)
                     for name in ("before_png", "after_png"))
    changed = np.abs(after - before).max(axis=2) > 8
    if kind == "pip":
        # The source shows half size, moved 30 right and 20 up: x 70..150, y 12..76 from the top.
        inside = np.zeros_like(changed)
        inside[12:76, 70:150] = True
        assert changed[inside].mean() > 0.5  # the result shows where the source was
        grown = np.zeros_like(changed)  # a pixel of slack at the edges
        grown[11:77, 69:151] = True
        assert not changed[~grown].any()  # the background around it is untouched
        assert new["transform"][2:4] == [30.0, 20.0]
    else:
        assert changed.any()  # the result shows
        assert not changed[:10].any() and not changed[-10:].any()  # transparent where text was not
    # Black and white everywhere: the adjustment layer still grades the result.
    spread = np.abs(after - after.mean(axis=2, keepdims=True)).max()
    assert spread <= 2, spread
    assert_source_unchanged(result)


def covered(png: str) -> tuple[int, int, int, int]:
    """First and last rows and columns a render shows something in (alpha over half)."""
    import numpy as np
    from PIL import Image

    alpha = np.asarray(Image.open(png).convert("RGBA"))[..., 3] > 127
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def area_run(extension_zip, server, tmp_path, canvas, media, python=sys.executable, **args):
    """The area scenario: a movie strip of `media` size fit into a `canvas` project;
    renders of the source alone and of the result alone."""
    clip = make_clip(tmp_path / "shape.mp4", frames=30, width=media[0], height=media[1])
    result = run_blender({"scenario": "area", "zip": extension_zip, "clip": str(clip),
                          "address": server.address, "canvas": list(canvas),
                          "out": str(tmp_path), **args}, tmp_path, python=python)
    assert result["outcome"]["ok"], result["outcome"]
    return result


@pytest.mark.parametrize(("canvas", "media"), [((90, 160), (160, 128)), ((192, 108), (192, 108))],
                         ids=["vertical", "landscape"])
def test_the_result_covers_the_area_the_source_covered(extension_zip, server, tmp_path, canvas,
                                                       media, blender):
    import numpy as np

    # (A 192x108 clip is encoded as 192x112, as 1920x1080 video is often 1920x1088.)
    result = area_run(extension_zip, server, tmp_path, canvas, media, python=blender[0])
    source, new = covered(result["source_png"]), covered(result["result_png"])
    # The source does not fill the canvas (a band, or pillarboxed), and the result covers
    # the same rows and columns.
    assert source != (0, canvas[1] - 1, 0, canvas[0] - 1)
    assert np.abs(np.subtract(source, new)).max() <= 1, (source, new)
    assert_source_unchanged(result)


def test_a_vertical_strip_in_a_vertical_project_keeps_its_shape(extension_zip, server, tmp_path,
                                                                blender):
    """9:16 in 9:16 under fit (the default): the model runs at the strip's own shape (not
    a 16:9 band) and the result is shown at the source's size and aspect ratio."""
    result = area_run(extension_zip, server, tmp_path, (90, 160), (144, 256), python=blender[0],
                      scale=0.6)
    framing = json.loads(Path(result["jobs"][0]["frames_path"], "sidecar.json").read_text())[
        "framing"]
    width, height = framing["model_size"]
    assert framing["mode"] == "fit" and height > width  # upright, as the strip
    source, new = covered(result["source_png"]), covered(result["result_png"])
    source_size = (source[3] - source[2] + 1, source[1] - source[0] + 1)
    new_size = (new[3] - new[2] + 1, new[1] - new[0] + 1)
    assert source_size == pytest.approx((54, 96), abs=1)  # 0.6 of the 90x160 canvas
    assert abs(new_size[0] - source_size[0]) <= 1 and abs(new_size[1] - source_size[1]) <= 1
    assert abs(new[0] - source[0]) <= 1 and abs(new[2] - source[2]) <= 1  # and in its place
    assert_source_unchanged(result)


def test_crop_places_the_result_over_its_box_and_nothing_else(extension_zip, server, tmp_path):
    """Under crop the model edits a centred box of its own shape (64x64 here, a square);
    the result lies over that box of the source and is transparent around it."""
    result = area_run(extension_zip, server, tmp_path, (192, 108), (192, 108),
                      settings={"framing": "crop"})
    framing = json.loads(Path(result["jobs"][0]["frames_path"], "sidecar.json").read_text())[
        "framing"]
    assert framing["mode"] == "crop"
    (sent_width, sent_height), (left, top, right, bottom) = (framing["source_size"],
                                                             framing["crop_box"])
    assert (top, bottom) == (0, sent_height) and 0 < left < right < sent_width  # a centred square
    source, new = covered(result["source_png"]), covered(result["result_png"])
    shown_width = source[3] - source[2] + 1
    expected_cols = (source[2] + left * shown_width / sent_width,
                     source[2] + right * shown_width / sent_width - 1)
    assert abs(new[0] - source[0]) <= 1 and abs(new[1] - source[1]) <= 1  # every row of the box
    assert abs(new[2] - expected_cols[0]) <= 1.5 and abs(new[3] - expected_cols[1]) <= 1.5, (
        new, expected_cols)
    assert_source_unchanged(result)


def test_a_sixty_frame_strip_on_a_wan_server_gives_sixty_generated_frames(
        extension_zip, long_clip, tmp_path, tiny_wan_dir):
    wan = ServerProcess(tmp_path / "wan-state", "--model", str(tiny_wan_dir)).start()
    try:
        connected = run_blender({"scenario": "test_connection", "zip": extension_zip,
                                 "address": wan.address}, tmp_path / "hello")
        assert connected["report"].startswith(f"Connected: model {tiny_wan_dir} (wan, 832x480, "
                                              f"81-frame windows)")
        result = run_blender({"scenario": "transfer", "zip": extension_zip, "clip": long_clip,
                              "address": wan.address, "trim": [0, 0]}, tmp_path / "edit")
    finally:
        wan.stop()
    new = assert_result_strip(result, "source", channel=3)
    assert new["frame_final_duration"] == 60
    folder = Path(result["jobs"][0]["frames_path"])
    files = [folder / name for name in new["elements"]]
    assert len(files) == 60 and len({file.read_bytes() for file in files}) == 60  # none held
    assert json.loads(result["jobs"][0]["sidecar"])["backbone"] == "wan"
    assert_source_unchanged(result)


def test_make_room_places_the_result_under_the_grade_and_undo_puts_every_strip_back(
        extension_zip, clip, server, tmp_path, blender):
    python, _version = blender
    result = run_blender({"scenario": "make_room", "zip": extension_zip, "clip": clip,
                          "address": server.address}, tmp_path, python=python)
    start = {"source": 2, "grade": 3, "title": 4, "later": 4}
    refused = result["refused"]
    assert not refused["ok"] and "move the adjustment layer up a channel" in refused["error"]
    assert refused["channels"] == start and refused["offered"]  # nothing moved unasked
    new = assert_result_strip(result, "source", channel=3)  # under the grade
    assert result["moved"] == {**start, "grade": 4, "title": 5, new["name"]: 3}
    assert result["undone"] == start  # one undo: every strip back, the result gone


# --------------------------------------------------------------------------- keep the plate (issue 20)


def test_a_mask_region_keeps_the_plate_outside_it_in_the_composite(extension_zip, clip, server,
                                                                    tmp_path, blender):
    import numpy as np
    from PIL import Image

    python, version = blender
    result = run_blender({"scenario": "region", "zip": extension_zip, "clip": clip,
                          "address": server.address, "masks": ["square"],
                          "out": str(tmp_path)}, tmp_path, python=python)
    assert result["blender_version"][:2] == version
    [run] = result["runs"]
    new = assert_result_strip(run, "source", channel=3)
    assert new["blend_type"] == "ALPHA_OVER"  # a layer over the source, through its alpha
    [job] = run["jobs"]
    sidecar = json.loads(job["sidecar"])
    assert sidecar["regions"] == {"count": 1, "grow": 4, "feather": 2, "motion": "subject",
                                  "composited": True}
    # The result frame's alpha is the feathered, grown region: 0 outside it.
    layer = np.asarray(Image.open(Path(job["frames_path"]) /
                                  f"frame_{run['frame_index'] + 1:05d}.png").convert("RGBA"))
    outside = layer[..., 3] == 0
    assert layer.shape == (128, 160, 4)
    assert 0.4 < outside.mean() < 0.95 and (layer[..., 3] == 255).any()
    # The square's corners are at 35% and 65% of the frame: grown by 4 px, nothing beyond.
    assert outside[:, :int(0.35 * 160) - 6].all() and outside[:, int(0.65 * 160) + 6:].all()
    # Rendered with every channel, the edit shows the source's own pixels outside the
    # grown region, exactly, and something else inside it.
    before, after = (np.asarray(Image.open(run[name]).convert("RGB")).astype(int)
                     for name in ("before_png", "after_png"))
    assert (after[outside] == before[outside]).all()
    assert (after[~outside] != before[~outside]).any()
    # Everywhere, feathered edge included, Blender shows the layer over the source:
    # m·S + (1 − m)·source, which is the server's composite (pngio.layer_over_source).
    assert ((layer[..., 3] > 0) & (layer[..., 3] < 255)).any()  # there is an edge
    weight = layer[..., 3:4] / 255.0
    expected = weight * layer[..., :3] + (1 - weight) * before
    assert np.abs(after - expected).max() <= 2
    with Client(server.address, timeout_s=30.0) as client:  # the server's own composite
        served = client.fetch(job["job_id"]).frames[run["frame_index"]]
    composite = np.asarray(Image.open(io.BytesIO(served)).convert("RGBA")).astype(int)
    assert (composite[..., 3] == layer[..., 3]).all()
    assert np.abs(after - composite[..., :3]).max() <= 2
    assert_source_unchanged(run)


def test_a_bad_mask_is_one_sentence_before_anything_is_sent(extension_zip, clip, server,
                                                            tmp_path):
    jobs_before = jobs_on(server)
    result = run_blender({"scenario": "region", "zip": extension_zip, "clip": clip,
                          "address": server.address, "masks": ["empty", "white strip"],
                          "out": str(tmp_path)}, tmp_path)
    empty, everything = result["runs"]
    # A mask without shapes is refused before anything is rendered ...
    assert not empty["outcome"]["ok"]
    assert "The mask 'empty' has no shapes" in empty["outcome"]["error"]
    # ... and a (muted) matte covering the whole picture once rendered, before the strip is.
    assert not everything["outcome"]["ok"]
    assert ("The matte strip 'white strip' is white over the whole picture in every frame"
            in everything["outcome"]["error"])
    for run in (empty, everything):
        assert run["outcome"]["error"].count(". ") == 0, run["outcome"]["error"]
        assert run["new_strips"] == [] and run["jobs"] == []
        assert_source_unchanged(run)
    assert_nothing_reached(server, jobs_before)


def test_in_the_interface_the_region_renders_in_batches_before_the_strip(extension_zip, clip,
                                                                         server, tmp_path):
    result = run_blender({"scenario": "region_interface", "zip": extension_zip, "clip": clip,
                          "address": server.address}, tmp_path)
    ticks = result["ticks"]
    # The region first, one frame on the first tick, then the strip's 23 frames.
    assert (ticks[0]["region"], ticks[0]["frames"]) == (1, 0)
    assert ticks[0]["percent"] == pytest.approx(100 / 46)
    first_strip = next(index for index, tick in enumerate(ticks) if tick["frames"])
    assert ticks[first_strip - 1]["region"] == 23 and first_strip > 1
    rendering = [tick["percent"] for tick in ticks[:-1]]  # the last tick submits
    assert rendering == sorted(rendering) and rendering[-1] == 100.0
    assert ticks[-1]["status"] == "submitted"
    # Between ticks the scene is as the editor left it: no mask strip left behind.
    assert all(tick["scene_as_before"] for tick in ticks)
    new = assert_result_strip(result, "source", channel=3)
    assert new["blend_type"] == "ALPHA_OVER"
    assert_source_unchanged(result)


def test_takes_land_as_one_stack_switch_and_render_final_in_place(extension_zip, clip, server,
                                                                  tmp_path, blender):
    """Preview with Takes 3 (the interface's path): three takes land as one stack, each as
    its take_ready arrives, the first shown; Next and Previous change the shown take and
    nothing else; Render Final on the shown take replaces it in place, and one undo shows
    the preview again. One Blender run covers all three (start-up is the slow part)."""
    from PIL import Image

    python, version = blender
    result = run_blender({"scenario": "takes", "zip": extension_zip, "clip": clip,
                          "address": server.address, "takes": 3}, tmp_path, python=python)
    assert result["blender_version"][:2] == version
    assert result["outcome"]["ok"], result["outcome"]
    # Each take is in the stack once its take_ready is applied, before the job ends.
    ready = [entry for entry in result["landed"] if entry[0] == "take_ready"]
    assert [[take, placed] for _, take, placed in ready] == [[1, [1]], [2, [1, 2]],
                                                           [3, [1, 2, 3]]]
    # One new strip at the top level: the stack, above the source, over its frames,
    # blending as the source does.
    source = next(s for s in result["before"]["strips"] if s["name"] == "source")
    [holder] = result["new_strips"]
    assert holder == result["stack"]["stack"]
    assert holder["type"] == "META" and holder["name"] == "a red fox · 3 takes"
    assert holder["channel"] == source["channel"] + 1
    assert (holder["frame_final_start"], holder["frame_final_duration"]) == (
        source["frame_final_start"], source["frame_final_duration"])
    assert (holder["blend_type"], holder["blend_alpha"]) == (source["blend_type"], 0.75)
    [job] = result["jobs"]
    seed = int(job["seed"])
    takes = result["stack"]["takes"]
    assert sorted(takes) == ["1", "2", "3"] and result["stack"]["shown"] == 1
    first_frame = Path(takes["1"]["directory"], takes["1"]["elements"][0])
    width, height = Image.open(first_frame).size
    scale = source["transform"][0]  # the movie's fit on the canvas, as the source shows it
    for number, take in takes.items():
        k = int(number)
        assert take["name"] == f"a red fox · seed {seed + k - 1} · preview"
        assert take["channel"] == k and take["mute"] == (k != 1)
        assert (take["frame_final_start"], take["frame_final_duration"]) == (
            source["frame_final_start"], source["frame_final_duration"])
        assert take["directory"] == f"{job['frames_path']}take{k}/"
        # Placed as a single result strip is (placement.result_look), the blending the stack's.
        assert take["transform"] == [round(scale * 160 / width, 4),
                                     round(scale * 128 / height, 4), 0.0, 0.0, 0.0]
        assert (take["blend_type"], take["blend_alpha"]) == ("ALPHA_OVER", 1.0)
    assert result["take_records"] == [[k, str(seed + k - 1), "preview", "a red fox"]
                                      for k in (1, 2, 3)]
    assert result["contact_sheet"] == [[width, height]] * 3  # one frame per take, in the panel
    panel = result["panel"]
    assert "a red fox · 3 takes: take 1 of 3" in panel["labels"] and "takes" in panel["props"]
    assert panel["operators"].count("understudy.show_take") == 3  # a click shows that take
    assert {"understudy.previous_take", "understudy.next_take", "understudy.render_final",
            "understudy.transfer"} <= set(panel["operators"])
    assert_source_unchanged(result)

    # Next, then Previous: only the mute of the two takes concerned changes.
    switching = result["switching"]
    assert switching["next"]["ok"] and switching["previous"]["ok"]
    assert switching["shown_after_next"] == 2 and switching["shown_after_previous"] == 1
    before, after = switching["before"], switching["after_next"]
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {takes["1"]["name"], takes["2"]["name"]}
    for name in changed:
        assert {**after[name], "mute": before[name]["mute"]} == before[name]
        assert after[name]["mute"] != before[name]["mute"]
    assert switching["after_previous"] == before

    # Render Final on the shown take (Previous from the first goes round to the third).
    final = result["final"]
    assert final["shown"] == 3 and final["outcome"]["ok"], final["outcome"]
    final_job = final["job"]
    assert final_job["status"] == "done"
    sidecar = json.loads(final_job["sidecar"])
    assert sidecar["settings"]["quality"] == "final" and sidecar["seed"] == seed + 2
    assert sidecar["settings"]["prompt"] == "a red fox"
    preview, replaced = final["preview"], final["after"]
    assert replaced["stack"] == preview["stack"] and replaced["shown"] == 3
    assert replaced["takes"]["1"] == preview["takes"]["1"]
    assert replaced["takes"]["2"] == preview["takes"]["2"]
    third = replaced["takes"]["3"]
    assert third["directory"] == final_job["frames_path"]  # the final's frames, in place
    assert third["name"] == f"a red fox · seed {seed + 2}"
    assert {**third, "directory": preview["takes"]["3"]["directory"],
            "name": preview["takes"]["3"]["name"]} == preview["takes"]["3"]
    assert final["record"] == ["final", final_job["job_id"]]
    # One undo: the preview take again, the rest as it was.
    assert final["undone"] == preview
