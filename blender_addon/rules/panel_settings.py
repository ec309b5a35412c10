"""The panel's settings as the server takes them: their ranges and choices, and the
settings dict a transfer sends.

Plain Python (no bpy). Every setting's name, default, range and help is
shared/settings.py's, the one place the backend reads them from too.
"""

from __future__ import annotations

from ..vendored import shared_module
from .errors import UserError

SETTINGS = shared_module("settings")  # shared/settings.py: every setting's name, default, range

# The settings the panel edits as whole numbers; their names, defaults and ranges come
# from shared/settings.py, the one place the backend reads them from too.
# num_frames is not one of them: every visible frame of the strip is sent and edited.
PANEL_INT_SETTINGS = ("width", "height", "inversion_steps", "steps", "guided_steps",
                      "guidance_iterations", "region_grow", "region_feather")

# The choice settings the panel offers as drop-downs. Their choices, default and help
# come from shared/settings.py, as the whole-number settings' ranges do.
PANEL_CHOICE_SETTINGS = ("framing", "motion")


def choice_property(name: str) -> dict:
    """items, default and description of a choice setting, for the panel's EnumProperty
    (the setting's help, which says what each choice does, is the tooltip)."""
    spec = SETTINGS.spec_of(name)
    return {"items": [(choice, choice.capitalize(), spec.help) for choice in spec.choices],
            "default": SETTINGS.DEFAULTS[name], "description": spec.help}


def int_property_range(name: str) -> dict[str, int]:
    """default, min, max (and step) of a whole-number setting, for the panel's IntProperty.

    A bound that names another setting (guided_steps <= steps) takes that one's maximum.
    """
    spec = SETTINGS.spec_of(name)
    high = SETTINGS.spec_of(spec.high).high if isinstance(spec.high, str) else spec.high
    default = SETTINGS.DEFAULTS[name]
    if default is None:  # an automatic setting: the panel shows 0 for "automatic"
        return {"default": 0, "min": 0, "max": int(high)}
    bounds = {"default": int(default), "min": int(spec.low), "max": int(high)}
    if spec.multiple_of > 1:
        bounds["step"] = spec.multiple_of
    return bounds


def setting_from_panel(name: str, value: int) -> int | None:
    """A panel number as a setting: 0 in an automatic setting's field means automatic."""
    return None if value == 0 and SETTINGS.DEFAULTS[name] is None else value


def transfer_settings(values: dict, frames_sent: int) -> dict:
    """The settings dict sent to the server: the panel's values plus the frame counts.

    Every frame sent is edited and comes back (num_frames = output_frames = frames
    sent), so the result has one generated frame per source frame. Empty optional text
    and a random seed are left out so the server's defaults apply (it picks and records
    a seed).
    """
    settings = {key: value for key, value in values.items() if value is not None}
    for optional_text in ("source_prompt", "negative_prompt"):
        if optional_text in settings and not settings[optional_text].strip():
            del settings[optional_text]
    settings["num_frames"] = settings["output_frames"] = frames_sent
    try:
        SETTINGS.TransferSettings.from_dict(settings)
    except SETTINGS.BadSettingsError as error:
        raise UserError(str(error)) from None
    return settings
