"""The sidecar: how one result was made, as one typed record with a version.

The engine builds it (backend/method/engine.py, `Engine.transfer`); everything else reads it
through `Sidecar.from_dict`: the command line writes it beside the video (out.json),
the server stores it with the result and sends it in `result_ready` and `result`, a
Ray worker adds where the job ran, and the Blender extension summarises it in its
panel. Its JSON form is `Sidecar.to_dict()`; docs/protocol.md lists the fields.

`settings` is the request as the engine read it, so an automatic count stays None
there (`guided_steps: null`); the settings the model decides (size, window, prompt
prefix, negative prompt, CFG scale, guidance schedule) hold the values its backbone gave
them. The counts the edit actually used are the top-level `steps` and `guided_steps`.
Anything that reports how a result was made reads those. `backbone` names the model's
backbone ("zeroscope" or "wan").

Version 1 is the first with a `version` field. An older sidecar (no `version`) is
read when it holds what version 1 needs, its sampling step count taken from its
settings (it had no top-level `steps`); a sidecar from a newer Understudy, or one
missing a needed field, is refused with one sentence (SidecarError).

Standard library only: the Blender extension vendors shared/.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

from .errors import UnderstudyError

SIDECAR_VERSION = 1


class SidecarError(UnderstudyError):
    """A sidecar that cannot be read as this version's record."""

    code = "bad_sidecar"


@dataclass(frozen=True)
class Sidecar:
    """One result's record. Field order is the JSON's key order."""

    settings: dict[str, Any]  # the request as the engine read it (TransferSettings.to_dict())
    seed: int  # the seed the edit used (drawn when the request had none)
    model: str  # the first stage's model id
    steps: int  # sampling steps the edit ran
    guided_steps: int  # of those, the steps that ran guidance (the count used, never None)
    device: str
    dtype: str
    input_frame_indices: list[int]  # the clip frames the model edited, in order
    windows: list[list[int]]  # temporal windows [start, end) over the edited frames
    inversion_from_cache: bool
    timings_s: dict[str, float]  # seconds per stage
    framing: dict[str, Any] | None = None  # backend/method/framing.py Framing.to_dict(); None: older
    upscaler: dict[str, Any] | None = None  # {"model", "steps"} when the XL stage ran
    backbone: str | None = None  # "zeroscope" or "wan" (backend/backbones/); None: older
    # {"count", "grow", "feather", "motion", "composited"} when the edit had regions or
    # camera motion (backend/method/regions.py); None: the whole frame, as before
    regions: dict[str, Any] | None = None
    # The reference images the edit was conditioned on (Wan VACE), in order: each one's
    # {"width", "height", "sha256"} (of its RGB pixels, backend/references.py); None: none
    references: list[dict[str, Any]] | None = None
    worker: dict[str, Any] | None = None  # where a Ray worker ran the job (backend/cluster)
    # A job run by a gang of GPUs (`serve --ray … --gang N`, backend/cluster/gang.py):
    # {"size": N, "rank": the rank that wrote the result (0), "split": whether the model's
    # work was split over the ranks (Wan) or ran on that rank alone (ZeroScope)}; None: one GPU
    gang: dict[str, Any] | None = None
    # `--memory auto`'s choice: {"savers": [...], "predicted_peak_bytes", "budget_bytes"};
    # None: nothing planned (memory "off", or no GPU to fit)
    memory: dict[str, Any] | None = None
    # What the edit cost (backend/method/cost.py edit_cost): {"forward_equivalents":
    # {"invert", "sample", "decode", "total"} in full-model-pass units (FE, the first
    # stage's), "seconds": {phase: wall seconds, …, "total"}, "truncated_pass_share": the
    # share a truncated pass was weighed by}; None: older
    cost: dict[str, Any] | None = None
    # An edit of several takes (`transfer --takes K`, repeated `--prompt`): one entry per
    # take, in order: that take's own sidecar (these fields, its `cost` its share of the
    # run) with "take": k (from 1), "prompt", "video" and "frames_dir", the paths relative
    # to the sidecar's folder ("frames_dir" None when no frames were asked for). The
    # fields above are the first take's. None: one take.
    takes: list[dict[str, Any]] | None = None
    version: int = SIDECAR_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: `version` first, then the fields in order."""
        data = asdict(self)
        return {"version": data.pop("version"), **data}

    @classmethod
    def from_dict(cls, data: Any) -> Sidecar:
        """Read a sidecar's JSON object (this version's or an older one without `version`).

        Raises SidecarError with one sentence for a newer version, a missing field or a
        field of the wrong JSON type.
        """
        if not isinstance(data, dict):
            raise SidecarError("The result's sidecar is not a JSON object; run the job again.")
        version = data.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise SidecarError(f"The result's sidecar has the version {version!r}, which is not "
                               "a sidecar version; run the job again.")
        if version > SIDECAR_VERSION:
            raise SidecarError(
                f"The result's sidecar has version {version}, newer than this Understudy reads "
                f"({SIDECAR_VERSION}); update Understudy on this side.")
        data = dict(data)
        if version == 0 and "steps" not in data and isinstance(data.get("settings"), dict):
            data["steps"] = data["settings"].get("steps")  # before version 1: only the request's
        values: dict[str, Any] = {}
        for item in fields(cls):
            if item.name == "version":
                continue
            present = item.name in data
            if not present and item.default is not MISSING:
                continue
            value = data.get(item.name)
            if not present or not _has_type(value, _JSON_TYPES[item.name], item.default is None):
                raise SidecarError(
                    f"The result's sidecar {'lacks' if not present else 'has a wrong'} "
                    f"'{item.name}'{'' if not present else f' ({value!r})'}; it was not written "
                    "by this Understudy's engine, so run the job again.")
            values[item.name] = value
        return cls(**values)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "settings": dict, "seed": int, "model": str, "steps": int, "guided_steps": int,
    "device": str, "dtype": str, "input_frame_indices": list, "windows": list,
    "inversion_from_cache": bool, "timings_s": dict, "framing": dict, "upscaler": dict,
    "backbone": str, "regions": dict, "worker": dict, "gang": dict, "memory": dict, "cost": dict,
    "takes": list, "references": list,
}


def _has_type(value: Any, kind: type | tuple[type, ...], may_be_none: bool) -> bool:
    if value is None:
        return may_be_none
    if isinstance(value, bool) and kind is not bool:
        return False  # JSON true is not a number
    return isinstance(value, kind)
