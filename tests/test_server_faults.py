"""Real server processes against a failing disk and a damaged job store.

The disk fails through tests/fault_server.py: while a control file exists, every
write under the state folder raises the errno it names, as a full disk (ENOSPC), a
read-only remount (EROFS) or a process out of file handles (EMFILE) would.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from backend.server.store import Job, JobStore
from shared import protocol
from shared.client import Client, ClientError, JobRejected
from shared.protocol import JobState
from tests.conftest import REPO_ROOT
from tests.server_support import (
    DAMAGED_JOBS,
    ServerProcess,
    clip_pngs,
    damage_jobs,
    settings,
    subprocess_env,
    wait_until,
)

WAIT_S = 120  # a hang guard for a busy machine, not a time limit
# Long enough to be caught running after its first progress event (with the step delay).
SLOW = {"steps": 40, "inversion_steps": 40}


@pytest.fixture
def client_for():
    clients = []

    def make(address: str) -> Client:
        clients.append(Client(address, timeout_s=30.0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def test_the_server_survives_a_failing_disk_and_resumes_by_itself(tmp_path, client_for):
    """Defect 1: full, read-only, out of handles; no job lost, none reported failed."""
    fault = tmp_path / "disk-fault"
    server = ServerProcess(tmp_path / "state", "--test-step-delay", "0.02",
                           module="tests.fault_server",
                           env={"UNDERSTUDY_FAULT_FILE": str(fault)}).start()
    try:
        client = client_for(server.address)
        client.submit("running", settings(seed=8, **SLOW), clip_pngs(6))
        client.submit("waiting", settings(seed=9), clip_pngs(6))
        wait_until(lambda: client.status("running")["state"] == "running", "the job starting")
        # The disk fills while the job runs: its result lands, the status saying so cannot.
        fault.write_text("ENOSPC status.json")
        degraded = wait_until(lambda: client.hello()["degraded"], "hello reporting degraded")
        assert "No space left on device" in degraded and degraded.endswith("by itself.")
        back = client.status("running")
        assert back["state"] == "queued" and back["attempts"] == 0  # back in line, not failed
        assert client.status("waiting")["state"] == "queued"  # not started on a full disk
        for errno_name, words in (("EROFS", "Read-only file system"),
                                  ("EMFILE", "Too many open files")):
            fault.write_text(errno_name)
            wait_until(lambda words=words: words in (client.hello()["degraded"] or ""),
                       f"hello reporting {errno_name}")
            with pytest.raises(JobRejected, match=words) as caught:
                client.submit(f"refused-{errno_name}", settings(), clip_pngs(6))
            assert caught.value.code == "store_unavailable"
            assert not (tmp_path / "state" / "jobs" / f"refused-{errno_name}").exists()
        fault.unlink()  # space is back
        assert client.wait("running", timeout_s=WAIT_S).sidecar["seed"] == 8
        assert client.status("running")["attempts"] == 1
        assert client.wait("waiting", timeout_s=WAIT_S).sidecar["seed"] == 9
        assert client.hello()["degraded"] is None
        client.submit("after", settings(), clip_pngs(6))
        assert len(client.wait("after", timeout_s=WAIT_S).frames) == 4
    finally:
        server.stop()
    assert "Traceback" not in server.log()


def test_a_state_folder_that_cannot_be_written_is_one_sentence_at_start(tmp_path):
    """Defect 8: no traceback, exit code 1, the sentence says what to do."""
    fault = tmp_path / "disk-fault"
    fault.write_text("EROFS")
    result = subprocess.run(
        [sys.executable, "-m", "tests.fault_server", "serve", "--model", "tiny",
         "--bind", "tcp://127.0.0.1:*", "--state-dir", str(tmp_path / "state")],
        cwd=REPO_ROOT, env={**subprocess_env(), "UNDERSTUDY_FAULT_FILE": str(fault)},
        capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: Cannot use {tmp_path / 'state'} as the job store (Read-only file system); "
        "pick a writable --state-dir or free space there."]


def stored_job(store: JobStore, job_id: str, seq: int, result: list[bytes] | None = None,
               seed: int | None = None) -> None:
    """A job as a server stores it: queued, or done with `result` (files in write order)."""
    job_settings = settings(seed=seq if seed is None else seed)
    frames = clip_pngs(6, shade=seq)
    job = Job(job_id=job_id, seq=seq, client="c-gone", owner=None,
              digest=protocol.request_digest(job_settings, frames), submitted_at=time.time(),
              frames_in=len(frames))
    store.create(job, job_settings, frames)
    if result is not None:
        store.write_result(job_id, result, {"seed": seq})
        job.state, job.finished_at, job.frame_count = JobState.DONE, time.time(), len(result)
        store.write_status(job)


def truncate_status(store: JobStore, job_id: str) -> None:
    status = store.folder(job_id) / "status.json"
    status.write_text(status.read_text()[:20])


def test_a_damaged_store_rebuilds_what_it_can_and_quarantines_the_rest(tmp_path, client_for):
    """Issue 17.5 and defect 3: a damaged status is rebuilt from what the files prove
    (queued, or done); what cannot be rebuilt is quarantined, never deleted, and named in
    a `damaged` error; a result missing a frame is an error, never a shorter result."""
    state = tmp_path / "state"
    store = JobStore(state)
    result = clip_pngs(2, shade=200)
    for seq, job_id in enumerate(["kept", *DAMAGED_JOBS, "done-truncated", "missing-frame",
                                  "changed-frame"]):
        stored_job(store, job_id, seq, result=result)
    for seq, job_id in enumerate(["queued-truncated", "lost-input"], start=10):
        stored_job(store, job_id, seq)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("outside the state folder")
    damage_jobs(store.root, victim)  # truncated and empty-status: status only, result intact
    for job_id in ["done-truncated", "queued-truncated", "lost-input"]:
        truncate_status(store, job_id)
    (store.folder("lost-input") / "input" / "00003.png").unlink()
    (store.folder("missing-frame") / "result" / "00001.png").unlink()
    (store.folder("changed-frame") / "result" / "00000.png").write_bytes(clip_pngs(1)[0])

    server = ServerProcess(state).start()  # the restart
    try:
        client = client_for(server.address)
        for job_id in ["kept", "truncated", "empty-status", "done-truncated"]:
            assert client.status(job_id)["state"] == "done"
            fetched = client.fetch(job_id)
            assert fetched.frames == result and fetched.sidecar["seed"] >= 0
        # accepted, never run, status lost: it runs now
        assert client.wait("queued-truncated", timeout_s=WAIT_S).sidecar["seed"] == 10
        for job_id in ["list-request", "crafted", "lost-input"]:
            with pytest.raises(ClientError) as caught:
                client.status(job_id)
            assert caught.value.code == "damaged"
            assert str(state / "quarantine" / job_id) in str(caught.value)
            assert str(caught.value).endswith("submit the job again with a new id.")
        for job_id in ["missing-frame", "changed-frame"]:
            assert client.status(job_id)["frame_count"] == 2
            with pytest.raises(ClientError) as caught:
                client.fetch(job_id)
            assert caught.value.code == "damaged"
            assert f"The result of job {job_id} is damaged on the server (frame" in str(
                caught.value)
    finally:
        server.stop()
    assert sorted(p.name.rsplit("-", 1)[0] for p in (state / "quarantine").iterdir()) == [
        "crafted", "list-request", "lost-input"]
    assert all(len(list((p / "input").glob("*.png"))) >= 5
               for p in (state / "quarantine").iterdir())  # nothing deleted
    assert (victim / "keep.txt").exists()
    log = server.log()
    assert log.count("Moved the damaged job folder") == 3
    assert log.count("Rebuilt job") == 4
    assert "Traceback" not in log
