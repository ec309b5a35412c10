"""shared/settings.py: one place for every setting's name, default and range."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from backend.backbones.zeroscope import (
    REFERENCE_NEGATIVE_PROMPT,
    REFERENCE_PROMPT_PREFIX,
    ZEROSCOPE_FACTS,
)
from backend.cli import add_settings_flags, settings_flags
from shared.errors import BadSettingsError
from shared.settings import DEFAULTS, SPECS, TransferSettings


def zeroscope(**values) -> TransferSettings:
    """Settings as a ZeroScope engine runs them: the model's settings from its backbone."""
    return TransferSettings(**values).resolved(ZEROSCOPE_FACTS.defaults)


def test_defaults_are_the_reference_procedure():
    unresolved = TransferSettings(prompt="a train")
    assert unresolved.to_dict() == {**DEFAULTS, "prompt": "a train"}
    model_decided = ("width", "height", "window_frames", "prompt_prefix", "negative_prompt",
                     "cfg_scale", "guided_fraction", "lr_start", "lr_end", "guidance_block")
    assert {name for name, value in DEFAULTS.items() if value is None} >= set(model_decided)
    settings = zeroscope(prompt="a train")
    assert (settings.steps, settings.guided_step_count(), settings.guidance_iterations) == (50, 20, 10)
    assert (settings.num_frames, settings.frame_limit) == (None, 240)
    assert (settings.width, settings.height) == (576, 320)
    assert (settings.window_frames, settings.window_overlap) == (24, 8)
    assert (settings.lr_start, settings.lr_end, settings.cfg_scale) == (0.007, 0.004, 10.0)
    assert (settings.prompt_prefix, settings.negative_prompt) == (REFERENCE_PROMPT_PREFIX,
                                                                  REFERENCE_NEGATIVE_PROMPT)
    assert settings.guidance_block is None and settings.init == "lowfreq"
    # A value the user gave is kept.
    assert zeroscope(prompt="a train", cfg_scale=7.5, width=320).cfg_scale == 7.5


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["cfg_scale", "lr_start", "lr_end"])
def test_numbers_must_be_finite(name, value):
    with pytest.raises(BadSettingsError, match=f"'{name}'.*finite"):
        TransferSettings(prompt="a train", **{name: value})


def test_nan_never_reaches_json():
    # A NaN that slipped through would be written as bare `NaN`, which is not JSON.
    settings = TransferSettings(prompt="a train")
    json.dumps(settings.to_dict(), allow_nan=False)


@pytest.mark.parametrize("name", ["prompt", "source_prompt", "negative_prompt", "prompt_prefix"])
def test_text_must_encode_as_utf8(name):
    values = {"prompt": "a train", name: "a \udcff train"}
    with pytest.raises(BadSettingsError, match="not valid Unicode"):
        TransferSettings.from_dict(values)


def test_ranges_and_types_are_refused_with_one_sentence():
    cases = {
        "steps": (0, "between 1 and 1000"),
        "width": (570, "multiple of 8"),
        "num_frames": (True, "whole number"),
        "restart": (1, "true or false"),
        "loss": ("l1", "'cosine' or 'l2'"),
        "output_frames": (10**6, "between 1 and 100000"),
        "cfg_scale": ("10", "must be a number"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(BadSettingsError, match=message):
            TransferSettings.from_dict({"prompt": "a train", name: value})


@pytest.mark.parametrize("steps, guided", [(50, 20), (25, 10), (10, 4), (5, 2), (3, 2), (1, 1)])
def test_the_guided_part_is_the_references_fraction_of_the_steps(steps, guided):
    # The reference guides steps − int(steps · 0.6): its min_guidance_timestep is 0.6.
    settings = zeroscope(prompt="a train", steps=steps)
    assert settings.guided_step_count() == guided == steps - int(steps * 0.6)
    assert len(settings.guidance_learning_rates()) == guided
    assert zeroscope(prompt="a train", steps=steps, guided_steps=0).guided_step_count() == 0
    assert zeroscope(prompt="a train", steps=50, guided_fraction=0).guided_step_count() == 0


def test_window_overlap_must_be_less_than_the_window():
    TransferSettings(prompt="a train", window_frames=4, window_overlap=3)
    with pytest.raises(BadSettingsError, match="'window_overlap' is 4; it must be less than"):
        TransferSettings(prompt="a train", window_frames=4, window_overlap=4)


def test_a_bound_may_name_another_setting():
    TransferSettings(prompt="a train", steps=10, guided_steps=10)
    with pytest.raises(BadSettingsError, match="'guided_steps' is 11; it must be between 0 and 10"):
        TransferSettings(prompt="a train", steps=10, guided_steps=11)


def test_unknown_and_missing_names():
    with pytest.raises(BadSettingsError, match="Unknown setting 'stepz'"):
        TransferSettings.from_dict({"prompt": "a train", "stepz": 3})
    with pytest.raises(BadSettingsError, match="prompt is empty"):
        TransferSettings.from_dict({})
    with pytest.raises(BadSettingsError, match="prompt is empty"):
        TransferSettings.from_dict({"prompt": "   "})


def test_command_line_flags_are_built_from_the_specs():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    args = parser.parse_args(["--prompt", "a bear", "--frames", "8", "--no-restart",
                              "--cfg-scale", "7.5", "--loss", "l2"])
    assert (args.num_frames, args.restart, args.cfg_scale, args.loss) == (8, False, 7.5, "l2")
    assert args.steps == DEFAULTS["steps"]
    flagged = {action.dest for action in parser._actions if action.option_strings}
    assert flagged == {name for name, spec in SPECS.items() if spec.flag} | {"help"}
    assert settings_flags({"num_frames": 8, "guidance_iterations": 2}) == [
        "--frames", "8", "--iterations", "2"]
