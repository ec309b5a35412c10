"""backend/framing.py: model sizes for every clip shape, crop boxes, refusals."""

from __future__ import annotations

import pytest

from backend.framing import Box, centre_crop_box, check_aspect, fit_size

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
