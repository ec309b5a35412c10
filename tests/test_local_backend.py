"""The backend on this computer, as the extension runs it (blender_addon/connection/):
finding the project, the lock, starting, adopting, restarting once, stopping. Plain
Python against real `python -m backend serve --model tiny` processes; no Blender."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from blender_addon.connection import install as backend_install
from blender_addon.connection import lock as backend_lock
from blender_addon.connection import process as backend_process
from blender_addon.connection.install import LocalSettings
from blender_addon.connection.lock import Lock
from blender_addon.connection.process import BackendState, LocalBackend
from blender_addon.rules.errors import UserError
from tests.conftest import REPO_ROOT
from tests.server_support import ServerProcess, unused_address


def free_address() -> str:
    """A loopback address nothing listens on (the port is released for the backend to take)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ------------------------------------------------------------------ finding the project


def test_a_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match=r"^\S+ does not exist; pick the folder") as caught:
        backend_install.locate(str(tmp_path / "nowhere"))
    assert str(caught.value).count(". ") == 0


def test_a_folder_without_the_project_names_the_setup_command(tmp_path):
    with pytest.raises(UserError, match="no Understudy backend .*`python build.py` was run"):
        backend_install.locate(str(tmp_path))


def test_a_project_without_its_environment_names_the_command_to_run_there(tmp_path):
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "__main__.py").write_text("")
    with pytest.raises(UserError, match=r"has no backend environment yet; run `python build.py` "
                                        r"there"):
        backend_install.locate(str(tmp_path))


def test_an_empty_entry_says_where_to_set_it():
    with pytest.raises(UserError, match="Set the project folder"):
        backend_install.locate("  ")


def test_the_project_folder_and_its_python_both_find_it_and_its_defaults():
    install = backend_install.find_install(str(REPO_ROOT))
    assert Path(install.project) == REPO_ROOT
    assert Path(install.python) == backend_install.venv_python(REPO_ROOT)
    # The command line's defaults, asked of the project itself (one place for each fact).
    from backend.edit import DEFAULT_CACHE, DEFAULT_MODEL
    from backend.server.app import DEFAULT_STATE_DIR

    assert install.defaults == {"model": DEFAULT_MODEL, "cache_dir": str(DEFAULT_CACHE),
                                "state_dir": str(DEFAULT_STATE_DIR)}
    by_python = backend_install.find_install(install.python)
    assert Path(by_python.project) == REPO_ROOT


def test_a_python_that_cannot_run_the_backend_names_the_setup_command(tmp_path):
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "__main__.py").write_text("")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)  # a Python, but the project's backend is an empty shell
    with pytest.raises(UserError, match=r"cannot run the backend .*run `python build.py` in"):
        backend_install.find_install(str(tmp_path))


# ------------------------------------------------------------------ the command and the lock


def test_serve_command_passes_only_what_is_set():
    install = backend_install.Install("/p/.venv/bin/python", "/p", {"state_dir": "/home/u/state"})
    bare = backend_install.serve_command(install, LocalSettings("tcp://127.0.0.1:5555"))
    assert bare == ["/p/.venv/bin/python", "-m", "backend", "serve", "--bind",
                    "tcp://127.0.0.1:5555", "--state-dir", "/home/u/state"]
    full = backend_install.serve_command(install, LocalSettings(
        "tcp://127.0.0.1:6000", model="tiny", device="cpu", state_dir="/s", cache_dir="/c",
        extra_args="--max-frames 40 --upscale-model 'my model'"))
    assert full[4:] == ["--bind", "tcp://127.0.0.1:6000", "--state-dir", "/s", "--model", "tiny",
                        "--device", "cpu", "--cache-dir", "/c", "--max-frames", "40",
                        "--upscale-model", "my model"]
    with pytest.raises(UserError, match="extra serve flags cannot be read"):
        backend_install.serve_command(install, LocalSettings("tcp://127.0.0.1:1", extra_args="'"))


@pytest.mark.parametrize("address", ["tcp://10.0.0.2:5555", "ipc:///tmp/x", "tcp://127.0.0.1",
                                     "127.0.0.1:5555"])
def test_the_local_backend_listens_on_loopback_only(address):
    with pytest.raises(UserError, match="loopback address such as tcp://127.0.0.1:5555"):
        backend_install.loopback_host_port(address)


def test_loopback_forms():
    assert backend_install.loopback_host_port("tcp://localhost:7") == ("localhost", 7)
    assert backend_install.loopback_host_port("tcp://[::1]:8") == ("::1", 8)


def test_nothing_listening_is_told_at_once():
    with unused_address() as address:
        assert not backend_install.listening(address)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"pid": "x", "address": "a", "log": "l"}',
                                  '{"address": "a", "log": "l"}', '{"pid": 0, "address": "a", '
                                                                  '"log": "l"}'])
def test_a_damaged_lock_is_no_lock(text):
    assert backend_lock.parse_lock(text) is None


def test_a_lock_round_trips():
    lock = Lock(12, "tcp://127.0.0.1:9", "/s/blender-backend.log", 34)
    assert backend_lock.parse_lock(lock.to_json()) == lock


def test_a_stale_lock_is_removed_and_claimed_again(tmp_path):
    path = tmp_path / "state" / backend_lock.LOCK_NAME
    stale = Lock(dead_pid(), "tcp://127.0.0.1:9", "log", 1)
    assert backend_lock.claim_lock(path, stale)
    assert not backend_lock.claim_lock(path, stale)  # one claim wins
    assert backend_lock.live_lock(path) is None and not path.exists()
    # A live process that is not a backend (the id was reused) is stale too.
    reused = Lock(os.getpid(), "tcp://127.0.0.1:9", "log", 1)
    assert backend_lock.claim_lock(path, reused)
    assert backend_lock.live_lock(path) is None and not path.exists()
    # Another Blender's claim, written just before it starts its backend, is respected.
    claim = Lock(os.getpid(), "tcp://127.0.0.1:9", "log", os.getpid())
    assert backend_lock.claim_lock(path, claim)
    assert backend_lock.live_lock(path) == claim
    path.unlink()
    path.parent.joinpath(backend_lock.LOCK_NAME).write_text("not json")
    assert backend_lock.live_lock(path) is None and not path.exists()


def test_hello_descriptions():
    state, text = backend_process.describe_hello(
        {"model": "tiny", "device": "cpu", "queue_length": 0, "engine": {}})
    assert (state, text) == (BackendState.READY, "model tiny on cpu")
    state, text = backend_process.describe_hello(
        {"model": "m", "device": "cuda:0", "queue_length": 2, "engine": {},
         "gpu": {"name": "NVIDIA A100", "total_bytes": 80 * 2**30, "free_bytes": 10 * 2**30,
                 "budget_bytes": 12 * 2**30, "assumed": False}})
    assert state == BackendState.BUSY
    assert text == ("model m on cuda:0, GPU NVIDIA A100, 80.0 GiB (10.0 GiB free), "
                    "2 jobs queued or running")


# ------------------------------------------------------------------ real backends


@pytest.fixture(scope="module")
def install():
    return backend_install.find_install(str(REPO_ROOT))


def test_start_adopt_restart_once_and_stop(install, tmp_path):
    settings = LocalSettings(free_address(), model="tiny", device="cpu",
                             state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"))
    lines: list[str] = []
    ours = LocalBackend()
    try:
        assert not ours.find(install, settings)
        ours.start(install, settings)
        assert ours.state == BackendState.STARTING and ours.owned
        ours.wait_ready(lines.append)
        assert ours.state == BackendState.READY and any("ready on" in line for line in lines)
        lock = json.loads((tmp_path / "state" / backend_lock.LOCK_NAME).read_text())
        assert lock["pid"] == ours.pid and lock["address"] == settings.address
        assert lock["owner_pid"] == os.getpid()

        # Another Blender finds it through the lock, uses it, and never stops it.
        theirs = LocalBackend()
        assert theirs.find(install, settings)
        assert not theirs.owned and theirs.pid == ours.pid and theirs.answering
        assert not theirs.stop()
        assert backend_lock.pid_alive(ours.pid)

        # Killed: restarted once, at the same address, with a lock of its own.
        first = ours.pid
        ours.process.kill()
        ours.process.wait()
        assert ours.poll() == BackendState.STARTING and ours.pid != first
        ours.wait_ready()
        assert ours.restarts_left == 0
        assert backend_lock.parse_lock(
            (tmp_path / "state" / backend_lock.LOCK_NAME).read_text()).pid == ours.pid
        # Killed again: it stays down and says why, with its log.
        ours.process.kill()
        ours.process.wait()
        assert ours.poll() == BackendState.EXITED
        assert not (tmp_path / "state" / backend_lock.LOCK_NAME).exists()
        assert str(ours.log_path) in ours.failure()
        with pytest.raises(UserError, match=r"^The backend stopped"):
            ours.wait_ready()
    finally:
        ours.stop()


def test_a_backend_that_cannot_load_its_model_says_so_with_its_log(install, tmp_path):
    settings = LocalSettings(free_address(), model=str(tmp_path / "no-model"), device="cpu",
                             state_dir=str(tmp_path / "state"))
    ours = LocalBackend()
    ours.start(install, settings)
    with pytest.raises(UserError) as caught:
        ours.wait_ready()
    # The backend's own sentence (what to do about the model), then where its log is.
    message = str(caught.value)
    assert message.startswith("The backend stopped: ") and "error:" not in message
    assert message.endswith(f"(the whole log is {ours.log_path}).")
    assert ours.restarts_left == backend_process.RESTARTS  # never ready: not restarted


def test_a_server_started_by_hand_is_used_and_never_stopped(install, tmp_path):
    server = ServerProcess(tmp_path / "hand").start()
    try:
        settings = LocalSettings(server.address, state_dir=str(tmp_path / "state"))
        found = LocalBackend()
        assert found.find(install, settings) and found.answering and not found.owned
        assert not found.stop()
        assert server.process.poll() is None
    finally:
        server.stop()
