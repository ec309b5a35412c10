"""`python -m backend bench --memory`: the memory plan against a real edit on a GPU.

One process, one model (loaded on CUDA), one clip. The plan (backend/memory/planner.py)
of the edit is made first, from the loaded model's architecture; then the edit runs
for real while each of the engine's calls that the plan measures is wrapped to read
`torch.cuda.max_memory_allocated` over that call alone:

    weights    memory_allocated once the model is loaded
    embed      Engine.embed           encode     Engine.encode
    invert     Engine.invert          features   Engine.source_features
    guide      Engine.guide           cfg        Engine.denoise
    decode     Engine.decode

Every reading counts what is alive then (weights, embeddings, the inverted latents …)
as the plan's phases do, so the two are set side by side per phase: predicted,
measured, and measured / predicted. The savers are off unless the flags turn them on
(--gradient-checkpointing), so the figures are the plan's first column.

No GPU has run this yet: its first run on one is its check (docs/performance.md).
On a machine without CUDA it says so in one sentence. The measuring is written
against a small `Allocator` interface, so the tests run the same code on the CPU with
the plan's own tensor counter (LiveBytes) standing in for CUDA's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from backend.edit import engine_phases
from backend.errors import UnderstudyError
from backend.memory.planner import PHASES, plan_edit
from backend.method.engine import Engine, Procedure
from shared.settings import TransferSettings

NEEDS_CUDA = ("bench --memory measures GPU memory and needs a CUDA GPU, which this machine "
              "does not have; run `python -m backend memory` here for the plan alone.")
# Fewer steps than the defaults: a phase's peak does not grow with the step count
# beyond the kept inverted latents, which the plan counts for the same settings.
MEMORY_BENCH_STEPS = {"steps": 10, "inversion_steps": 10, "guidance_iterations": 2}
PLANNED_CALLS = {"embed": "embed", "encode": "encode", "invert": "invert",
                 "features": "source_features", "guide": "guide", "cfg": "denoise",
                 "decode": "decode"}


class Allocator(Protocol):
    """What the bench reads of a device's memory (CudaAllocator on a GPU)."""

    def allocated(self) -> int: ...
    def reset_peak(self) -> None: ...
    def peak(self) -> int: ...


class CudaAllocator:
    """torch.cuda's own counters for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def measured_phase_peaks(engine: Engine, clip: np.ndarray, settings: TransferSettings,
                         allocator: Allocator) -> dict[str, int]:
    """Run one edit; the peak bytes the allocator saw during each planned phase (the
    highest over its calls), and the weights resident before it."""
    peaks: dict[str, int] = {"weights": allocator.allocated()}

    def wrapped(phase: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            allocator.reset_peak()
            try:
                return call(*args, **kwargs)
            finally:
                peaks[phase] = max(peaks.get(phase, 0), allocator.peak())
        return run

    for phase, name in PLANNED_CALLS.items():
        setattr(engine, name, wrapped(phase, getattr(engine, name)))
    try:  # no cache: every phase runs (a cached inversion or embedding would skip one)
        engine.transfer(clip, settings, procedure=Procedure(use_cache=False))
    finally:
        for name in PLANNED_CALLS.values():
            engine.__dict__.pop(name, None)
    return peaks


def compare(predicted: dict[str, int], measured: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Per phase (the plan's order): predicted and measured bytes and measured / predicted."""
    rows = {}
    for phase in PHASES:
        if phase in predicted and phase in measured:
            rows[phase] = {"predicted_bytes": predicted[phase], "measured_bytes": measured[phase],
                           "ratio": round(measured[phase] / predicted[phase], 3) if predicted[phase] else None}
    rows["peak"] = {"predicted_bytes": max(predicted.values()), "measured_bytes": max(measured.values()),
                    "ratio": round(max(measured.values()) / max(predicted.values()), 3)}
    return rows


def run_memory_bench(engine: Engine, frames: int, size: tuple[int, int], settings: TransferSettings,
                     allocator: Allocator) -> dict[str, Any]:
    """Plan the edit (the loaded model's architecture, on its device), run it, compare."""
    backbone = engine.backbone
    settings = engine.resolve(settings)
    # The allocator's counters see tensors only (a CPU plan's host terms are not theirs).
    plan = plan_edit(engine_phases, backbone, frames, size, str(backbone.device), settings=settings,
                     host_terms=False)
    clip = np.random.default_rng(0).integers(0, 255, (frames, size[1], size[0], 3), dtype=np.uint8)
    measured = measured_phase_peaks(engine, clip, settings, allocator)
    return {"model": backbone.model_id, "device": str(backbone.device),
            "dtype": str(backbone.dtype).removeprefix("torch."), "frames": frames,
            "size": list(size), "settings": settings.to_dict(),
            "phases": compare(plan.phases, measured),
            "memory_kind": "torch.cuda.max_memory_allocated per phase"
            if backbone.device.type == "cuda" else "LiveBytes per phase (tensors on the CPU)"}


def format_memory_report(report: dict[str, Any]) -> str:
    lines = [f"Memory: predicted vs measured, {report['model']} on {report['device']} "
             f"{report['dtype']}, {report['frames']} frames at {report['size'][0]}x{report['size'][1]} "
             f"(GiB; {report['memory_kind']})",
             f"  {'phase':<10}{'predicted':>11}{'measured':>11}{'ratio':>8}"]
    for phase, row in report["phases"].items():
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"  {phase:<10}{row['predicted_bytes'] / 2**30:>11.3f}"
                     f"{row['measured_bytes'] / 2**30:>11.3f}{ratio:>8}")
    return "\n".join(lines)


def main_memory_bench(args: Any, build_backbone: Callable[..., Any],
                      default_sizes: Callable[[str], tuple[int, int, int]]) -> int:
    """The `bench --memory` command: CUDA only (one sentence otherwise)."""
    device = args.device or "cuda"
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise UnderstudyError(NEEDS_CUDA)
    backbone = build_backbone(args.arch, args.random_weights, device, args.dtype)
    defaults = default_sizes(args.arch)
    frames = args.frames or defaults[0]
    size = (args.width or defaults[1], args.height or defaults[2])
    settings = TransferSettings(prompt="a red train", source_prompt="a car", seed=0, num_frames=frames,
                                width=size[0], height=size[1], memory="off",
                                gradient_checkpointing=args.gradient_checkpointing,
                                **MEMORY_BENCH_STEPS)
    engine = Engine(backbone, None)
    report = run_memory_bench(engine, frames, size, settings, CudaAllocator(backbone.device))
    print(format_memory_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.output}.", file=sys.stderr)
    return 0
