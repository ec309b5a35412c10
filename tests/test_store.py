"""The job store and the book's recovery: what is on disk, in which order, and what a
restart makes of it. In-process and without sockets; tests/test_server*.py run the
same code as real server processes.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from backend.server.book import JobBook, Retention
from backend.server.requests import Requests
from backend.server.store import Job, JobStore, StoreUnavailable
from backend.server.transport import Incoming
from shared import protocol
from shared.protocol import JobState, ProtocolError
from tests.server_support import DAMAGED_JOBS, clip_pngs, damage_jobs, settings


def make_job(job_id: str, seq: int, state: JobState = JobState.QUEUED, **fields) -> Job:
    job = Job(job_id=job_id, seq=seq, client="c-1", owner=None, digest="d",
              submitted_at=time.time(), **fields)
    job.state = state
    return job


def stored(tmp_path: Path, jobs: list[Job]) -> JobStore:
    store = JobStore(tmp_path)
    for job in jobs:
        store.create(job, {"prompt": "p"}, [b"a"])
    return store


def recovered(tmp_path: Path, jobs: list[Job], **retention) -> JobBook:
    stored(tmp_path, jobs)
    book = JobBook(JobStore(tmp_path), max_queue=16, retention=Retention(**retention))
    book.recover()
    return book


def status_on_disk(store: JobStore, job_id: str) -> dict:
    return json.loads((store.folder(job_id) / "status.json").read_text())


# --------------------------------------------------------------------------- contents


def test_store_keeps_inputs_request_status_and_result(tmp_path):
    store = JobStore(tmp_path)
    store.create(make_job("j1", 0), {"prompt": "p"}, [b"a", b"b"])
    folder = store.folder("j1")
    assert [p.name for p in store.input_paths("j1")] == ["00000.png", "00001.png"]
    assert [p.read_bytes() for p in store.input_paths("j1")] == [b"a", b"b"]
    assert status_on_disk(store, "j1")["state"] == "queued"
    assert store.read_request("j1")["settings"] == {"prompt": "p"}
    assert not list(folder.rglob("*.tmp"))
    store.write_result("j1", [b"r"], {"seed": 3})
    assert store.read_result("j1", 1) == ({"seed": 3}, [b"r"])


def test_store_removes_submits_that_were_never_acknowledged(tmp_path):
    store = stored(tmp_path, [make_job("kept", 0)])
    half = store.folder("half")
    (half / "input").mkdir(parents=True)
    (half / "request.json").write_text("{}")  # crashed before status.json
    assert [job.job_id for job in store.load_all()] == ["kept"]
    assert not half.exists()


# --------------------------------------------------------------------------- write order (issue 13)


class FileSystemCalls:
    """Records writes, fsyncs and renames, and can crash the process at the n-th one."""

    def __init__(self, monkeypatch, crash_at: int | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.crash_at = crash_at
        real_open, real_fsync, real_replace = builtins.open, os.fsync, os.replace

        def record(kind: str, path) -> None:
            if self.crash_at is not None and len(self.calls) == self.crash_at:
                raise Crash(f"crash before {kind} {path}")
            self.calls.append((kind, os.fspath(path)))

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, str | os.PathLike) and any(c in mode for c in "wax+"):
                record("write", file)
            return real_open(file, mode, *args, **kwargs)

        def fsync(descriptor: int) -> None:
            record("fsync", os.readlink(f"/proc/self/fd/{descriptor}"))
            real_fsync(descriptor)

        def replace(source, target) -> None:
            record("rename", f"{os.fspath(source)} -> {os.fspath(target)}")
            real_replace(source, target)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path: str) -> int:
        return self.calls.index((kind, path))

    def rename_index(self, target: Path) -> int:
        return next(i for i, (kind, what) in enumerate(self.calls)
                    if kind == "rename" and what.endswith(f"-> {target}"))


class Crash(BaseException):
    """Stands for the process dying: no except clause of the store runs."""


def test_every_job_file_is_written_to_a_temporary_name_fsynced_and_renamed(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    recorder = FileSystemCalls(monkeypatch)
    store.create(make_job("j", 0), {"prompt": "p"}, [b"a", b"b"])
    store.write_result("j", [b"r"], {"seed": 1})
    folder = store.folder("j")
    finals = [folder / "input" / "00000.png", folder / "input" / "00001.png",
              folder / "request.json", folder / "status.json", folder / "result" / "00000.png",
              folder / "result" / "frames.json", folder / "result" / "sidecar.json"]
    for final in finals:
        temporary = f"{final}.tmp"
        assert ("write", str(final)) not in recorder.calls, f"{final} written in place"
        written = recorder.index("write", temporary)
        synced = recorder.index("fsync", temporary)
        renamed = recorder.index("rename", f"{temporary} -> {final}")
        assert written < synced < renamed, final


def test_inputs_and_request_are_on_disk_before_the_status_that_names_them(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    recorder = FileSystemCalls(monkeypatch)
    store.create(make_job("j", 0), {"prompt": "p"}, clip_pngs(3))
    folder = store.folder("j")
    status = recorder.rename_index(folder / "status.json")
    for earlier in [*(folder / "input").iterdir(), folder / "request.json"]:
        assert recorder.rename_index(earlier) < status, earlier
    assert recorder.index("fsync", str(folder / "input")) < status  # the renames are durable
    assert recorder.index("fsync", str(folder)) > status


def test_a_job_interrupted_while_being_created_is_never_listed(tmp_path, monkeypatch):
    """Crash the store before each of its file-system calls in turn, then restart: until
    status.json is renamed into place the job does not exist; after that it is whole."""
    frames = clip_pngs(3)
    store = JobStore(tmp_path / "count")
    counting = FileSystemCalls(monkeypatch)
    store.create(make_job("j", 0), {"prompt": "p"}, frames)
    monkeypatch.undo()
    commit = counting.rename_index(store.folder("j") / "status.json")
    assert commit > 8
    for crash_at in range(len(counting.calls)):
        folder = tmp_path / f"crash-{crash_at}"
        store = JobStore(folder)
        FileSystemCalls(monkeypatch, crash_at=crash_at)
        with pytest.raises(Crash):
            store.create(make_job("j", 0), {"prompt": "p"}, frames)
        monkeypatch.undo()
        listed = JobStore(folder).load_all()
        if crash_at <= commit:
            assert listed == [], f"listed after a crash before call {crash_at}"
        else:
            assert [job.job_id for job in listed] == ["j"]
            assert [p.read_bytes() for p in store.input_paths("j")] == frames


# --------------------------------------------------------------------------- damage (defect 3)


def test_damaged_jobs_are_quarantined_never_deleted_and_the_store_loads(tmp_path):
    store = stored(tmp_path / "state", [make_job(job_id, seq) for seq, job_id in enumerate(
        ["good", "renamed", *DAMAGED_JOBS])])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    damage_jobs(store.root, victim)
    renamed = store.folder("renamed") / "request.json"  # a copy of another job's folder
    renamed.write_text(json.dumps({**json.loads(renamed.read_text()), "job_id": "good"}))

    # A damaged status.json with intact inputs is rebuilt (queued); a damaged request is not.
    reloaded = JobStore(tmp_path / "state")
    loaded = reloaded.load_all()
    assert [(job.job_id, job.state) for job in loaded] == [
        ("good", "queued"), ("truncated", "queued"), ("empty-status", "queued")]
    quarantined = sorted(p.name.rsplit("-", 1)[0] for p in store.quarantine.iterdir())
    assert quarantined == sorted(["renamed", "list-request", "crafted"])
    assert sorted(reloaded.quarantined) == ["crafted", "list-request", "renamed"]
    for folder in store.quarantine.iterdir():
        assert (folder / "input" / "00000.png").read_bytes() == b"a"  # everything kept
    assert (victim / "precious.txt").read_text() == "keep me"
    assert status_on_disk(store, "truncated")["state"] == "queued"  # the disk agrees again
    # The next start still knows what lies in quarantine (and quarantines nothing more).
    again = JobStore(tmp_path / "state")
    assert len(again.load_all()) == 3
    assert {job_id: place.folder for job_id, place in again.quarantined.items()} == {
        job_id: place.folder for job_id, place in reloaded.quarantined.items()}


def test_a_damaged_status_is_rebuilt_from_what_the_files_prove(tmp_path):
    """Done when the result verifies, queued when only the inputs do, quarantined when
    neither does."""
    store = stored(tmp_path, [make_job(job_id, seq) for seq, job_id in enumerate(
        ["finished", "half-finished", "accepted", "lost-input", "changed-input"])])
    store.write_result("finished", [b"r1", b"r2"], {"seed": 1})
    store.write_result("half-finished", [b"r1", b"r2"], {"seed": 2})
    (store.folder("half-finished") / "result" / "00001.png").unlink()  # then the crash
    (store.folder("lost-input") / "input" / "00000.png").unlink()
    (store.folder("changed-input") / "input" / "00000.png").write_bytes(b"b")
    for job_id in ["finished", "half-finished", "accepted", "lost-input", "changed-input"]:
        status = store.folder(job_id) / "status.json"
        status.write_text(status.read_text()[:15])

    book = JobBook(JobStore(tmp_path), max_queue=16, retention=Retention())
    book.recover()
    assert book.view("finished", None)["state"] == "done"
    assert book.view("finished", None)["frame_count"] == 2
    assert book.result("finished", None) == ({"seed": 1}, [b"r1", b"r2"])
    assert book.view("half-finished", None)["state"] == "queued"  # it runs again
    assert book.client_of("accepted") == ("c-1", None)  # its events still reach its client
    assert [job_id for job_id, *_ in book.queue_positions()] == ["half-finished", "accepted"]
    for job_id in ["lost-input", "changed-input"]:
        with pytest.raises(ProtocolError) as caught:
            book.view(job_id, None)
        assert caught.value.code == "damaged"
        assert str(book.store.quarantine) in caught.value.message
        assert caught.value.message.count(";") == 1 and caught.value.message.endswith(".")


def test_a_job_with_regions_keeps_its_masks_and_is_rebuilt_only_when_they_verify(tmp_path):
    store = JobStore(tmp_path)
    for seq, job_id in enumerate(["masked", "lost-mask", "changed-mask"]):
        store.create(make_job(job_id, seq), {"prompt": "p"}, [b"a", b"b"],
                     [[b"m0", b"m1"], [b"n0", b"n1"]])
    assert [[path.read_bytes() for path in region] for region in store.mask_paths("masked", 2)] == [
        [b"m0", b"m1"], [b"n0", b"n1"]]
    assert len(store.read_request("masked")["masks"]) == 2
    (store.folder("lost-mask") / "mask" / "1" / "00001.png").unlink()
    (store.folder("changed-mask") / "mask" / "0" / "00000.png").write_bytes(b"x")
    for job_id in ["masked", "lost-mask", "changed-mask"]:
        status = store.folder(job_id) / "status.json"
        status.write_text(status.read_text()[:15])
    book = JobBook(JobStore(tmp_path), max_queue=16, retention=Retention())
    book.recover()
    assert book.view("masked", None)["state"] == "queued"  # its inputs and masks verify
    for job_id in ["lost-mask", "changed-mask"]:
        with pytest.raises(ProtocolError) as caught:
            book.view(job_id, None)
        assert caught.value.code == "damaged"


def test_a_job_with_references_keeps_them_and_is_rebuilt_only_when_they_verify(tmp_path):
    store = JobStore(tmp_path)
    for seq, job_id in enumerate(["referenced", "lost-reference", "changed-reference"]):
        store.create(make_job(job_id, seq), {"prompt": "p"}, [b"a", b"b"], references=[b"r0", b"r1"])
    assert [path.read_bytes() for path in store.reference_paths("referenced")] == [b"r0", b"r1"]
    assert len(store.read_request("referenced")["references"]) == 2
    assert store.reference_paths("unknown") == []
    (store.folder("lost-reference") / "references" / "00001.png").unlink()
    (store.folder("changed-reference") / "references" / "00000.png").write_bytes(b"x")
    for job_id in ["referenced", "lost-reference", "changed-reference"]:
        status = store.folder(job_id) / "status.json"
        status.write_text(status.read_text()[:15])
    book = JobBook(JobStore(tmp_path), max_queue=16, retention=Retention())
    book.recover()
    assert book.view("referenced", None)["state"] == "queued"  # its references verify
    for job_id in ["lost-reference", "changed-reference"]:
        with pytest.raises(ProtocolError) as caught:
            book.view(job_id, None)
        assert caught.value.code == "damaged"


@pytest.mark.parametrize("damage", ["missing", "changed", "unlisted"])
def test_a_result_with_a_missing_or_changed_frame_is_an_error_never_a_shorter_result(
        tmp_path, damage):
    book = recovered(tmp_path, [make_job("j", 0)])
    book.store.write_result("j", [b"r1", b"r2"], {"seed": 1})
    assert book.claim_next(threading.Event(), wait_s=0).job_id == "j"
    assert book.finish("j", JobState.DONE, frame_count=2)
    result = book.store.folder("j") / "result"
    if damage == "missing":
        (result / "00001.png").unlink()
    elif damage == "changed":
        (result / "00001.png").write_bytes(b"r3")
    else:
        (result / "frames.json").unlink()
    with pytest.raises(ProtocolError) as caught:
        book.result("j", None)
    assert caught.value.code == "damaged"
    assert caught.value.message.startswith("The result of job j is damaged on the server (")
    assert caught.value.message.endswith("submit the job again with a new id.")


def test_an_unwritable_state_folder_is_one_sentence(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable, match="pick a writable --state-dir") as caught:
        JobStore(blocker / "state")
    assert str(caught.value).count(".") >= 1 and "\n" not in str(caught.value)


# --------------------------------------------------------------------------- recovery


def test_restart_reruns_the_running_job_first_then_the_queue(tmp_path):
    book = recovered(tmp_path, [make_job("q1", 0), make_job("r", 1, JobState.RUNNING, attempts=1),
                                make_job("q2", 2)])
    assert [job_id for job_id, *_ in book.queue_positions()] == ["r", "q1", "q2"]
    assert book.view("r", None)["state"] == "queued"
    assert status_on_disk(book.store, "r")["state"] == "queued"


def test_restart_fails_a_job_interrupted_twice_and_honours_cancel(tmp_path):
    book = recovered(tmp_path, [make_job("twice", 0, JobState.RUNNING, attempts=2),
                                make_job("stop", 1, JobState.RUNNING, attempts=1,
                                         cancel_requested=True)])
    assert book.queue_positions() == []
    assert book.view("twice", None)["error"]["code"] == "interrupted"
    assert book.view("stop", None)["state"] == "cancelled"


def test_retention_keeps_the_newest_finished_jobs(tmp_path):
    now = time.time()
    jobs = [make_job(f"d{i}", i, JobState.DONE, finished_at=now - 100 + i) for i in range(3)]
    book = recovered(tmp_path, [*jobs, make_job("q", 3)], keep_jobs=2)
    assert [job["job_id"] for job in book.jobs_of("c-1", None)] == ["d1", "d2", "q"]
    assert not book.store.folder("d0").exists()


def test_retention_drops_results_past_the_time_limit(tmp_path):
    old = make_job("old", 0, JobState.DONE, finished_at=time.time() - 7200)
    new = make_job("new", 1, JobState.FAILED, finished_at=time.time())
    book = recovered(tmp_path, [old, new], keep_hours=1.0)
    assert [job["job_id"] for job in book.jobs_of("c-1", None)] == ["new"]


# --------------------------------------------------------------------------- submit and the disk


class StandInEngine:
    """Accepts every setting; these tests never run a job."""

    def describe(self) -> dict:
        return {"model": "stand-in", "device": "cpu"}

    def check_settings(self, settings, clip_length: int, frame_size=None) -> None:
        pass

    def transfer(self, clip_frames, settings, progress=None, cancelled=None):
        raise AssertionError("not run here")


def submit(requests: Requests, job_id: str) -> dict:
    header = {"v": 1, "type": "submit", "req": 1, "job_id": job_id, "settings": settings()}
    frames = protocol.encode(header, clip_pngs(6))
    return requests.answer(Incoming(b"c-1", None, frames)).reply


def requests_on(store: JobStore) -> Requests:
    book = JobBook(store, max_queue=16, retention=Retention())
    return Requests(book, StandInEngine(), dict(protocol.DEFAULT_LIMITS), 1.0,
                    secure=lambda: False, dropped=lambda: 0)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EMFILE])
def test_accepted_is_only_said_once_the_job_is_on_disk(tmp_path, monkeypatch, code):
    store = JobStore(tmp_path)
    requests = requests_on(store)
    real_replace = os.replace

    def failing_status(source, target):
        if str(target).endswith("status.json"):
            raise OSError(code, os.strerror(code), str(target))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_status)
    reply = submit(requests, "first")
    assert reply["type"] == "rejected" and reply["code"] == "store_unavailable"
    assert os.strerror(code) in reply["message"] and reply["message"].endswith("by itself.")
    assert not store.folder("first").exists()  # no half-written folder left behind
    assert requests.book.health() is not None
    monkeypatch.undo()  # space is back
    reply = submit(requests, "first")
    assert reply["type"] == "accepted" and reply["req"] == 1
    assert requests.book.health() is None
    on_disk = JobStore(tmp_path).load_all()
    assert [job.job_id for job in on_disk] == ["first"] and on_disk[0].frames_in == 6
    assert len(store.input_paths("first")) == 6


def test_the_book_changes_a_job_only_after_the_disk_has_it(tmp_path, monkeypatch):
    store = JobStore(tmp_path)
    requests = requests_on(store)
    assert submit(requests, "j")["type"] == "accepted"
    monkeypatch.setattr(os, "replace", lambda *_: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    reply = requests.answer(Incoming(b"c-1", None, protocol.encode(
        {"type": "cancel", "req": 2, "job_id": "j"}))).reply
    assert reply["code"] == "store_unavailable" and reply["req"] == 2
    monkeypatch.undo()
    assert requests.book.view("j", None)["state"] == "queued"
    assert status_on_disk(store, "j")["state"] == "queued"


def test_a_job_input_is_decoded_only_where_the_settings_pick(tmp_path):
    """The worker hands the engine a lazy clip; the unused frame is never decoded."""
    from backend.server.frames import PngClip

    frames = clip_pngs(6)
    frames[1] = frames[1][:40]  # broken, and not one of round(linspace(0, 5, 4)) = 0 2 3 5
    store = JobStore(tmp_path)
    store.create(make_job("j", 0), {"prompt": "p"}, frames)
    clip = PngClip(store.input_paths("j"), "job j")
    from backend.video import sample_indices

    assert clip[sample_indices(len(clip), 4)].shape == (4, 32, 48, 3)
    assert isinstance(clip[np.array([0, 2])], np.ndarray)


def test_finished_takes_are_proved_at_start_up_and_a_changed_one_is_made_again(tmp_path):
    """Issue 27: takes on disk are checked like results; a rebuilt job keeps the takes
    its files prove."""
    store = JobStore(tmp_path)
    job = make_job("takes", 0, JobState.RUNNING, takes=3)
    store.create(job, {"prompt": "p", "seed": 1}, [b"a"], takes={"seeds": 3, "prompts": None})
    for take in (1, 2):
        store.write_take("takes", take, [b"frame-%d" % take], {"take": take, "seed": take})
    job.takes_done = [1, 2]
    store.write_status(job)
    (store.folder("takes") / "takes" / "2" / "00000.png").write_bytes(b"changed")
    [loaded] = JobStore(tmp_path).load_all()
    assert (loaded.takes, loaded.takes_done) == (3, [1])  # take 2 is made again
    assert JobStore(tmp_path).read_take("takes", 1) == ({"take": 1, "seed": 1}, [b"frame-1"])
    (store.folder("takes") / "status.json").write_text("{")  # damaged: rebuilt from files
    [rebuilt] = JobStore(tmp_path).load_all()
    assert (rebuilt.state, rebuilt.takes_done) == (JobState.QUEUED, [1])
