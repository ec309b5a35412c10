"""ZeroScope's output does not move: frame hashes recorded on the tiny model before the
backbone seam was introduced (commit 028d5d3), for a fixed seed, at 24 frames (one window)
and at 60 frames (four windows). Any change to the ZeroScope path that alters one bit
of one frame fails here."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from backend.edit import load_engine
from backend.method.engine import Procedure
from shared.settings import TransferSettings
from tests.conftest import SMALL_SETTINGS, moving_square_frames

RECORDED = {
    24: ([[0, 24]], "19f153e92ca09b14158ee25e504452d8ba0110cd3a58eb2d60876cf0c8f27923"),
    60: ([[0, 24], [12, 36], [24, 48], [36, 60]],
         "93426ea8114cc8aa203988b221d0e7a360454e067648722027b2759f3545265c"),
}


@pytest.mark.parametrize("frames", sorted(RECORDED))
def test_zeroscope_frames_are_bit_identical_to_the_recorded_ones(frames):
    engine = load_engine("tiny", device="cpu", cache_dir=None)
    clip = np.concatenate([moving_square_frames(12, 64, 64)] * 5)[:frames]
    settings = TransferSettings(**{**SMALL_SETTINGS, "prompt": "a frozen train", "seed": 1234,
                                   "num_frames": frames, "source_prompt": "a square"})
    result = engine.transfer(clip, settings, procedure=Procedure(use_cache=False))
    windows, digest = RECORDED[frames]
    assert result.sidecar.windows == windows
    assert hashlib.sha256(result.frames.tobytes()).hexdigest() == digest
