"""The extension's plain-Python rules for takes (blender_addon/rules/takes.py, names,
the server's max_takes; no Blender needed): which takes to fetch when, which take
Next and Previous show, what Render Final sends, and the takes' names and folders."""

from __future__ import annotations

import pytest

from blender_addon.rules import names, server_hello, takes
from blender_addon.rules.errors import UserError
from shared.protocol import EventType, JobState


@pytest.mark.parametrize(("event", "placed", "expected"), [
    ({"type": EventType.TAKE_READY, "job_id": "j", "take": 2, "takes": 3}, set(), [2]),
    ({"type": "take_ready", "job_id": "j", "take": 2, "takes": 3}, {2}, []),  # placed already
    ({"type": "take_ready", "job_id": "j", "take": 4, "takes": 3}, set(), []),  # not a take
    ({"type": "take_ready", "job_id": "j", "take": True}, set(), []),  # JSON true is no number
    ({"type": EventType.RESULT_READY, "job_id": "j"}, {1}, [2, 3]),  # done: every take left
    ({"state": JobState.DONE, "takes": 3, "takes_done": [1, 2, 3]}, {3}, [1, 2]),
    ({"state": JobState.RUNNING, "takes": 3, "takes_done": [2, 1]}, {1}, [2]),  # reopened
    ({"state": JobState.CANCELLED, "takes": 3, "takes_done": [1]}, set(), [1]),  # kept
    ({"type": EventType.PROGRESS, "take": 2, "takes": 3, "phase": "guide"}, set(), []),
    ({"type": EventType.CANCELLED, "job_id": "j"}, set(), []),
])
def test_takes_to_fetch_names_the_ready_takes_not_yet_placed(event, placed, expected):
    assert takes.takes_to_fetch(event, 3, placed) == expected


@pytest.mark.parametrize(("stack", "shown"), [
    ([(1, 1, False), (2, 2, True), (3, 3, True)], 1),
    ([(1, 1, True), (2, 2, False), (3, 3, True)], 2),
    ([(1, 1, False), (2, 2, True), (3, 3, False)], 3),  # two unmuted: the upper one covers
    ([(1, 1, True), (2, 2, True)], None),
])
def test_the_visible_take_is_the_highest_unmuted_one(stack, shown):
    assert takes.visible_take(stack) == shown


@pytest.mark.parametrize(("visible", "step", "expected"), [
    (1, 1, 2), (2, 1, 3), (3, 1, 1),  # round the end
    (1, -1, 3), (3, -1, 2),
    (None, 1, 1), (None, -1, 1),  # none shown: the first
])
def test_next_and_previous_step_round_the_stack(visible, step, expected):
    assert takes.step_take([3, 1, 2], visible, step) == expected


def test_stepping_an_empty_stack_is_one_sentence():
    with pytest.raises(UserError, match=r"^The take stack holds no takes; make takes with "
                                        r"Preview first\.$"):
        takes.step_take([], None, 1)


def test_render_final_sends_the_takes_own_settings_at_final_quality():
    sidecar = {"settings": {"prompt": "a red fox", "steps": 3, "quality": "preview",
                            "seed": None}, "seed": 8, "prompt": "a blue fox"}
    assert takes.final_values(sidecar, 2) == {"prompt": "a blue fox", "steps": 3,
                                              "quality": "final", "seed": 8}
    del sidecar["prompt"]  # a take of the one prompt: the settings' own
    assert takes.final_values(sidecar, 2)["prompt"] == "a red fox"


@pytest.mark.parametrize("sidecar", [{}, {"settings": {"prompt": "x"}},
                                     {"settings": {"prompt": "x"}, "seed": True}, "not a dict"])
def test_a_take_without_its_settings_or_seed_cannot_be_rendered_again(sidecar):
    with pytest.raises(UserError, match=r"^Take 2's record has no settings or seed to render it "
                                        r"from; make the takes again with Preview\.$"):
        takes.final_values(sidecar, 2)


def test_a_takes_quality_is_its_sidecars():
    assert takes.sidecar_quality({"settings": {"quality": "preview"}}) == "preview"
    assert takes.sidecar_quality({"settings": {"quality": "final"}}) == "final"
    assert takes.sidecar_quality({}) == "final"  # an older sidecar: no preview then


def test_take_names_say_prompt_seed_and_preview():
    assert names.take_strip_name("a  red\nfox", 7, "preview") == "a red fox · seed 7 · preview"
    assert names.take_strip_name("a red fox", 7, "final") == "a red fox · seed 7"
    assert names.stack_name("a red fox", 3) == "a red fox · 3 takes"


def test_a_long_prompt_is_cut_and_the_seed_kept():
    name = names.take_strip_name("ü" * 80, 12345, "preview")
    assert name.endswith("… · seed 12345 · preview")
    assert len(name.encode("utf-8")) <= names.MAX_NAME_BYTES
    assert names.strip_name("ü" * 80) == names.strip_name("ü" * 80, "")  # no suffix: as before


def test_take_folders_sit_in_the_jobs_folder_and_stay_relative():
    assert names.take_folder("//understudy/us-1/", 2) == "//understudy/us-1/take2/"
    assert names.take_folder("/tmp/understudy/us-1", 3) == "/tmp/understudy/us-1/take3/"


@pytest.mark.parametrize(("directory", "expected"), [
    ("/tmp/understudy/us-1/", "//understudy/us-1/"),
    ("/tmp/understudy/us-1/take2/", "//understudy/us-1/take2/"),
    ("/tmp/understudy/us-12/", None),  # another job's folder that starts alike
    ("/elsewhere/", None),
])
def test_a_saved_files_results_and_takes_follow_their_folder(directory, expected):
    assert names.moved_folder(directory, "/tmp/understudy/us-1", "//understudy/us-1/") == expected


def test_takes_go_only_to_a_server_that_makes_them():
    older = {"limits": {"max_frames": 240}}
    newer = {"limits": {"max_frames": 240, "max_takes": 8}}
    assert server_hello.server_max_takes(older) is None
    assert server_hello.server_max_takes(newer) == 8
    server_hello.check_takes(older, 1)  # one take: any server
    server_hello.check_takes(newer, 8)
    with pytest.raises(UserError, match=r"^The server makes one take per job \(it is older than "
                                        r"this extension\); set Takes to 1, or update the "
                                        r"server\.$"):
        server_hello.check_takes(older, 2)
    with pytest.raises(UserError, match=r"^Takes is 9 and the server makes at most 8 takes per "
                                        r"job; set Takes to 8 or fewer\.$"):
        server_hello.check_takes(newer, 9)


def test_progress_says_which_take_is_being_made():
    from blender_addon.rules import job_updates, messages

    update, _ = job_updates.job_update({"type": "progress", "job_id": "j", "phase": "guide",
                                        "step": 1, "total": 4, "take": 2, "takes": 3})
    assert update["phase"] == "guide, take 2 of 3"
    assert messages.progress_text(update["status"], update["phase"], update["percent"]) == \
        "guide, take 2 of 3 25%"
    one, _ = job_updates.job_update({"type": "progress", "phase": "guide", "take": 1, "takes": 1})
    assert one["phase"] == "guide"  # a one-take job: as before
