"""Reference images over the wire: a real job server on loopback running the tiny Wan
VACE (`serve --model wan-vace-tiny`), driven through real ZeroMQ sockets. The welcome
announces max_references; a submit carries the references after the clip's and the
masks' frames; they are checked at submit, stored with the job and reach the model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.video import encode_png
from shared import protocol
from shared.client import Client, JobRejected
from tests.server_support import ServerProcess, clip_pngs, mask_pngs, one_reply_server, settings
from tests.test_server import ask, raw_socket

WAIT_S = 300  # a hang guard for a busy machine, not a time limit


def reference_png(seed: int, width: int = 40, height: int = 48) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (height, width, 3), np.uint8))


@pytest.fixture(scope="module")
def vace_server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("vace-server") / "state", "--model",
                            "wan-vace-tiny", "--max-job-megapixels", "0.1").start()
    yield process
    process.stop()


def test_a_job_with_references_is_stored_and_they_reach_the_model(vace_server):
    with Client(vace_server.address, timeout_s=30.0) as client:
        assert client.hello()["max_references"] == 3 and client.max_references == 3
        clip, region = clip_pngs(5), mask_pngs(5)
        job_settings = settings(region_grow=2, region_feather=2)
        references = [reference_png(1)]
        accepted = client.submit("look-1", job_settings, clip, masks=[region],
                                 references=references)
        assert not accepted["duplicate"]
        folder = vace_server.state_dir / "jobs" / "look-1"
        assert [path.read_bytes() for path in sorted((folder / "references").glob("*.png"))] \
            == references
        assert len(json.loads((folder / "request.json").read_text())["references"]) == 1
        # The same request again is a duplicate; another reference is another request.
        assert client.submit("look-1", job_settings, clip, masks=[region],
                             references=references)["duplicate"]
        with pytest.raises(JobRejected) as caught:
            client.submit("look-1", job_settings, clip, masks=[region],
                          references=[reference_png(2)])
        assert caught.value.code == "job_exists"
        client.submit("look-2", job_settings, clip, masks=[region], references=[reference_png(2)])
        first = client.wait("look-1", timeout_s=WAIT_S)
        second = client.wait("look-2", timeout_s=WAIT_S)
    assert first.sidecar["backbone"] == "wan-vace" and first.sidecar["regions"]["composited"]
    assert [entry["width"] for entry in first.sidecar["references"]] == [40]
    assert first.frames != second.frames  # the reference changed the look


def test_bad_references_are_refused_in_one_sentence_before_queueing(vace_server):
    submit = {"v": 1, "type": "submit", "req": 7, "settings": settings()}
    clip = clip_pngs(5)
    cases = [  # (job id, references field, reference images, code, words of its sentence)
        ("r-field", "one", [reference_png(1)], "bad_request", "'references'"),
        ("r-many", 4, [reference_png(k) for k in range(4)], "bad_reference", "at most 3"),
        ("r-broken", 1, [b"garbage"], "bad_reference", "not a readable PNG"),
        ("r-small", 1, [reference_png(1, 8, 8)], "bad_reference", "too small"),
        # The clip fits the pixel budget (0.1 megapixels); with its reference it does not.
        ("r-budget", 1, [reference_png(1, 320, 320)], "too_large", "reference images"),
    ]
    socket = raw_socket(vace_server.address)
    try:
        for job_id, count, references, code, words in cases:
            header = json.dumps({**submit, "job_id": job_id, "references": count}).encode()
            reply = ask(socket, [header, *clip, *references])
            assert reply["type"] == "rejected" and reply["code"] == code, (job_id, reply)
            assert words in reply["message"] and reply["message"].endswith("."), reply
            assert reply["message"].count(". ") == 0, reply
    finally:
        socket.close()
    stored = {path.name for path in (vace_server.state_dir / "jobs").iterdir()}
    assert not stored & {case[0] for case in cases}


def test_the_client_sends_no_reference_to_a_server_that_announces_none():
    """A server whose model takes none (max_references 0, or older: no field at all)."""
    for welcome in ({"max_references": 0}, {}):
        reply = {"type": "welcome", "server": "understudy", "limits": {"max_frames": 8},
                 **welcome}
        with one_reply_server(lambda header, reply=reply: protocol.encode(
                {**reply, "req": header["req"]})) as address:
            with Client(address, timeout_s=30.0) as client:
                with pytest.raises(JobRejected, match="The server's model takes no reference "
                                                      "image") as caught:
                    client.submit("r-none", settings(), clip_pngs(5),
                                  references=[reference_png(1)])
        assert caught.value.code == "bad_reference"
