"""What an edit cost, in forward-equivalents (FE) and wall seconds: the one conversion
of the engine's `model_passes` (Engine.model_passes) into FE, for the sidecar's `cost`
(shared/sidecar.py) and for `bench` (backend/tools/bench.py) alike.

A full model pass over one batch element (one window) is 1 FE; a pass that stops after
the feature taps (ZeroScope: up_blocks[1]; Wan: the guidance block) counts its share s
of a full pass; a backward pass counts twice its forward:

    FE = full + s·truncated + 2s·truncated_backward + 2·full_backward

The forward-equivalents are the first stage's: the upscaling stage's passes run at another
size (`bench --upscale` weighs them); its wall seconds are in the cost's seconds.
A step-cached pass (a preview's unguided steps, Backbone.step_cache) is counted as a
full one: the count is an upper bound where the cache skips work.
"""

from __future__ import annotations

from collections.abc import Mapping

PHASE_OF_PASS = {"invert": "invert", "features": "invert", "guide": "sample", "sample": "sample"}
"""Engine pass phases → cost phases."""

PHASE_OF_TIMING = {"embed": "invert", "encode_invert": "invert", "sample": "sample",
                   "decode": "decode", "upscale": "upscale", "composite": "composite"}
"""Engine timing names → cost phases (the prompts' embed phase counts as the inversion's)."""


def forward_equivalents(passes: Mapping[tuple[str, str], int],
                        truncated_share: float) -> dict[str, float]:
    """Per cost phase ("invert", "sample", "decode"): the FE of `passes`, counted per
    (engine phase, kind) with kind "full", "truncated", "truncated_backward" or
    "full_backward"."""
    weight = {"full": 1.0, "truncated": truncated_share, "truncated_backward": 2 * truncated_share,
              "full_backward": 2.0}
    out = {"invert": 0.0, "sample": 0.0, "decode": 0.0}
    for (phase, kind), count in passes.items():
        out[PHASE_OF_PASS[phase]] += weight[kind] * count
    return out


def edit_cost(passes: Mapping[tuple[str, str], int], truncated_share: float,
              timings: Mapping[str, float]) -> dict:
    """The sidecar's `cost`: {"forward_equivalents": {phase: FE, ..., "total": FE},
    "seconds": {phase: s, ..., "total": s}, "truncated_pass_share": s} (FE to 0.1,
    seconds to the millisecond)."""
    fe = {phase: round(value, 1) for phase, value in forward_equivalents(passes, truncated_share).items()}
    fe["total"] = round(sum(forward_equivalents(passes, truncated_share).values()), 1)
    seconds: dict[str, float] = {}
    for name, value in timings.items():
        phase = PHASE_OF_TIMING.get(name, name)
        seconds[phase] = round(seconds.get(phase, 0.0) + value, 3)
    seconds["total"] = round(sum(timings.values()), 3)
    return {"forward_equivalents": fe, "seconds": seconds, "truncated_pass_share": truncated_share}
