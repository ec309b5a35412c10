"""The sidecar's schema (shared/sidecar.py): written once, read back the same, old ones
read where they can be, anything else refused with one sentence."""

from __future__ import annotations

import json

import pytest

from shared.sidecar import SIDECAR_VERSION, Sidecar, SidecarError


def record(**changes) -> Sidecar:
    values = {
        "settings": {"prompt": "a fox", "steps": 3, "guided_steps": None}, "seed": 5,
        "model": "tiny", "steps": 3, "guided_steps": 2, "device": "cpu", "dtype": "float32",
        "input_frame_indices": [0, 2], "windows": [[0, 2]], "inversion_from_cache": False,
        "timings_s": {"sample": 0.5}, "framing": {"mode": "fit"}, "upscaler": None,
        "worker": None, **changes}
    return Sidecar(**values)


def test_a_sidecar_round_trips_through_json_with_its_version_first():
    written = json.loads(json.dumps(record().to_dict()))
    assert next(iter(written)) == "version" and written["version"] == SIDECAR_VERSION == 1
    assert written["guided_steps"] == 2 and written["settings"]["guided_steps"] is None
    assert Sidecar.from_dict(written) == record()


def test_an_older_sidecar_without_a_version_takes_its_steps_from_its_settings():
    older = record().to_dict()
    for key in ("version", "steps", "framing", "upscaler", "worker"):
        del older[key]
    read = Sidecar.from_dict(older)
    assert (read.steps, read.guided_steps, read.framing, read.version) == (3, 2, None, 1)


@pytest.mark.parametrize(("data", "sentence"), [
    ([], "The result's sidecar is not a JSON object; run the job again."),
    ({**record().to_dict(), "version": 2}, "The result's sidecar has version 2, newer than "
     "this Understudy reads (1); update Understudy on this side."),
    ({**record().to_dict(), "version": True}, "The result's sidecar has the version True, "
     "which is not a sidecar version; run the job again."),
    ({**record().to_dict(), "guided_steps": None}, "The result's sidecar has a wrong "
     "'guided_steps' (None); it was not written by this Understudy's engine, so run the job "
     "again."),
    ({**record().to_dict(), "seed": True}, "The result's sidecar has a wrong 'seed' (True); it "
     "was not written by this Understudy's engine, so run the job again."),
    ({key: value for key, value in record().to_dict().items() if key != "model"},
     "The result's sidecar lacks 'model'; it was not written by this Understudy's engine, so "
     "run the job again."),
])
def test_an_unreadable_sidecar_is_one_sentence(data, sentence):
    with pytest.raises(SidecarError) as caught:
        Sidecar.from_dict(data)
    assert str(caught.value) == sentence and caught.value.code == "bad_sidecar"
