"""Every backbone Understudy can run, by name: the one table loading, the command line,
the benchmark and the memory plan read.

    entry = backbone_named("wan")         # BackboneEntry: its class, loaders, builders, names
    register(BackboneEntry(name="toy", …))  # a backbone from outside (tests/test_toy_backbone.py)

A backbone is one file (its `Backbone` and `Schedule`, its loading, its tiny model) plus
one `register` line below. Loading picks the entry from a model's name (its tiny or
random-weight model) or from its diffusers model_index.json `_class_name`
(backend/backbones/loading.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.backbones.base import Backbone, BackboneFacts
from backend.backbones.wan import (
    WAN_21_T2V_1_3B,
    WAN_21_T2V_1_3B_FACTS,
    WAN_ARCHITECTURES,
    WAN_RANDOM,
    WAN_TINY,
    Wan,
    load_wan,
)
from backend.backbones.wan_tiny import build_tiny_wan, build_wan_random
from backend.backbones.wan_vace import (
    WAN_VACE_1_3B,
    WAN_VACE_1_3B_FACTS,
    WAN_VACE_ARCHITECTURES,
    WAN_VACE_RANDOM,
    WAN_VACE_TINY,
    WanVace,
    build_tiny_wan_vace,
    build_wan_vace_random,
    load_wan_vace,
)
from backend.backbones.zeroscope import (
    TINY,
    ZEROSCOPE,
    ZEROSCOPE_FACTS,
    ZEROSCOPE_RANDOM,
    ZEROSCOPE_XL,
    ZEROSCOPE_XL_FACTS,
    ZeroScope,
    build_tiny_components,
    build_zeroscope_random_components,
    load_zeroscope,
    load_zeroscope_xl,
)

Load = Callable[[str, torch.device, str | None, str], Backbone]
"""load(model, device, dtype, flag) → the loaded backbone: `model` a hub id, a local
folder, or the entry's tiny or random-weight name; `dtype` "fp16" / "bf16" / "fp32" or
None (the backbone's own choice for the device); `flag` the command-line flag that named
the model, for the missing-weights sentence."""


Shell = Callable[[str, torch.device, str | None], Backbone]
"""shell(model, device, dtype) → that model's backbone on the meta device (see BackboneEntry)."""


@dataclass(frozen=True)
class Upscaling:
    """A backbone's upscaling stage (settings.upscale "xl"): a second model of the same
    backbone that re-draws the first stage's result at a larger size (the engine's step 5).

    default_model   loaded when the upscale model is not named (--upscale-model)
    facts           the second model's facts (its native size)
    load            loads the named upscale model, with those facts
    """

    default_model: str
    facts: BackboneFacts
    load: Load


@dataclass(frozen=True)
class BackboneEntry:
    """One backbone, as everything above the seam finds it.

    name            its BackboneFacts.name, and `bench --arch NAME`
    title           how sentences name it ("ZeroScope")
    backbone        the Backbone class
    pipelines       the model_index.json `_class_name`s whose models it loads
    load            see `Load`
    facts           the published model's facts (`bench --arch NAME` runs at its size)
    tiny            the name of its tiny random model (tests; `bench --arch TINY`)
    build_tiny      the tiny model's components, as the backbone's file builds them
    tiny_clip       (frames, width, height) a benchmark edits on the tiny model
    random          the name of the published architecture with random weights
    build_random    those components, as the backbone's file builds them
    published       the hub id `bench --arch NAME` runs (`random` with --random-weights)
    architectures   model names (the random one, hub ids) → the architecture they have
    shell           shell(model, device, dtype) → the backbone of `model` (its tiny or
                    random name, or one of `architectures`) on the meta device, no
                    weights: what the memory plan runs (backend/memory/planner.py)
    upscaling       its upscaling stage, if it has one
    """

    name: str
    title: str
    backbone: type[Backbone]
    pipelines: tuple[str, ...]
    load: Load
    facts: BackboneFacts
    tiny: str
    build_tiny: Callable[..., Any]
    tiny_clip: tuple[int, int, int]
    random: str
    build_random: Callable[..., Any]
    published: str
    architectures: Mapping[str, str] = field(default_factory=dict)
    shell: Shell | None = None
    upscaling: Upscaling | None = None

    def plannable(self) -> tuple[str, ...]:
        """The model names the memory plan can build a shell of without loading them."""
        if self.shell is None:
            return ()
        return tuple(dict.fromkeys((self.tiny, self.random, *self.architectures)))


_BACKBONES: dict[str, BackboneEntry] = {}


def register(entry: BackboneEntry) -> None:
    """Add a backbone. Its name, model names and pipeline class names must be new."""
    taken = {name for known in _BACKBONES.values()
             for name in (known.name, known.tiny, known.random, *known.pipelines)}
    clashes = taken & {entry.name, entry.tiny, entry.random, *entry.pipelines}
    if clashes:
        raise ValueError(f"backbone {entry.name!r}: {sorted(clashes)} already registered")
    _BACKBONES[entry.name] = entry


def unregister(name: str) -> None:
    """Remove a backbone added with `register` (a test's, when it is done)."""
    del _BACKBONES[name]


def backbones() -> tuple[BackboneEntry, ...]:
    """Every registered backbone, in registration order."""
    return tuple(_BACKBONES.values())


def backbone_named(name: str) -> BackboneEntry:
    return _BACKBONES[name]


def backbone_of_model(model: str) -> BackboneEntry | None:
    """The backbone whose tiny or random-weight model `model` names (None: neither)."""
    return next((entry for entry in _BACKBONES.values() if model in (entry.tiny, entry.random)),
                None)


def backbone_to_plan(model: str) -> BackboneEntry | None:
    """The backbone whose shell the memory plan builds for the model name `model` (None:
    no backbone plans that name without loading it)."""
    return next((entry for entry in _BACKBONES.values() if model in entry.plannable()), None)


def plannable_models() -> tuple[str, ...]:
    """Every model name the memory plan knows without loading it."""
    return tuple(name for entry in _BACKBONES.values() for name in entry.plannable())


def backbone_of_pipeline(class_name: str) -> BackboneEntry | None:
    """The backbone that loads a model_index.json naming `class_name` (None: none does)."""
    return next((entry for entry in _BACKBONES.values() if class_name in entry.pipelines), None)


# The default model's backbone; also what a folder without a model_index.json holds.
DEFAULT_BACKBONE = "zeroscope"

register(BackboneEntry(
    name="zeroscope", title="ZeroScope", backbone=ZeroScope,
    pipelines=("TextToVideoSDPipeline", "VideoToVideoSDPipeline"), load=load_zeroscope,
    facts=ZEROSCOPE_FACTS, tiny=TINY, build_tiny=build_tiny_components, tiny_clip=(8, 128, 64),
    random=ZEROSCOPE_RANDOM, build_random=build_zeroscope_random_components, published=ZEROSCOPE,
    architectures={ZEROSCOPE_RANDOM: "zeroscope_v2_576w", ZEROSCOPE: "zeroscope_v2_576w"},
    shell=ZeroScope.meta_shell,
    upscaling=Upscaling(ZEROSCOPE_XL, ZEROSCOPE_XL_FACTS, load_zeroscope_xl)))
register(BackboneEntry(
    name="wan", title="Wan", backbone=Wan, pipelines=("WanPipeline",), load=load_wan,
    facts=WAN_21_T2V_1_3B_FACTS, tiny=WAN_TINY, build_tiny=build_tiny_wan, tiny_clip=(9, 128, 64),
    random=WAN_RANDOM, build_random=build_wan_random, published=WAN_21_T2V_1_3B,
    architectures=WAN_ARCHITECTURES, shell=Wan.meta_shell))
register(BackboneEntry(
    name="wan-vace", title="Wan VACE", backbone=WanVace, pipelines=("WanVACEPipeline",),
    load=load_wan_vace, facts=WAN_VACE_1_3B_FACTS, tiny=WAN_VACE_TINY,
    build_tiny=build_tiny_wan_vace, tiny_clip=(9, 128, 64), random=WAN_VACE_RANDOM,
    build_random=build_wan_vace_random,
    published=WAN_VACE_1_3B, architectures=WAN_VACE_ARCHITECTURES, shell=WanVace.meta_shell))
