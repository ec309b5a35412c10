"""`python -m backend bench --gang N`: one edit on one process against the same edit on a
gang of N (backend/gang.py), on this machine.

    python -m backend bench --gang 2 --arch wan-tiny            # CPU: two processes, gloo
    python -m backend bench --gang 2 --arch wan --random-weights  # two GPUs: NCCL

The single edit runs in this process; the gang's N ranks are spawned processes on
loopback (gloo on CPUs, "cpu:gloo,cuda:nccl" with rank r on cuda:r on GPUs), each with
the same settings and seed. Reported: each one's wall seconds per phase (rank 0's for
the gang), forward-equivalents (FE) in all and per rank, and how far the gang's frames
are from the single edit's (8-bit levels; 0 or 1 means equal to float precision).

FE per rank: a backbone split over the gang (Wan, Ulysses) runs every denoiser pass on
1/N of the tokens, so each rank's share is the edit's FE / N (the all-to-all exchanges
are not counted, nor the VAE and text encoder, which every rank runs whole); a backbone
that cannot split (ZeroScope) runs on rank 0 alone, FE per rank = FE. On a CPU the ranks
share the machine's cores (each gets cores / N threads), so only a GPU run shows the
speed-up (docs/performance.md).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch

from backend.method.cost import forward_equivalents
from shared.settings import TransferSettings


def gang_bench_settings(frames: int, width: int, height: int) -> TransferSettings:
    return TransferSettings(prompt="a red train", source_prompt="a car", seed=0,
                            num_frames=frames, width=width, height=height)


def bench_clip(settings: TransferSettings) -> np.ndarray:
    return np.random.default_rng(0).integers(
        0, 255, (settings.num_frames, settings.height, settings.width, 3), dtype=np.uint8)


def edit_once(model: str, device: str | None, dtype: str | None, settings: TransferSettings,
              cache: Path, gang=None) -> dict:
    """One first edit (empty cache): its frames, timings, FE and how many ranks split it."""
    from backend.edit import load_engine

    engine = load_engine(model, device=device, dtype=dtype, cache_dir=cache, gang=gang)
    started = time.perf_counter()
    result = engine.transfer(bench_clip(settings), settings)
    if engine.backbone.device.type == "cuda":
        torch.cuda.synchronize(engine.backbone.device)
    wall = time.perf_counter() - started
    fe = forward_equivalents(engine.model_passes, engine.backbone.truncated_pass_share)
    return {"frames": result.frames, "seconds": dict(result.sidecar.timings_s),
            "wall_seconds": wall, "forward_equivalents": sum(fe.values()),
            "split": engine.backbone.gang_size(), "device": str(engine.backbone.device)}


def _rank(rank: int, size: int, port: int, model: str, device: str | None, dtype: str | None,
          settings: dict, folder: str) -> None:
    """One spawned rank of the gang's edit; rank 0 saves its record."""
    from backend.gang import GangAddress, join_gang, leave_gang

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    rank_device = f"cuda:{rank}" if on_gpu else "cpu"
    if on_gpu:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    member = join_gang(GangAddress("127.0.0.1", port), rank, size, rank_device)
    try:
        with TemporaryDirectory() as cache:
            record = edit_once(model, rank_device, dtype, TransferSettings.from_dict(settings),
                               Path(cache), member)
        if rank == 0:
            torch.save(record, Path(folder) / "rank0.pt")
    finally:
        leave_gang()


def run_gang_bench(model: str, size: int, frames: int, width: int, height: int,
                   device: str | None = None, dtype: str | None = None) -> dict:
    """The single edit of `model` (a name `load_engine` takes: bench.py's main_bench
    resolves --arch and the default clip), then the gang's; the JSON report."""
    import torch.multiprocessing as mp

    settings = gang_bench_settings(frames, width, height)
    with TemporaryDirectory() as cache:
        alone = edit_once(model, device, dtype, settings, Path(cache))
    with TemporaryDirectory() as folder:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(_rank, args=(size, port, model, device, dtype, settings.to_dict(), folder),
                 nprocs=size)
        gang = torch.load(Path(folder) / "rank0.pt", weights_only=False)
    split = gang["split"] > 1
    return {
        "model": model, "device": alone["device"], "gang": size, "split": split,
        "frames": settings.num_frames, "width": settings.width, "height": settings.height,
        "single": {"seconds": alone["seconds"], "wall_seconds": round(alone["wall_seconds"], 3),
                   "forward_equivalents": round(alone["forward_equivalents"], 1)},
        "gang_rank0": {"seconds": gang["seconds"], "wall_seconds": round(gang["wall_seconds"], 3),
                       "forward_equivalents": round(gang["forward_equivalents"], 1)},
        "forward_equivalents_per_rank": round(
            gang["forward_equivalents"] / (size if split else 1), 1),
        "speed_up": round(alone["wall_seconds"] / gang["wall_seconds"], 2),
        "max_frame_difference": int(np.abs(alone["frames"].astype(int) - gang["frames"]).max()),
    }


def format_gang(report: dict) -> str:
    single, gang = report["single"], report["gang_rank0"]
    how = ("split over the ranks (Ulysses)" if report["split"]
           else "not split: rank 0 runs it alone")
    return "\n".join([
        f"{report['model']} on {report['device']}, {report['frames']} frames "
        f"{report['width']}×{report['height']}; a gang of {report['gang']}, {how}",
        f"  one process    {single['wall_seconds']:8.2f} s   {single['forward_equivalents']:7.1f} FE",
        f"  gang (rank 0)  {gang['wall_seconds']:8.2f} s   {gang['forward_equivalents']:7.1f} FE "
        f"counted, {report['forward_equivalents_per_rank']:.1f} FE per rank",
        f"  speed-up {report['speed_up']:.2f}×; frames differ by at most "
        f"{report['max_frame_difference']} 8-bit level(s)",
    ])
