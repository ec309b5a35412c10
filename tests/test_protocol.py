"""The wire protocol's encoding and validation, the job store, and recovery rules
(no sockets here; tests/test_server.py runs real servers)."""

from __future__ import annotations

import ast
import json
import sys
import time

import pytest

from backend.server import (
    Job,
    JobStore,
    Server,
    ServerConfig,
    ServerConfigError,
    check_bind_allowed,
    check_png_frames,
    is_loopback,
)
from shared import protocol
from shared.protocol import ProtocolError
from tests.conftest import REPO_ROOT
from tests.server_support import clip_pngs


def test_encode_decode_round_trip():
    frames = protocol.encode({"type": "submit", "job_id": "a"}, [b"png1", b"png2"])
    header, payload = protocol.decode(frames)
    assert header == {"v": protocol.PROTOCOL_VERSION, "type": "submit", "job_id": "a"}
    assert payload == [b"png1", b"png2"]


@pytest.mark.parametrize("frame, code", [
    (b"\xff\xfe not utf8", "bad_header"),
    (b"{not json", "bad_header"),
    (b"[1, 2]", "bad_header"),
    (b'{"type": "hello"}', "protocol_version"),
    (b'{"v": 99, "type": "hello"}', "protocol_version"),
    (b'{"v": 1}', "bad_header"),
    (b'{"v": 1, "type": 5}', "bad_header"),
    (b'{"v": 1, "type": "hello", "pad": "' + b"x" * protocol.MAX_HEADER_BYTES + b'"}',
     "bad_header"),
])
def test_decode_refuses_broken_headers(frame, code):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode([frame])
    assert caught.value.code == code
    assert caught.value.message.endswith(".")


def test_decode_refuses_an_empty_message():
    with pytest.raises(ProtocolError, match="empty"):
        protocol.decode([])


@pytest.mark.parametrize("job_id", ["a", "job-1", "A.b_c-9", "x" * 64])
def test_valid_job_ids(job_id):
    assert protocol.check_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", ["", ".hidden", "../etc", "a/b", "x" * 65, 5, None, "a b"])
def test_invalid_job_ids(job_id):
    with pytest.raises(ProtocolError) as caught:
        protocol.check_job_id(job_id)
    assert caught.value.code == "bad_job_id"


def test_require_checks_json_types():
    assert protocol.require({"settings": {}}, "settings", dict) == {}
    with pytest.raises(ProtocolError, match="settings"):
        protocol.require({"type": "submit", "settings": "prompt"}, "settings", dict)
    with pytest.raises(ProtocolError):
        protocol.require({"n": True}, "n", int)


def test_submit_limits():
    limits = {**protocol.DEFAULT_LIMITS, "max_message_bytes": 1000, "max_frames": 2,
              "max_prompt_chars": 10}
    protocol.check_submit_limits({"prompt": "short"}, [b"x" * 100], 100, limits)
    cases = [({"prompt": "p"}, [b"x" * 600, b"x" * 600], "too_large"),
             ({"prompt": "p"}, [b"x", b"x", b"x"], "too_many_frames"),
             ({"prompt": "p"}, [], "bad_frames"),
             ({"prompt": "p" * 11}, [b"x"], "bad_settings")]
    for settings, frames, code in cases:
        with pytest.raises(ProtocolError) as caught:
            protocol.check_submit_limits(settings, frames, 10, limits)
        assert caught.value.code == code


def test_request_digest_sees_settings_and_every_frame():
    base = protocol.request_digest({"prompt": "a", "seed": 1}, [b"one", b"two"])
    assert base == protocol.request_digest({"seed": 1, "prompt": "a"}, [b"one", b"two"])
    assert base != protocol.request_digest({"prompt": "a", "seed": 2}, [b"one", b"two"])
    assert base != protocol.request_digest({"prompt": "a", "seed": 1}, [b"onet", b"wo"])


def test_shared_package_needs_only_stdlib_and_pyzmq():
    allowed = set(sys.stdlib_module_names) | {"__future__", "zmq", "shared"}
    for path in (REPO_ROOT / "shared").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # relative: inside shared/ (the extension vendors it renamed)
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    assert name.split(".")[0] in allowed, f"{path} imports {name}"


def test_shared_package_works_vendored_under_another_name(tmp_path):
    """The Blender extension ships shared/ as <extension>.shared."""
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO_ROOT / "shared", tmp_path / "addon" / "shared",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "addon" / "__init__.py").write_text("")
    code = "import addon.shared.client as c, sys; assert 'shared' not in sys.modules; print(c.Client)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("address, loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:*", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:5555", True), ("ipc:///tmp/sock", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://192.168.1.5:5555", False), ("tcp://eth0:5555", False),
])
def test_loopback_addresses(address, loopback):
    assert is_loopback(address) is loopback


def test_network_bind_needs_keys_or_insecure(tmp_path):
    with pytest.raises(ServerConfigError, match="--keys"):
        check_bind_allowed("tcp://0.0.0.0:5555", None, insecure=False)
    check_bind_allowed("tcp://0.0.0.0:5555", tmp_path, insecure=False)
    check_bind_allowed("tcp://0.0.0.0:5555", None, insecure=True)


def test_png_checks():
    assert check_png_frames(clip_pngs(3, 48, 32), max_side=64) == (48, 32)
    broken = clip_pngs(1)[0]
    cases = [([b"GIF89a..."], "not a PNG"),
             ([broken[:40]], "damaged"),
             ([broken[:60] + b"\0" * 4 + broken[64:]], "damaged"),
             (clip_pngs(1, 48, 32) + clip_pngs(1, 32, 32), "one size"),
             (clip_pngs(1, 100, 32), "at most 64")]
    for frames, words in cases:
        with pytest.raises(ProtocolError, match=words) as caught:
            check_png_frames(frames, max_side=64)
        assert caught.value.code == "bad_frames"


# --------------------------------------------------------------------------- store


def make_job(job_id: str, seq: int, state: str = protocol.QUEUED, **fields) -> Job:
    job = Job(job_id=job_id, seq=seq, client="c-1", owner=None, digest="d",
              submitted_at=time.time(), **fields)
    job.state = state
    return job


def test_store_writes_everything_before_status(tmp_path):
    store = JobStore(tmp_path)
    job = make_job("j1", 0)
    store.create(job, {"prompt": "p"}, [b"a", b"b"])
    folder = store.folder("j1")
    assert sorted(p.name for p in (folder / "input").iterdir()) == ["00000.png", "00001.png"]
    assert json.loads((folder / "status.json").read_text())["state"] == "queued"
    assert store.read_request("j1")["settings"] == {"prompt": "p"}
    assert store.read_inputs("j1") == [b"a", b"b"]
    assert not list(folder.rglob("*.tmp"))
    store.write_result("j1", [b"r"], {"seed": 3})
    assert store.read_result("j1") == ({"seed": 3}, [b"r"])


def test_store_drops_submits_that_were_never_acknowledged(tmp_path):
    store = JobStore(tmp_path)
    store.create(make_job("kept", 0), {"prompt": "p"}, [b"a"])
    half = store.folder("half")
    (half / "input").mkdir(parents=True)
    (half / "request.json").write_text("{}")  # crashed before status.json
    assert [job.job_id for job in store.load_all()] == ["kept"]
    assert not half.exists()


def recovered(tmp_path, jobs: list[Job], **config) -> Server:
    store = JobStore(tmp_path)
    for job in jobs:
        store.create(job, {"prompt": "p"}, [b"a"])
    server = Server(ServerConfig(state_dir=tmp_path, **config), engine=None)
    server.recover()
    return server


def test_restart_reruns_the_running_job_first_then_the_queue(tmp_path):
    server = recovered(tmp_path, [make_job("q1", 0), make_job("r", 1, protocol.RUNNING, attempts=1),
                                  make_job("q2", 2)])
    assert list(server.pending) == ["r", "q1", "q2"]
    assert server.jobs["r"].state == protocol.QUEUED
    assert json.loads((server.store.folder("r") / "status.json").read_text())["state"] == "queued"
    assert server.next_seq == 3


def test_restart_fails_a_job_interrupted_twice_and_honours_cancel(tmp_path):
    server = recovered(tmp_path, [make_job("twice", 0, protocol.RUNNING, attempts=2),
                                  make_job("stop", 1, protocol.RUNNING, attempts=1,
                                           cancel_requested=True)])
    assert not server.pending
    assert server.jobs["twice"].state == protocol.FAILED
    assert server.jobs["twice"].error["code"] == "interrupted"
    assert server.jobs["stop"].state == protocol.JOB_CANCELLED


def test_retention_keeps_the_newest_finished_jobs(tmp_path):
    now = time.time()
    jobs = [make_job(f"d{i}", i, protocol.DONE, finished_at=now - 100 + i) for i in range(3)]
    server = recovered(tmp_path, [*jobs, make_job("q", 3)], keep_jobs=2)
    assert sorted(server.jobs) == ["d1", "d2", "q"]
    assert not server.store.folder("d0").exists()


def test_retention_drops_results_past_the_time_limit(tmp_path):
    old = make_job("old", 0, protocol.DONE, finished_at=time.time() - 7200)
    new = make_job("new", 1, protocol.FAILED, finished_at=time.time())
    server = recovered(tmp_path, [old, new], keep_hours=1.0)
    assert sorted(server.jobs) == ["new"]
