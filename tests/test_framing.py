"""backend/method/framing.py: model sizes for every clip shape, crop boxes, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from backend.method.framing import (
    Box,
    centre_crop_box,
    check_aspect,
    choose_framing,
    fit_size,
    frames_for_model,
    paste_into_box,
)

ZEROSCOPE_BUDGET = 576 * 320
CELL = 8


@pytest.mark.parametrize(("source", "expected"), [
    ((1920, 1080), (576, 320)),  # 16:9 stays ZeroScope's native size
    ((1080, 1920), (320, 576)),  # 9:16 is the same, turned
    ((640, 480), (496, 368)),    # 4:3: 368·4/3 = 490.7, 496 is within a cell; 504×376 is over
    ((1000, 1000), (424, 424)),  # square: 432² = 186,624 is over the budget
])
def test_fit_sizes_hand_computed(source, expected):
    assert fit_size(*source, ZEROSCOPE_BUDGET, CELL) == expected


@pytest.mark.parametrize("source", [(w, h) for w in (320, 641, 1280, 1920, 2048)
                                    for h in (360, 480, 577, 1080, 1920)
                                    if max(w / h, h / w) <= 4])
def test_fit_stays_in_budget_on_whole_cells_and_keeps_aspect_within_a_cell(source):
    width, height = source
    columns, rows = fit_size(width, height, ZEROSCOPE_BUDGET, CELL)
    assert columns * rows <= ZEROSCOPE_BUDGET
    assert columns % CELL == 0 and rows % CELL == 0
    assert abs(columns - rows * width / height) <= CELL
    assert abs(rows - columns * height / width) <= CELL
    assert columns * rows >= 0.85 * ZEROSCOPE_BUDGET  # it uses the budget, not a sliver of it


def test_centre_crop_boxes():
    # a vertical phone frame: a 1080-wide band of 1080/1.8 = 600 rows in the middle
    assert centre_crop_box(1080, 1920, 1.8) == Box(0, 660, 1080, 1260)
    # a wide frame: its sides are cut
    assert centre_crop_box(2000, 500, 1.8) == Box(550, 0, 1450, 500)
    # already the right shape: the whole frame
    assert centre_crop_box(576, 320, 1.8) == Box(0, 0, 576, 320)


def test_too_elongated_frames_are_refused_with_a_suggestion():
    check_aspect(1600, 400)
    with pytest.raises(ValueError, match="--framing crop"):
        check_aspect(1700, 400)
    with pytest.raises(ValueError, match="--framing crop"):
        check_aspect(100, 401)


ZEROSCOPE = (576, 320)
XL = (1024, 576)


@pytest.mark.parametrize(("mode", "source", "box", "model", "upscale"), [
    # fit: the whole frame; XL keeps the aspect in its 589,824 pixels (9:16: exactly 576×1024)
    ("fit", (1080, 1920), (0, 0, 1080, 1920), (320, 576), (576, 1024)),
    # 4:3 in XL's budget: 664·4/3 = 885.3, so 888 (within a cell); 888·664 = 589,632
    ("fit", (640, 480), (0, 0, 640, 480), (496, 368), (888, 664)),
    # crop: the centred 1.8:1 band of a phone frame, 1080×600 from row 660; XL keeps the
    # band's 1.8:1 (1024×568: 1024·568 = 581,632; 1032×576 would be over the budget)
    ("crop", (1080, 1920), (0, 660, 1080, 1260), (576, 320), (1024, 568)),
    # stretch: both stages at their native sizes, whatever the frame
    ("stretch", (1080, 1920), (0, 0, 1080, 1920), (576, 320), (1024, 576)),
])
def test_choose_framing_hand_computed(mode, source, box, model, upscale):
    framing = choose_framing(mode, source, ZEROSCOPE, CELL, XL)
    assert (framing.box, framing.model_size, framing.upscale_size) == (Box(*box), model, upscale)
    assert framing.result_size == upscale
    assert choose_framing(mode, source, ZEROSCOPE, CELL).upscale_size is None
    assert choose_framing(mode, source, ZEROSCOPE, CELL).result_size == model


def test_the_sidecar_record_holds_every_size_and_the_box():
    framing = choose_framing("crop", (1080, 1920), ZEROSCOPE, CELL)
    assert framing.to_dict() == {
        "mode": "crop", "source_size": [1080, 1920], "crop_box": [0, 660, 1080, 1260],
        "model_size": [576, 320], "upscale_size": None, "result_size": [576, 320]}


def test_only_fit_refuses_an_elongated_frame_and_the_sentence_suggests_crop():
    with pytest.raises(ValueError, match=r"^The clip is 2000x400, [^.]*--framing crop\) to edit its centre\.$"):
        choose_framing("fit", (2000, 400), ZEROSCOPE, CELL)
    assert choose_framing("crop", (2000, 400), ZEROSCOPE, CELL).box == Box(640, 0, 1360, 400)
    assert choose_framing("stretch", (2000, 400), ZEROSCOPE, CELL).model_size == ZEROSCOPE


def test_frames_for_model_takes_the_box_and_paste_puts_a_result_back_into_it():
    frames = np.zeros((2, 40, 30, 3), np.uint8)
    frames[:, 10:30] = 200  # the crop box of a 30×40 frame at 3:2 is rows 10…29
    framing = choose_framing("crop", (30, 40), (24, 16), CELL)
    assert framing.box == Box(0, 10, 30, 30)
    model_frames = frames_for_model(frames, framing)
    assert model_frames.shape == (2, 16, 24, 3) and (model_frames == 200).all()

    result = np.full((2, 16, 24, 3), 90, np.uint8)
    pasted = paste_into_box(frames, result, framing.box)
    assert pasted.shape == frames.shape
    assert (pasted[:, 10:30] == 90).all()
    assert np.array_equal(pasted[:, :10], frames[:, :10]) and np.array_equal(pasted[:, 30:], frames[:, 30:])


def test_upscaling_runs_the_last_floor_of_steps_times_strength_and_refuses_none():
    from shared.errors import BadSettingsError
    from shared.settings import TransferSettings

    assert TransferSettings(prompt="a train").upscale_step_count() == 35  # ⌊50 · 0.7⌋
    assert TransferSettings(prompt="a train", steps=3).upscale_step_count() == 2  # ⌊2.1⌋
    assert TransferSettings(prompt="a train", upscale_strength=1.0).upscale_step_count() == 50
    TransferSettings(prompt="a train", steps=1)  # without upscaling the strength is unused
    with pytest.raises(BadSettingsError, match=r"^Setting 'upscale_strength' is 0.7, which re-runs "
                                               r"none of the 1 sampling steps"):
        TransferSettings(prompt="a train", steps=1, upscale="xl")
