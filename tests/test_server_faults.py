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
from shared.client import Client, JobRejected, UnknownJob
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


def done_job(store: JobStore, job_id: str, seq: int) -> None:
    job = Job(job_id=job_id, seq=seq, client="c-gone", owner=None, digest="d",
              submitted_at=time.time(), frames_in=1)
    store.create(job, settings(), clip_pngs(1))
    store.write_result(job_id, clip_pngs(2), {"seed": seq})
    job.state, job.finished_at, job.frame_count = JobState.DONE, time.time(), 2
    store.write_status(job)


def test_a_damaged_store_is_quarantined_and_the_server_starts(tmp_path, client_for):
    """Defect 3: truncated and empty files, a crafted id; nothing deleted, nothing lost."""
    state = tmp_path / "state"
    store = JobStore(state)
    for seq, job_id in enumerate(["kept", *DAMAGED_JOBS]):
        done_job(store, job_id, seq)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("outside the state folder")
    damage_jobs(store.root, victim)

    server = ServerProcess(state, "--keep-jobs", "1").start()
    try:
        client = client_for(server.address)
        assert client.fetch("kept").sidecar == {"seed": 0}
        for job_id in DAMAGED_JOBS:
            with pytest.raises(UnknownJob):
                client.status(job_id)
    finally:
        server.stop()
    assert sorted(p.name.rsplit("-", 1)[0] for p in (state / "quarantine").iterdir()) == sorted(
        DAMAGED_JOBS)
    assert all(len(list((p / "result").glob("*.png"))) == 2
               for p in (state / "quarantine").iterdir())
    assert (victim / "keep.txt").exists()
    assert server.log().count("Moved the damaged job folder") == 4
    assert "Traceback" not in server.log()
