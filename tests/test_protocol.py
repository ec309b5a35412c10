"""The wire protocol's encoding and validation, the bind policy and the submit-time
frame checks (no sockets here: tests/test_server*.py run real servers; the job store
and recovery are in tests/test_store.py)."""

from __future__ import annotations

import ast
import json
import sys

import pytest

from backend.server import ServerConfigError, check_bind_allowed, is_loopback
from backend.server.frames import PngClip, check_pixel_budget, check_png_frames
from backend.server.transport import printable
from shared import protocol
from shared.errors import ErrorCode
from shared.protocol import EventType, JobState, ProtocolError, ReplyType, RequestType
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
    (b'{"v": true, "type": "hello"}', "protocol_version"),  # JSON true is not the integer 1
    (b'{"v": 1.0, "type": "hello"}', "protocol_version"),
    (b'{"v": "1", "type": "hello"}', "protocol_version"),
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
    # names are not addresses: whoever owns the name decides where it points
    ("tcp://127.evil.example.com:5555", False), ("tcp://localhost.evil.example.com:1", False),
    ("tcp://127.0.0.1.nip.io:5555", False), ("tcp://[::ffff:10.0.0.1]:1", False),
    ("tcp://[::1:5555", False), ("udp://127.0.0.1:1", False),
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


# --------------------------------------------------------------------------- vocabulary


def test_the_enums_are_the_wire_strings():
    """The extension and older clients compare plain strings; a member must be one."""
    assert JobState.CANCELLED == "cancelled" and EventType.RESULT_READY == "result_ready"
    assert json.dumps({"state": JobState.DONE, "type": RequestType.SUBMIT,
                       "code": ErrorCode.UNKNOWN_JOB}) == (
        '{"state": "done", "type": "submit", "code": "unknown_job"}')
    assert {t.value for t in RequestType} == {"hello", "submit", "status", "cancel", "fetch",
                                              "heartbeat", "plan"}
    assert {t.value for t in EventType} == {"progress", "result_ready", "take_ready", "error",
                                            "cancelled"}
    assert ReplyType.ERROR == EventType.ERROR == "error"


# --------------------------------------------------------------------------- strict JSON (defect 6, 7)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_numbers_that_are_not_json(value):
    with pytest.raises(ProtocolError) as caught:
        protocol.encode({"type": "submit", "settings": {"cfg_scale": value}})
    assert caught.value.code == "bad_request" and "finite" in caught.value.message


def test_encode_refuses_text_that_is_not_unicode():
    with pytest.raises(ProtocolError, match="UTF-8"):
        protocol.encode({"type": "submit", "settings": {"prompt": "a \ud800 bear"}})


@pytest.mark.parametrize("frame, code, words", [
    (b'{"v": 1, "type": "submit", "settings": {"cfg_scale": NaN}}', "bad_header", "NaN"),
    (b'{"v": 1, "type": "submit", "settings": {"cfg_scale": Infinity}}', "bad_header", "Infinity"),
    (b'{"v": 1, "type": "submit", "settings": {"cfg_scale": -Infinity}}', "bad_header", "Infinity"),
    (b'{"v": 1, "type": "submit", "settings": {"cfg_scale": 1e999}}', "bad_header", "1e999"),
    (b'{"v": 1, "type": "submit", "settings": {"prompt": "\\ud800"}}', "bad_request", "Unicode"),
    (b'{"v": 1, "type": "hello", "x": ' + b"[" * 100 + b"]" * 100 + b"}", "bad_header", "nests"),
])
def test_decode_refuses_headers_that_are_not_strict_json(frame, code, words):
    with pytest.raises(ProtocolError) as caught:
        protocol.decode([frame])
    assert caught.value.code == code and words in caught.value.message
    assert caught.value.message.endswith(".")


def test_a_deep_header_is_refused_before_json_recurses():
    frame = b'{"v": 1, "type": "hello", "req": 7, "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(ProtocolError, match="nests deeper"):
        protocol.decode_header(frame[:protocol.MAX_HEADER_BYTES])
    assert protocol.peek_req(frame) == 7


@pytest.mark.parametrize("frame, req", [
    (b'{"v": 1, "type": "hello", "req": 12}', 12),
    (b'{"v": 1, "req": 3, "type": "hello", "pad": "' + b"x" * 70_000 + b'"}', 3),
    (b'{"req": 5, "x": ' + b"[" * 40 + b"]" * 40 + b"}", 5),
    (b'{"v": 1, "type": "hello", "req": true}', None),
    (b"not json", None),
])
def test_peek_req_finds_the_request_number_of_a_broken_header(frame, req):
    assert protocol.peek_req(frame) == req


def test_the_reply_is_bounded_by_the_limits():
    limits = {**protocol.DEFAULT_LIMITS, "max_frames": 8, "max_message_bytes": 2**20}
    protocol.check_reply_size({"num_frames": 8, "width": 64, "height": 64}, limits)
    cases = [{"num_frames": 4, "output_frames": 100_000, "width": 64, "height": 64},
             {"num_frames": 9, "width": 64, "height": 64},
             {"num_frames": 8, "width": 512, "height": 512},
             # an upscaled result has the upscaler's size (8 × 1024 × 576 × 3 > 1 MiB)
             {"num_frames": 8, "width": 64, "height": 64, "upscale": "xl"}]
    for settings in cases:
        with pytest.raises(ProtocolError) as caught:
            protocol.check_reply_size(settings, limits)
        assert caught.value.code == "bad_settings" and caught.value.message.endswith(".")


def test_message_limits_need_only_counts():
    limits = {**protocol.DEFAULT_LIMITS, "max_frames": 2, "max_message_bytes": 100}
    protocol.check_message_limits(2, 100, limits)
    for count, size, code in ((3, 10, "too_many_frames"), (1, 101, "too_large")):
        with pytest.raises(ProtocolError) as caught:
            protocol.check_message_limits(count, size, limits)
        assert caught.value.code == code


# --------------------------------------------------------------------------- frames (defect 2)


def test_the_pixel_budget_counts_the_frames_used():
    check_pixel_budget(4, (64, 64), max_job_pixels=4 * 64 * 64)
    with pytest.raises(ProtocolError) as caught:
        check_pixel_budget(6, (4096, 4096), max_job_pixels=64 * 2**20)
    assert caught.value.code == "too_large" and "num_frames" in caught.value.message


def test_a_stored_clip_decodes_only_the_frames_asked_for(tmp_path):
    good = clip_pngs(6)
    paths = []
    for index, frame in enumerate(good):
        path = tmp_path / f"{index:05d}.png"
        path.write_bytes(frame if index != 1 else b"not a png at all")
        paths.append(path)
    clip = PngClip(paths, "the test clip")
    assert len(clip) == 6
    import numpy as np

    assert clip[np.array([0, 2, 5])].shape == (3, 32, 48, 3)
    with pytest.raises(Exception, match="Frame 0 of the test clip"):
        clip[np.array([1])]


# --------------------------------------------------------------------------- log safety (defect 8)


def test_client_ids_in_the_log_cannot_forge_lines():
    assert printable(b"c-0123abcd") == "c-0123abcd"
    forged = printable(b"x\n2026-12-01 INFO Accepted job admin\r\x00 \\")
    assert "\n" not in forged and "\r" not in forged and " " not in forged
    assert forged.startswith("x\\x0a2026-12-01")


# --------------------------------------------------------------------------- regions (issue 20)


def test_a_submit_payload_is_the_clip_then_each_regions_masks():
    clip, first, second = [b"c0", b"c1"], [b"a0", b"a1"], [b"b0", b"b1"]
    assert protocol.split_payload(clip, 0) == (clip, [])
    assert protocol.split_payload(clip + first + second, 2) == (clip, [first, second])
    with pytest.raises(ProtocolError, match="not 3 equal parts") as caught:
        protocol.split_payload(clip + first + [b"b0"], 2)
    assert caught.value.code == ErrorCode.BAD_MASK
    for bad in (-1, protocol.MAX_REGIONS + 1, True, 1.0, "1"):
        with pytest.raises(ProtocolError) as caught:
            protocol.check_regions(bad)
        assert caught.value.code == ErrorCode.BAD_REQUEST
    assert protocol.check_regions(None) == 0


def test_regions_change_the_request_digest_and_count_in_the_message_size():
    settings = {"prompt": "a fox"}
    frames = [b"x" * 10] * 4
    assert protocol.request_digest(settings, frames) == protocol.request_digest(settings, frames, 0)
    assert protocol.request_digest(settings, frames) != protocol.request_digest(settings, frames, 1)
    limits = {**protocol.DEFAULT_LIMITS, "max_message_bytes": 50}
    protocol.check_submit_limits(settings, frames[:2], 0, limits)
    with pytest.raises(ProtocolError) as caught:
        protocol.check_submit_limits(settings, frames[:2], 0, limits, [frames[2:]] * 2)
    assert caught.value.code == ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError, match="Region 1 has 1 mask frames but the clip has 2"):
        protocol.check_submit_limits(settings, frames[:2], 0, protocol.DEFAULT_LIMITS, [[b"m"]])


def test_stored_masks_decode_only_the_frames_the_engine_picks(tmp_path):
    import numpy as np

    from backend.server.frames import PngMasks
    from tests.server_support import mask_pngs

    paths = []
    for index, png in enumerate(mask_pngs(3, 8, 6, box=(2, 1, 6, 5), value=128)):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(png)
    paths[1].write_bytes(b"broken")  # never picked, so never read
    masks = PngMasks([paths], "job j")
    assert masks.shape == (1, 3, 6, 8) and len(masks) == 1
    picked = masks[:, np.array([0, 2])]
    assert picked.shape == (1, 2, 6, 8) and picked.dtype == np.float32
    assert picked[0, 0, 1:5, 2:6].min() == np.float32(128 / 255) and picked[0, 0, 0].max() == 0
    with pytest.raises(ProtocolError, match="mask of frame 1 of region 1 of job j is not a "
                                            "readable PNG") as caught:
        np.asarray(masks)
    assert caught.value.code == ErrorCode.BAD_MASK


def test_the_results_alpha_is_the_feathered_region_in_its_box_of_whole_frames():
    import numpy as np

    from backend.results import plate_alpha

    plate = np.array([[[0.0, 0.5, 1.0], [0.2, 1.0, 0.0]]], np.float32)  # (1, 2, 3) in a box
    alpha = plate_alpha(plate, (1, 2, 4, 4), (5, 5))  # box x 1-4, y 2-4 of 5×5 frames
    assert alpha.dtype == np.uint8 and alpha.shape == (1, 5, 5)
    assert alpha[0, 2:4, 1:4].tolist() == [[0, 128, 255], [51, 255, 0]]  # round(255·m)
    outside = np.ones((5, 5), bool)
    outside[2:4, 1:4] = False
    assert (alpha[0][outside] == 0).all()
