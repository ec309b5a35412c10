"""`python -m backend bench`: Understudy's cost against the reference procedure's.

One process, one model, one clip, the same settings; three runs:

    first edit    Understudy, empty inversion cache
    re-edit       Understudy, same clip, another prompt (inversion and source features cached)
    reference     the authors' procedure: 999-step inversion, source features recomputed
                  at every guided step, full UNet passes while guiding, no cache
                  (it has no cache, so its re-edit costs the same as its first edit)

Per phase it reports wall time, UNet forward-equivalents and peak memory.

`bench --scaling` instead edits clips of 24, 48, 96 and 240 frames (`--lengths`), one
first edit each, and sets each against (number of windows) × (the one-window cost of
the 24-frame clip), and each peak memory against the 24-frame clip's.

`bench --upscale` runs one edit with the upscaling stage (a second model of the same
architecture, random weights: the cost does not depend on them) at twice the first
stage's size on a tiny model, at the upscaler's native size on the backbone's
(ZeroScope XL's 1024×576), and sets the stage's time,
UNet passes (in first-stage forward-equivalents: each pass weighted by the measured
time of a full pass at its size over one at the first stage's) and peak memory
against the first stage's.
`bench --takes K` makes K takes of one clip (seeds 0 … K − 1) twice, each time from an
empty inversion cache: batched (Engine.transfer_takes, one batch of K on the device) and
as K single edits one after another (the first inverts, the others read the cache), and
sets the batch's FE and wall seconds against the singles'. The FE are the same work
counted per batch element; what batching saves is wall time, where the device has room
for the batch.

`bench --preview` edits one clip four times per backbone (each backbone's tiny model by
default, `--preview-arch` to choose), all at the models' default settings: a preview
first edit (empty cache), a preview re-edit (another prompt and seed), a final re-edit
(the preview's cached inversion: a preview and then the final invert once) and a final
first edit (empty cache); it reports each one's FE and wall seconds and the ratio
preview / final of each (target: a preview re-edit at most 1/8 of a final re-edit's FE).

Forward-equivalents (FE, backend/method/cost.py): a full model pass over one batch element is 1; a pass that
stops after the feature taps (ZeroScope: up_blocks[1]; Wan: the guidance block) counts
its measured share of a full pass (timed here); a backward pass counts twice its forward.

Architectures (`--arch`, backend/backbones/registry.py): a backbone's name ("zeroscope":
ZeroScope v2, "wan": Wan 2.1 T2V-1.3B, "wan-vace": Wan 2.1 VACE-1.3B; `--random-weights`
for the architecture with random weights), its tiny model ("tiny", "wan-tiny",
"wan-vace-tiny") or its random-weight model ("zeroscope-random", "wan-random",
"wan-vace-random": the name with --random-weights). Edits carry no reference image. A backbone runs at
its own sizes and window (ZeroScope 24×576×320, Wan 81×832×480), a tiny model at a
small clip.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from backend.backbones.base import Backbone
from backend.backbones.loading import load_backbone
from backend.backbones.registry import BackboneEntry, backbones
from backend.errors import BadSettingsError
from backend.method.cost import PHASE_OF_TIMING, forward_equivalents
from backend.method.engine import Engine, Procedure
from shared.settings import TransferSettings

REFERENCE_INVERSION_STEPS = 999
# Printed beside the figures (issue 6); never asserted in tests.
TARGET_FIRST_EDIT_RATIO = 0.40
TARGET_RE_EDIT_RATIO = 0.36
TARGET_GPU_SECONDS = 60
TARGET_GPU_PEAK_GB = 16
TARGET_SCALING_COST_RATIO = 1.1  # cost ≤ 1.1 × windows × one-window cost (issue 12)
TARGET_SCALING_MEMORY_RATIO = 1.25  # peak memory at 240 frames ≤ 1.25 × at 24
SCALING_LENGTHS = (24, 48, 96, 240)
# Fewer steps than the defaults keep the tiny model's 240-frame edit to about a minute on a
# CPU; every step costs the same per window, so the ratios do not depend on the count.
TINY_SCALING_STEPS = {"steps": 10, "inversion_steps": 10, "guidance_iterations": 3}


@dataclass
class Run:
    name: str
    seconds: dict[str, float]
    forward_equivalents: dict[str, float]
    peak_memory_gb: dict[str, float]

    def total(self, field: str) -> float:
        values = getattr(self, field).values()
        return max(values) if field == "peak_memory_gb" else sum(values)


def arches() -> list[str]:
    """Every --arch: each registered backbone's name, tiny model and random-weight model."""
    return [name for entry in backbones() for name in (entry.tiny, entry.name, entry.random)]


def backbone_of_arch(arch: str) -> BackboneEntry:
    """The registered backbone an --arch names; BadSettingsError (one sentence) for none."""
    for entry in backbones():
        if arch in (entry.tiny, entry.name, entry.random):
            return entry
    raise BadSettingsError(f"--arch {arch!r} names no backbone; use one of {', '.join(arches())}.")


def is_tiny(arch: str) -> bool:
    """Whether an --arch is a backbone's tiny model (a small clip, few steps)."""
    return arch == backbone_of_arch(arch).tiny


def build_backbone(arch: str, random_weights: bool, device: str | None, dtype: str | None) -> Backbone:
    """The model an --arch names: a tiny model, a backbone's published model (or its
    architecture with random weights), or the random-weight model."""
    entry = backbone_of_arch(arch)
    if arch == entry.name:
        model = entry.random if random_weights else entry.published
    else:
        model = arch
    return load_backbone(model, device, dtype)


def bench_latent(backbone: Backbone, frames: int, size: tuple[int, int]) -> torch.Tensor:
    """A random latent of `frames` pixel frames at size (width, height)."""
    cell = backbone.latent_cell
    channels = backbone.latent_channels
    return torch.randn(1, channels, backbone.latent_frames(frames), size[1] // cell, size[0] // cell,
                       device=backbone.device, dtype=backbone.dtype)


def measure_truncated_share(engine: Engine, settings: TransferSettings, repeats: int = 3) -> float:
    """Time of a pass that stops after the feature taps, as a share of a full pass."""
    b = engine.backbone
    settings = engine.resolve(settings)
    frames = min(settings.num_frames or settings.window_frames, settings.window_frames)
    latent = bench_latent(b, frames, (settings.width, settings.height))
    t = b.schedule.timesteps(settings.steps)[0]
    text = engine.embed(["a benchmark"])
    with torch.no_grad():
        full = _timed(b.device, lambda: b.predict(latent, t, text), repeats)
        truncated = _timed(b.device, lambda: b.taps(latent, t, text, truncated=True), repeats)
    return truncated / full


def full_pass_seconds(engine: Engine, frames: int, size: tuple[int, int], repeats: int = 3) -> float:
    """Seconds of one full model pass over `frames` frames at size (width, height)."""
    b = engine.backbone
    latent = bench_latent(b, frames, size)
    t = b.schedule.timesteps(10)[0]
    text = engine.embed(["a benchmark"])
    with torch.no_grad():
        return _timed(b.device, lambda: b.predict(latent, t, text), repeats)


def default_sizes(arch: str) -> tuple[int, int, int]:
    """(frames, width, height) a bench edits by default: small for the tiny models, the
    native clip for the real architectures (ZeroScope 24×576×320, Wan 81×832×480)."""
    entry = backbone_of_arch(arch)
    if arch == entry.tiny:
        return entry.tiny_clip
    return (entry.facts.window_frames, *entry.facts.native_size)


def _timed(device: torch.device, run, repeats: int) -> float:
    """Mean seconds of run() over `repeats` calls, after one warm-up call."""
    run()
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    _sync(device)
    return (time.perf_counter() - started) / repeats


def reference_inversion_steps(engine: Engine, settings: TransferSettings) -> int:
    """The reference's 999 inversion steps, or, where the schedule needs a multiple of the
    sampling steps (flow matching), the next one (1000 for 50 steps)."""
    steps = engine.resolve(settings).steps
    try:
        engine.backbone.schedule.check_grids(steps, REFERENCE_INVERSION_STEPS)
        return REFERENCE_INVERSION_STEPS
    except BadSettingsError:
        return -(-REFERENCE_INVERSION_STEPS // steps) * steps


def run_once(
    engine: Engine, name: str, frames: np.ndarray, settings: TransferSettings, procedure: Procedure,
    truncated_share: float,
) -> Run:
    device = engine.backbone.device
    peaks: dict[str, float] = {}
    current = {"phase": "invert"}

    def record_peak(phase: str) -> None:
        if device.type == "cuda":
            peaks[phase] = max(peaks.get(phase, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats(device)
        else:  # process-wide peak resident set; it never goes down
            peaks[phase] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    def on_progress(phase: str, step: int, total: int) -> None:
        bench_phase = {"encode": "invert", "features": "invert"}.get(phase, phase)
        if bench_phase != current["phase"]:
            record_peak(current["phase"])
            current["phase"] = bench_phase

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine.model_passes.clear()
    result = engine.transfer(frames, settings, progress=on_progress, procedure=procedure)
    _sync(device)
    record_peak(current["phase"])
    seconds: dict[str, float] = {}
    for timing, value in result.sidecar.timings_s.items():  # the embed phase counts as invert's
        seconds[PHASE_OF_TIMING[timing]] = seconds.get(PHASE_OF_TIMING[timing], 0.0) + value
    return Run(name, seconds, forward_equivalents(engine.model_passes, truncated_share),
               {phase: peaks.get(phase, 0.0) for phase in seconds})


def run_bench(
    arch: str = "tiny", random_weights: bool = False, frames: int | None = None,
    width: int | None = None, height: int | None = None, device: str | None = None,
    dtype: str | None = None, gradient_checkpointing: bool = False,
) -> dict:
    """Run the three edits and return the JSON report."""
    backbone = build_backbone(arch, random_weights, device, dtype)
    # The tiny models' default is small enough to finish in well under a minute on a CPU.
    defaults = default_sizes(arch)
    frames = frames or defaults[0]
    settings = TransferSettings(prompt="a red train", source_prompt="a car", seed=0,
                                num_frames=frames, width=width or defaults[1],
                                height=height or defaults[2],
                                gradient_checkpointing=gradient_checkpointing)
    clip = np.random.default_rng(0).integers(0, 255, (frames, settings.height, settings.width, 3),
                                             dtype=np.uint8)
    with TemporaryDirectory() as cache:
        engine = Engine(backbone, Path(cache))
        share = measure_truncated_share(engine, settings)
        first = run_once(engine, "first edit", clip, settings, Procedure(), share)
        re_edit_settings = TransferSettings(**{**settings.to_dict(), "prompt": "a brown horse", "seed": 1})
        re_edit = run_once(engine, "re-edit", clip, re_edit_settings, Procedure(), share)
        reference_settings = TransferSettings(**{**settings.to_dict(),
                                                 "inversion_steps": reference_inversion_steps(engine, settings)})
        reference = run_once(engine, "reference", clip, reference_settings,
                             Procedure(use_cache=False, truncate_guidance=False,
                                       cache_source_features=False), share)
    c = backbone
    return {
        "arch": arch,
        "model": c.model_id,
        "backbone": c.facts.name,
        "device": _device_name(c.device),
        "dtype": str(c.dtype).removeprefix("torch."),
        "frames": frames, "width": settings.width, "height": settings.height,
        "settings": engine.resolve(settings).to_dict(),
        "truncated_pass_share": round(share, 3),
        "runs": {run.name: {"seconds": run.seconds, "forward_equivalents": run.forward_equivalents,
                            "peak_memory_gb": run.peak_memory_gb,
                            "total_seconds": run.total("seconds"),
                            "total_forward_equivalents": run.total("forward_equivalents"),
                            "peak_memory_gb_max": run.total("peak_memory_gb")}
                 for run in (first, re_edit, reference)},
        "ratios_to_reference": {
            "first_edit_forward_equivalents": first.total("forward_equivalents") / reference.total("forward_equivalents"),
            "re_edit_forward_equivalents": re_edit.total("forward_equivalents") / reference.total("forward_equivalents"),
            "first_edit_seconds": first.total("seconds") / reference.total("seconds"),
            "re_edit_seconds": re_edit.total("seconds") / reference.total("seconds"),
        },
        "memory_kind": "CUDA max allocated" if c.device.type == "cuda" else "process peak RSS (cumulative)",
    }


def run_scaling(
    arch: str = "tiny", random_weights: bool = False, lengths: tuple[int, ...] = SCALING_LENGTHS,
    width: int | None = None, height: int | None = None, device: str | None = None,
    dtype: str | None = None, gradient_checkpointing: bool = False,
) -> dict:
    """One first edit per clip length (shortest first); the JSON report of the scaling."""
    backbone = build_backbone(arch, random_weights, device, dtype)
    size = default_sizes(arch)[1:]
    steps = TINY_SCALING_STEPS if is_tiny(arch) else {}
    settings = TransferSettings(prompt="a red train", source_prompt="a car", seed=0,
                                width=width or size[0], height=height or size[1],
                                gradient_checkpointing=gradient_checkpointing, **steps)
    engine = Engine(backbone, None)
    settings = engine.resolve(settings)
    share = measure_truncated_share(engine, settings)
    shortest = min(lengths)
    warm_up = np.zeros((shortest, settings.height, settings.width, 3), dtype=np.uint8)
    engine.transfer(warm_up, settings, procedure=Procedure(use_cache=False))  # first-run costs
    rows = []
    for length in sorted(lengths):
        clip = np.random.default_rng(length).integers(
            0, 255, (length, settings.height, settings.width, 3), dtype=np.uint8)
        run = run_once(engine, f"{length} frames", clip, settings, Procedure(use_cache=False), share)
        windows = len(engine.windows_for(backbone.model_frames(length), settings))
        rows.append({"frames": length, "windows": windows, "phase_seconds": run.seconds,
                     "seconds": run.total("seconds"),
                     "forward_equivalents": run.total("forward_equivalents"),
                     "peak_memory_gb": run.total("peak_memory_gb")})
    base = rows[0]
    base_windows = base["windows"]
    for row in rows:
        row["seconds_ratio"] = row["seconds"] / (row["windows"] / base_windows * base["seconds"])
        row["forward_equivalents_ratio"] = row["forward_equivalents"] / (
            row["windows"] / base_windows * base["forward_equivalents"])
        row["memory_ratio"] = row["peak_memory_gb"] / base["peak_memory_gb"]
    c = backbone
    return {
        "arch": arch, "model": c.model_id, "device": _device_name(c.device),
        "dtype": str(c.dtype).removeprefix("torch."), "width": settings.width, "height": settings.height,
        "settings": settings.to_dict(), "truncated_pass_share": round(share, 3), "rows": rows,
        "memory_kind": "CUDA max allocated" if c.device.type == "cuda" else "process peak RSS (cumulative)",
    }


def run_upscale(
    arch: str = "tiny", random_weights: bool = False, frames: int | None = None,
    device: str | None = None, dtype: str | None = None, steps: dict | None = None,
) -> dict:
    """One edit with the upscaling stage; the JSON report of what the stage costs.

    Both stages at their native sizes (framing stretch): a tiny model's clip and twice
    it (tiny 128×64 → 256×128), or the backbone's native clip and its upscaler's size
    (ZeroScope 576×320 → 1024×576: XL's architecture is 576w's, so the random model
    stands in for XL too). `steps` overrides step settings (the defaults otherwise)."""
    entry = backbone_of_arch(arch)
    default_frames, width, height = default_sizes(arch)
    if is_tiny(arch):
        sizes = ((width, height), (2 * width, 2 * height))
    elif entry.upscaling is not None:
        sizes = ((width, height), entry.upscaling.facts.native_size)
    else:
        raise BadSettingsError(f"The {entry.name} backbone has no upscaling stage to bench.")
    frames = frames or default_frames
    backbone = build_backbone(arch, random_weights, device, dtype)
    upscaler = Engine(build_backbone(arch, random_weights, device, dtype))
    settings = TransferSettings(prompt="a red train", source_prompt="a car", seed=0, num_frames=frames,
                                width=sizes[0][0], height=sizes[0][1], framing="stretch", upscale="xl",
                                upscale_width=sizes[1][0], upscale_height=sizes[1][1], **(steps or {}))
    clip = np.random.default_rng(0).integers(0, 255, (frames, settings.height, settings.width, 3),
                                             dtype=np.uint8)
    engine = Engine(backbone, None, upscaler=upscaler)
    share = measure_truncated_share(engine, settings)
    window = min(frames, engine.resolve(settings).window_frames)
    pass_ratio = full_pass_seconds(upscaler, window, sizes[1]) / full_pass_seconds(engine, window, sizes[0])
    run = run_once(engine, "with upscaling", clip, settings, Procedure(use_cache=False), share)
    first_stage = sum(run.seconds[phase] for phase in ("invert", "sample", "decode"))
    passes = upscaler.model_passes["sample", "full"]
    c = backbone
    return {
        "arch": arch, "model": c.model_id, "device": _device_name(c.device),
        "dtype": str(c.dtype).removeprefix("torch."), "frames": frames,
        "first_stage_size": list(sizes[0]), "upscale_size": list(sizes[1]),
        "settings": settings.to_dict(), "truncated_pass_share": round(share, 3),
        "seconds": run.seconds, "peak_memory_gb": run.peak_memory_gb,
        "first_stage_seconds": first_stage, "upscale_seconds": run.seconds["upscale"],
        "upscale_to_first_stage_seconds": run.seconds["upscale"] / first_stage,
        "first_stage_forward_equivalents": run.total("forward_equivalents"),
        "upscale_unet_passes": passes,
        "upscale_pass_to_first_stage_pass": pass_ratio,
        "upscale_forward_equivalents": passes * pass_ratio,
        "upscale_steps": settings.upscale_step_count(),
        "memory_kind": "CUDA max allocated" if c.device.type == "cuda" else "process peak RSS (cumulative)",
    }


PREVIEW_TARGET_RATIO = 1 / 8  # preview re-edit FE / final re-edit FE (issue 27)


def run_preview(arch: str = "tiny", random_weights: bool = False, device: str | None = None,
                dtype: str | None = None) -> dict:
    """Preview and final, first edit and re-edit, on one model at its default settings;
    the JSON report with the ratios preview / final."""
    backbone = build_backbone(arch, random_weights, device, dtype)
    frames, width, height = default_sizes(arch)
    base = {"prompt": "a red train", "source_prompt": "a car", "seed": 0, "num_frames": frames,
            "width": width, "height": height}
    clip = np.random.default_rng(0).integers(0, 255, (frames, height, width, 3), dtype=np.uint8)
    runs: dict[str, Run] = {}
    with TemporaryDirectory() as cache, TemporaryDirectory() as fresh_cache:
        engine = Engine(backbone, Path(cache))
        share = measure_truncated_share(engine, TransferSettings(**base))
        engine.transfer(clip[:2], TransferSettings(**{**base, "num_frames": 2, "steps": 1,
                                                       "inversion_steps": 1}))  # first-run costs
        for name, quality, prompt, seed in (("preview first edit", "preview", "a red train", 0),
                                            ("preview re-edit", "preview", "a brown horse", 1),
                                            ("final re-edit", "final", "a blue boat", 2)):
            settings = TransferSettings(**{**base, "prompt": prompt, "seed": seed, "quality": quality})
            runs[name] = run_once(engine, name, clip, settings, Procedure(), share)
        engine.cache = Engine(backbone, Path(fresh_cache)).cache  # empty again
        runs["final first edit"] = run_once(engine, "final first edit", clip,
                                            TransferSettings(**base), Procedure(), share)
    totals = {name: {"forward_equivalents": run.total("forward_equivalents"),
                     "seconds": run.total("seconds"),
                     "phase_forward_equivalents": run.forward_equivalents,
                     "phase_seconds": run.seconds} for name, run in runs.items()}
    return {
        "arch": arch, "model": backbone.model_id, "backbone": backbone.facts.name,
        "device": _device_name(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
        "frames": frames, "width": width, "height": height,
        "truncated_pass_share": round(share, 3), "runs": totals,
        "preview_over_final": {
            kind: {unit: totals[f"preview {kind}"][unit] / totals[f"final {kind}"][unit]
                   for unit in ("forward_equivalents", "seconds")}
            for kind in ("first edit", "re-edit")},
    }


def format_preview(reports: list[dict]) -> str:
    """A plain-text table of preview reports, one block per model."""
    lines = []
    for report in reports:
        runs = report["runs"]
        lines.append(f"bench --preview: {report['model']} ({report['backbone']}) on "
                     f"{report['device']} ({report['dtype']}), {report['frames']} frames "
                     f"{report['width']}×{report['height']}, truncated pass = "
                     f"{report['truncated_pass_share']:.2f} of a full pass")
        lines.append(f"{'':<20}{'FE':>9}{'s':>9}")
        for name, run in runs.items():
            lines.append(f"{name:<20}{run['forward_equivalents']:>9.1f}{run['seconds']:>9.1f}")
        for kind, ratio in report["preview_over_final"].items():
            lines.append(f"preview / final, {kind}: {ratio['forward_equivalents']:.3f}× FE, "
                         f"{ratio['seconds']:.3f}× seconds"
                         + (f" (target ≤ {PREVIEW_TARGET_RATIO:.3f}× FE)" if kind == "re-edit" else ""))
    return "\n".join(lines)


def format_upscale(report: dict) -> str:
    """A plain-text summary of the upscale report."""
    first, up = report["first_stage_size"], report["upscale_size"]
    memory = report["peak_memory_gb"]
    return "\n".join([
        f"bench --upscale: {report['model']} on {report['device']} ({report['dtype']}), "
        f"{report['frames']} frames, {first[0]}×{first[1]} then {up[0]}×{up[1]}",
        f"first stage: {report['first_stage_seconds']:.1f} s, "
        f"{report['first_stage_forward_equivalents']:.0f} FE at {first[0]}×{first[1]}, "
        f"peak {max(memory[p] for p in ('invert', 'sample', 'decode')):.2f} GB",
        f"upscaling:   {report['upscale_seconds']:.1f} s "
        f"({report['upscale_to_first_stage_seconds']:.2f}× the first stage), "
        f"{report['upscale_steps']} steps = {report['upscale_unet_passes']} full passes at "
        f"{up[0]}×{up[1]}, each {report['upscale_pass_to_first_stage_pass']:.2f}× a first-stage "
        f"pass: {report['upscale_forward_equivalents']:.0f} FE "
        f"({report['upscale_forward_equivalents'] / report['first_stage_forward_equivalents']:.2f}× "
        f"the first stage's), peak {memory['upscale']:.2f} GB",
        f"memory: {report['memory_kind']}",
    ])


def format_scaling(report: dict) -> str:
    """A plain-text table of the scaling report, with the targets beside the figures."""
    settings = report["settings"]
    base = report["rows"][0]
    lines = [
        f"bench --scaling: {report['model']} on {report['device']} ({report['dtype']}), "
        f"{report['width']}×{report['height']}, {settings['steps']} steps, windows of "
        f"{settings['window_frames']} overlapping ≥ {settings['window_overlap']}",
        f"{'frames':>7}{'windows':>9}{'s':>9}{'FE':>9}{'GB':>8}"
        f"{'s / (K·s₁)':>13}{'FE / (K·FE₁)':>14}{'GB / GB₂₄':>11}",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['frames']:>7}{row['windows']:>9}{row['seconds']:>9.1f}{row['forward_equivalents']:>9.0f}"
            f"{row['peak_memory_gb']:>8.2f}{row['seconds_ratio']:>13.3f}"
            f"{row['forward_equivalents_ratio']:>14.3f}{row['memory_ratio']:>11.3f}")
    longest = report["rows"][-1]
    lines.append(
        f"targets: cost ≤ {TARGET_SCALING_COST_RATIO}× windows × one-window cost "
        f"(worst: {max(r['seconds_ratio'] for r in report['rows']):.3f}× in time, "
        f"{max(r['forward_equivalents_ratio'] for r in report['rows']):.3f}× in FE); "
        f"peak memory at {longest['frames']} frames ≤ {TARGET_SCALING_MEMORY_RATIO}× at "
        f"{base['frames']} ({longest['memory_ratio']:.3f}×)")
    lines.append(f"memory: {report['memory_kind']}")
    return "\n".join(lines)


def run_takes(
    arch: str = "tiny", random_weights: bool = False, takes: int = 4, frames: int | None = None,
    width: int | None = None, height: int | None = None, device: str | None = None,
    dtype: str | None = None, steps: int | None = None,
) -> dict:
    """K takes batched against K single edits of the same clip and settings (module
    docstring), each with `steps` sampling and inversion steps (None: the settings'
    default); the JSON report."""
    from backend.results import takes_of

    backbone = build_backbone(arch, random_weights, device, dtype)
    defaults = default_sizes(arch)
    frames = frames or defaults[0]
    few = {} if steps is None else {"steps": steps, "inversion_steps": steps}
    settings = TransferSettings(prompt="a red train", source_prompt="a car", seed=0,
                                num_frames=frames, width=width or defaults[1],
                                height=height or defaults[2], **few)
    clip = np.random.default_rng(0).integers(0, 255, (frames, settings.height, settings.width, 3),
                                             dtype=np.uint8)
    chosen = takes_of([settings.prompt], 0, takes)
    share = measure_truncated_share(Engine(backbone), settings)  # one weighting for both
    arms: dict[str, dict] = {}
    for name in ("batched", "single"):
        with TemporaryDirectory() as cache:
            engine = Engine(backbone, Path(cache))
            _sync(backbone.device)
            started = time.perf_counter()
            if name == "batched":
                engine.transfer_takes(clip, settings, chosen)
            else:
                for take in chosen:
                    engine.transfer(clip, TransferSettings(**{**settings.to_dict(),
                                                              "seed": take.seed}))
            _sync(backbone.device)
            seconds = time.perf_counter() - started
            fe = forward_equivalents(engine.model_passes, share)
            arms[name] = {"seconds": seconds, "forward_equivalents": fe,
                          "total_forward_equivalents": sum(fe.values())}
    return {
        "arch": arch, "model": backbone.model_id, "backbone": backbone.facts.name,
        "device": _device_name(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
        "frames": frames, "width": settings.width, "height": settings.height, "takes": takes,
        "settings": engine.resolve(settings).to_dict(),
        "batched": arms["batched"], "single": arms["single"],
        "batched_to_single": {
            "seconds": arms["batched"]["seconds"] / arms["single"]["seconds"],
            "forward_equivalents": arms["batched"]["total_forward_equivalents"]
            / arms["single"]["total_forward_equivalents"]},
    }


def format_takes(report: dict) -> str:
    """A plain-text summary of the takes report."""
    batched, single, ratio = report["batched"], report["single"], report["batched_to_single"]
    return "\n".join([
        f"bench --takes {report['takes']}: {report['model']} on {report['device']} "
        f"({report['dtype']}), {report['frames']} frames at {report['width']}x{report['height']}",
        f"  {report['takes']} takes batched: {batched['seconds']:.1f} s, "
        f"{batched['total_forward_equivalents']:.0f} FE",
        f"  {report['takes']} single edits:  {single['seconds']:.1f} s, "
        f"{single['total_forward_equivalents']:.0f} FE",
        f"  batched / single: {ratio['seconds']:.2f}x the seconds, "
        f"{ratio['forward_equivalents']:.2f}x the FE",
    ])


def format_report(report: dict) -> str:
    """A plain-text table of the report."""
    runs = report["runs"]
    names = list(runs)
    lines = [
        f"bench: {report['model']} on {report['device']} ({report['dtype']}), "
        f"{report['frames']} frames {report['width']}×{report['height']}, "
        f"truncated pass = {report['truncated_pass_share']:.2f} of a full pass",
        f"{'phase':<8}{'':2}" + "".join(f"{name:>28}" for name in names),
        f"{'':<10}" + "".join(f"{'s':>9}{'FE':>9}{'GB':>10}" for _ in names),
    ]
    for phase in ("invert", "sample", "decode"):
        cells = "".join(f"{runs[n]['seconds'][phase]:>9.1f}{runs[n]['forward_equivalents'][phase]:>9.0f}"
                        f"{runs[n]['peak_memory_gb'][phase]:>10.2f}" for n in names)
        lines.append(f"{phase:<10}{cells}")
    cells = "".join(f"{runs[n]['total_seconds']:>9.1f}{runs[n]['total_forward_equivalents']:>9.0f}"
                    f"{runs[n]['peak_memory_gb_max']:>10.2f}" for n in names)
    lines.append(f"{'total':<10}{cells}")
    ratios = report["ratios_to_reference"]
    lines.append(
        f"forward-equivalents vs reference: first edit {ratios['first_edit_forward_equivalents']:.3f}× "
        f"(target ≤ {TARGET_FIRST_EDIT_RATIO}), re-edit {ratios['re_edit_forward_equivalents']:.3f}× "
        f"(target ≤ {TARGET_RE_EDIT_RATIO})")
    lines.append(f"wall time vs reference: first edit {ratios['first_edit_seconds']:.3f}×, "
                 f"re-edit {ratios['re_edit_seconds']:.3f}×")
    if not is_tiny(report["arch"]) and report["device"] != "cpu":
        first = runs["first edit"]
        lines.append(f"GPU targets: first edit {first['total_seconds']:.0f} s (target < "
                     f"{TARGET_GPU_SECONDS} s), peak {first['peak_memory_gb_max']:.1f} GB "
                     f"(target < {TARGET_GPU_PEAK_GB} GB)")
    lines.append(f"memory: {report['memory_kind']}")
    return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def main_bench(args) -> int:
    if args.memory:
        from backend.tools.bench_memory import main_memory_bench

        return main_memory_bench(args, build_backbone, default_sizes)
    if args.gang:
        from backend.tools.bench_gang import format_gang, run_gang_bench

        entry = backbone_of_arch(args.arch)  # the model an --arch names, as build_backbone reads it
        model = ((entry.random if args.random_weights else entry.published)
                 if args.arch == entry.name else args.arch)
        frames, width, height = default_sizes(args.arch)
        report = run_gang_bench(model, args.gang, args.frames or frames, args.width or width,
                                args.height or height, args.device, args.dtype)
        print(format_gang(report))
    elif args.takes:
        report = run_takes(args.arch, args.random_weights, args.takes, args.frames, args.width,
                           args.height, args.device, args.dtype, args.steps)
        print(format_takes(report))
    elif args.preview:
        arches_chosen = args.preview_arch or [entry.tiny for entry in backbones()]
        report = [run_preview(arch, args.random_weights, args.device, args.dtype)
                  for arch in arches_chosen]
        print(format_preview(report))
    elif args.upscale:
        report = run_upscale(args.arch, args.random_weights, args.frames, args.device, args.dtype)
        print(format_upscale(report))
    elif args.scaling:
        lengths = tuple(int(part) for part in args.lengths.split(",")) if args.lengths else SCALING_LENGTHS
        report = run_scaling(args.arch, args.random_weights, lengths, args.width, args.height,
                             args.device, args.dtype, args.gradient_checkpointing)
        print(format_scaling(report))
    else:
        report = run_bench(args.arch, args.random_weights, args.frames, args.width, args.height,
                           args.device, args.dtype, args.gradient_checkpointing)
        print(format_report(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"Wrote {args.output}.", file=sys.stderr)
    return 0
