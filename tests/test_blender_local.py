"""End to end, "this computer": the built extension in a real headless Blender starts,
watches, shares and stops its own backend (`python -m backend serve --model tiny` from
this checkout). Each scenario runs in its own bpy process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blender_addon.connection import install as backend_install
from blender_addon.connection import lock as backend_lock
from blender_addon.connection import process as backend_process
from tests.blender_support import (
    BLENDER_TIMEOUT_S,
    SCENARIOS,
    blender_lts_python,
    build_extension,
    make_clip,
    run_blender,
)
from tests.conftest import REPO_ROOT
from tests.server_support import ServerProcess, wait_until
from tests.test_local_backend import free_address


@pytest.fixture(scope="module")
def extension_zip(tmp_path_factory) -> str:
    return str(build_extension(tmp_path_factory.mktemp("dist")))


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return str(make_clip(tmp_path_factory.mktemp("clip") / "walk.mp4", frames=12, width=64,
                         height=64))


def local_args(extension_zip: str, clip: str, tmp_path: Path, **extra) -> dict:
    return {"scenario": "local", "zip": extension_zip, "clip": clip, "project": str(REPO_ROOT),
            "address": free_address(), "state_dir": str(tmp_path / "state"),
            "cache_dir": str(tmp_path / "cache"), "trim": [0, 0], **extra}


def lock_of(state_dir: Path) -> backend_lock.Lock | None:
    path = state_dir / backend_lock.LOCK_NAME
    return backend_lock.parse_lock(path.read_text()) if path.exists() else None


def assert_placed(result: dict) -> None:
    assert result["outcome"]["ok"], result["outcome"]
    [new] = result["new_strips"]
    assert new["type"] == "IMAGE" and new["name"] == "a red fox" and new["channel"] == 3
    [job] = result["jobs"]
    assert job["status"] == "done" and job["result_strip"] == new["name"]


@pytest.mark.parametrize("python", ["5.0", "4.2"])
def test_a_transfer_starts_the_backend_and_disabling_the_extension_stops_it(
        extension_zip, clip, tmp_path, python):
    args = local_args(extension_zip, clip, tmp_path, disable=True)
    result = run_blender(args, tmp_path,
                         python=sys.executable if python == "5.0" else blender_lts_python())
    assert result["project_report"] == f"Backend found: {backend_install.venv_python(REPO_ROOT)}"
    assert_placed(result)
    backend = result["backend"]
    assert backend["owned"] and backend["pid"] and backend["state"] in ("ready", "busy")
    assert backend["status"][0].startswith(f"Backend ready at {args['address']} (model tiny on cpu")
    assert Path(backend["log"]) == tmp_path / "state" / backend_process.LOG_NAME
    assert result["disabled"] and not result["alive_after_disable"]
    assert not backend_lock.pid_alive(backend["pid"])
    assert lock_of(tmp_path / "state") is None


def test_in_the_interface_the_transfer_waits_for_the_backend_without_blocking(
        extension_zip, clip, tmp_path):
    result = run_blender(local_args(extension_zip, clip, tmp_path, scenario="local_interface"),
                         tmp_path)
    assert result["outcome"] == {"ok": True, "returned": ["FINISHED"]}
    # The operator returned while the model loaded; nothing was rendered or recorded yet.
    assert result["right_after"] == {"state": "starting", "jobs": 0, "timer": True}
    assert result["said"][0].startswith("Starting the backend: loading the model")
    assert any(line.startswith("Backend busy at") for line in result["said"])
    assert_placed(result)


def test_a_wrong_folder_is_one_sentence_before_anything_runs(extension_zip, clip, tmp_path):
    wrong = tmp_path / "not-the-project"
    wrong.mkdir()
    args = local_args(extension_zip, clip, tmp_path, project=str(wrong))
    result = run_blender(args, tmp_path)
    sentence = (f"{wrong} holds no Understudy backend (no backend/ folder); pick the folder the "
                f"project is in, where `python build.py` was run.")
    assert result["project_report"] == sentence  # said when it was entered
    assert result["outcome"] == {"ok": False, "error": f"Error: {sentence}\n"}
    assert result["new_strips"] == [] and result["jobs"] == []
    assert result["backend"]["pid"] == 0 and not (tmp_path / "state").exists()
    assert not backend_install.listening(args["address"])


def test_a_backend_killed_mid_job_is_restarted_and_the_result_arrives(extension_zip, clip,
                                                                     tmp_path):
    # Every progress step sleeps, so the job is still running when the backend is killed.
    args = local_args(extension_zip, clip, tmp_path, extra_args="--test-step-delay 0.3",
                      timeout_s=3.0, result_file=str(tmp_path / "result.json"))
    user = tmp_path / "blender-user"
    user.mkdir()
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(user), "PYTHONPATH": str(REPO_ROOT)}
    with open(tmp_path / "blender.log", "wb") as log:
        blender = subprocess.Popen([sys.executable, str(SCENARIOS), json.dumps(args)],
                                   cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        jobs = tmp_path / "state" / "jobs"

        def running_job():
            for status in jobs.glob("*/status.json") if jobs.exists() else ():
                try:
                    if json.loads(status.read_text()).get("state") == "running":
                        return lock_of(tmp_path / "state")
                except ValueError:  # being rewritten
                    pass
            return None

        lock = wait_until(running_job, "a running job", timeout_s=BLENDER_TIMEOUT_S)
        os.kill(lock.pid, signal.SIGKILL)
        blender.wait(timeout=BLENDER_TIMEOUT_S)
    finally:
        if blender.poll() is None:
            blender.kill()
    log_text = (tmp_path / "blender.log").read_text(errors="replace")
    assert (tmp_path / "result.json").exists(), log_text[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert_placed(result)
    backend = result["backend"]
    assert backend["pid"] != lock.pid and backend["restarts_left"] == 0
    assert not backend_lock.pid_alive(backend["pid"])  # stopped when that Blender ended


def test_a_second_blender_uses_the_running_backend_and_never_stops_it(extension_zip, clip,
                                                                      tmp_path):
    first = run_blender(local_args(extension_zip, clip, tmp_path, action="test_connection",
                                   keep_running=True), tmp_path)
    assert first["outcome"]["ok"], first["outcome"]
    assert first["outcome"]["report"].startswith("Connected: model tiny (zeroscope, ")
    pid = first["backend"]["pid"]
    try:
        assert backend_lock.pid_alive(pid)  # kept running after that Blender quit
        lock = lock_of(tmp_path / "state")
        second = run_blender({**local_args(extension_zip, clip, tmp_path), "address": lock.address,
                              "stop_button": True, "disable": True}, tmp_path)
        assert_placed(second)
        assert second["backend"]["pid"] == pid and not second["backend"]["owned"]
        assert second["stop"]["ok"] and second["alive_after_disable"]
        assert backend_lock.pid_alive(pid) and lock_of(tmp_path / "state") == lock
    finally:
        if backend_lock.pid_alive(pid):
            os.kill(pid, signal.SIGTERM)


def test_a_backend_started_by_hand_is_used_and_never_stopped(extension_zip, clip, tmp_path):
    server = ServerProcess(tmp_path / "by-hand").start()
    try:
        result = run_blender(local_args(extension_zip, clip, tmp_path, address=server.address,
                                        action="test_connection", stop_button=True,
                                        disable=True), tmp_path)
        assert result["outcome"]["ok"], result["outcome"]
        assert not result["backend"]["owned"] and result["backend"]["pid"] == 0
        assert result["stop"]["ok"] and server.process.poll() is None
        assert lock_of(tmp_path / "state") is None  # nothing was started, nothing locked
    finally:
        server.stop()
