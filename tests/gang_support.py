"""One Wan edit on a gang of plain processes (torch.distributed over gloo, no Ray).

`record_edit(rank, size, port, folder)` is what each spawned rank runs (and, with size 1,
the single process): the tiny Wan's edit of a small moving-square clip, the guidance
gradient recorded after the engine's reducer at each Adam step, and the final latent as
the engine hands it to the VAE, saved to `folder/rank{rank}.pt`.
"""

from __future__ import annotations

import socket
from pathlib import Path

# Tiny and quick: 5 frames (2 latent frames) at 64×64 (a 4×4 token grid per latent frame,
# 32 tokens, split 16 + 16), 2 sampling steps both guided, 1 Adam iteration.
GANG_SETTINGS = {
    "num_frames": 5, "width": 64, "height": 64, "steps": 2, "inversion_steps": 2,
    "guided_steps": 2, "guidance_iterations": 1, "seed": 7, "prompt": "a red train",
    "source_prompt": "a yellow square",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def record_edit(rank: int, size: int, port: int, folder: str) -> None:
    """The edit on rank `rank` of `size` (size 1: alone, no process group); saves
    {"gradients": [...], "latent": z₀, "frames": uint8, "gang": ranks split over} to
    folder/rank{rank}.pt."""
    import torch

    from backend.edit import load_engine
    from backend.gang import GangAddress, join_gang, leave_gang
    from shared.settings import TransferSettings
    from tests.conftest import moving_square_frames

    if size > 1:
        torch.set_num_threads(1)  # the ranks share the test machine's cores
    member = None if size == 1 else join_gang(GangAddress("127.0.0.1", port), rank, size, "cpu",
                                              timeout_s=120)
    try:
        engine = load_engine("wan-tiny", device="cpu", gang=member)
        gradients: list[torch.Tensor] = []
        reduce = engine.gradient_reducer

        def recording_reducer(gradient: torch.Tensor) -> None:
            reduce(gradient)
            gradients.append(gradient.detach().clone())

        engine.gradient_reducer = recording_reducer
        latents: list[torch.Tensor] = []
        decode = engine.decode

        def recording_decode(latent, *args, **kwargs):
            latents.append(latent.detach().clone())
            return decode(latent, *args, **kwargs)

        engine.decode = recording_decode
        settings = TransferSettings.from_dict(GANG_SETTINGS)
        result = engine.transfer(moving_square_frames(5, 64, 64), settings)
        torch.save({"gradients": gradients, "latent": latents[0],
                    "frames": torch.from_numpy(result.frames),
                    "gang": engine.backbone.gang_size()}, Path(folder) / f"rank{rank}.pt")
    finally:
        leave_gang()


def gang_edit(folder: Path, size: int = 2) -> list[dict]:
    """`record_edit` on `size` spawned ranks over gloo on loopback; each rank's record."""
    import torch
    import torch.multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    mp.spawn(record_edit, args=(size, free_port(), str(folder)), nprocs=size)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(size)]


def single_edit(folder: Path) -> dict:
    """`record_edit` in this process, alone."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    record_edit(0, 1, 0, str(folder))
    return torch.load(folder / "rank0.pt")
