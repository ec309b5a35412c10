"""Which backbone a `--model` names, and loading it.

    load_backbone("tiny")                                  # ZeroScope's types, tiny, random
    load_backbone("cerspense/zeroscope_v2_576w")           # ZeroScope v2 (the default)
    load_backbone("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")      # Wan 2.1 (14B loads the same way)
    load_backbone("/models/my-folder")                     # a local diffusers folder

A folder or hub repo is told apart by its diffusers `model_index.json`: `_class_name`
"WanPipeline" is Wan, "TextToVideoSDPipeline" (or no model_index.json) is ZeroScope.
The names "tiny" / "zeroscope-random" and "wan-tiny" / "wan-random" are built here,
with random weights, for tests and benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

from backend.backbones.base import Backbone, BackboneFacts, choose_device, choose_dtype
from backend.backbones.zeroscope import (
    TINY,
    ZEROSCOPE_FACTS,
    ZEROSCOPE_RANDOM,
    load_zeroscope,
    missing_weights,
    model_location,
)
from backend.errors import ModelNotFoundError

WAN_TINY = "wan-tiny"
WAN_RANDOM = "wan-random"  # Wan 2.1 T2V-1.3B's architecture, random weights (benchmarks)
WAN_PIPELINES = ("WanPipeline",)
ZEROSCOPE_PIPELINES = ("TextToVideoSDPipeline", "VideoToVideoSDPipeline")


def pipeline_class(model: str, flag: str = "--model") -> str:
    """The `_class_name` of a folder's or hub repo's model_index.json ("" when it has none).

    Missing weights (no folder, no cached or downloadable hub file) end in one sentence
    naming the `hf download` command."""
    if model in (TINY, ZEROSCOPE_RANDOM):
        return "TextToVideoSDPipeline"
    if model in (WAN_TINY, WAN_RANDOM):
        return "WanPipeline"
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


def load_backbone(model: str, device: str | None = None, dtype: str | None = None,
                  flag: str = "--model", facts: BackboneFacts = ZEROSCOPE_FACTS) -> Backbone:
    """Load `model` as its backbone, on `device` (default: CUDA if there is one) in
    `dtype` (default: fp16 for ZeroScope, bf16 for Wan on CUDA; fp32 on a CPU).

    `facts` are ZeroScope's to use (ZEROSCOPE_XL_FACTS for the upscaler)."""
    kind = pipeline_class(model, flag)
    torch_device = choose_device(device)
    if kind in WAN_PIPELINES:
        import torch

        from backend.backbones.wan import load_wan

        return load_wan(model, torch_device, choose_dtype(dtype, torch_device, torch.bfloat16), flag)
    if kind and kind not in ZEROSCOPE_PIPELINES:
        raise ModelNotFoundError(
            f"{model!r} is a {kind}, which Understudy cannot run; give a ZeroScope "
            f"(TextToVideoSDPipeline) or Wan (WanPipeline) model with {flag}.")
    return load_zeroscope(model, torch_device, choose_dtype(dtype, torch_device), flag, facts)
