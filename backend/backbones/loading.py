"""Which backbone a `--model` names, and loading it.

    load_backbone("tiny")                                  # ZeroScope's types, tiny, random
    load_backbone("cerspense/zeroscope_v2_576w")           # ZeroScope v2 (the default)
    load_backbone("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")      # Wan 2.1 (14B loads the same way)
    load_backbone("/models/my-folder")                     # a local diffusers folder

A folder or hub repo is told apart by its diffusers `model_index.json`: its `_class_name`
names the backbone that loads it (backend/backbones/registry.py: "WanPipeline" is Wan,
"TextToVideoSDPipeline" is ZeroScope; a folder without one is the default backbone's).
Each backbone's tiny and random-weight names ("tiny" / "zeroscope-random",
"wan-tiny" / "wan-random") are built by its own loader, for tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from backend.backbones.base import Backbone, choose_device, missing_weights, model_location
from backend.backbones.registry import (
    DEFAULT_BACKBONE,
    BackboneEntry,
    backbone_named,
    backbone_of_model,
    backbone_of_pipeline,
    backbones,
)
from backend.errors import ModelNotFoundError

UPSCALE_FLAG = "--upscale-model"


def pipeline_class(model: str, flag: str = "--model") -> str:
    """The `_class_name` of a folder's or hub repo's model_index.json ("" when it has none).

    Missing weights (no folder, no cached or downloadable hub file) end in one sentence
    naming the `hf download` command."""
    location = model_location(model, flag)
    if Path(location).is_dir():
        index = Path(location) / "model_index.json"
        if not index.is_file():
            return ""
        text = index.read_text()
    else:
        from huggingface_hub import hf_hub_download

        try:
            text = Path(hf_hub_download(location, "model_index.json")).read_text()
        except Exception as error:  # offline, unknown repo, no access: all the same sentence
            raise missing_weights(model, flag) from error
    try:
        return str(json.loads(text).get("_class_name", ""))
    except (ValueError, AttributeError):
        raise ModelNotFoundError(
            f"The model_index.json of {model!r} is not valid JSON; fetch the model again "
            f"with `hf download {model}`.") from None


def backbone_entry(model: str, flag: str = "--model") -> BackboneEntry:
    """The registered backbone that loads `model`: by its tiny or random-weight name, else
    by its model_index.json. ModelNotFoundError (one sentence) for a pipeline no backbone
    loads."""
    named = backbone_of_model(model)
    if named is not None:
        return named
    kind = pipeline_class(model, flag)
    if not kind:
        return backbone_named(DEFAULT_BACKBONE)
    entry = backbone_of_pipeline(kind)
    if entry is None:
        runnable = " or ".join(f"{known.title} ({known.pipelines[0]})" for known in backbones())
        raise ModelNotFoundError(
            f"{model!r} is a {kind}, which Understudy cannot run; give a {runnable} model "
            f"with {flag}.")
    return entry


def load_backbone(model: str, device: str | None = None, dtype: str | None = None,
                  flag: str = "--model") -> Backbone:
    """Load `model` as its backbone, on `device` (default: CUDA if there is one) in
    `dtype` (default: the backbone's for the device: fp16 for ZeroScope, bf16 for Wan on
    CUDA; fp32 on a CPU)."""
    return backbone_entry(model, flag).load(model, choose_device(device), dtype, flag)


def load_upscaler(model: str, device: str | None = None, dtype: str | None = None) -> Backbone:
    """Load `model` as the second stage of upscale "xl": through its backbone's upscaling
    loader (ZeroScope XL's facts), or as a plain model of a backbone without one (the
    engine then refuses to run it, backend/backbones/base.py check_upscaler)."""
    entry = backbone_entry(model, UPSCALE_FLAG)
    load = entry.upscaling.load if entry.upscaling is not None else entry.load
    return load(model, choose_device(device), dtype, UPSCALE_FLAG)


def default_upscaler(model: str) -> str | None:
    """The upscale model `model`'s backbone loads when upscale "xl" names none (ZeroScope
    XL for ZeroScope); None for a backbone without an upscaling stage."""
    upscaling = backbone_entry(model).upscaling
    return None if upscaling is None else upscaling.default_model
