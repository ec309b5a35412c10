"""A third backbone in one file plus one registry line: a toy model (a few small torch
modules behind the seam of backend/backbones/base.py, walked by the flow-matching
schedule) runs `transfer` (the engine, and the command line in this process), `bench`
and `memory` with no other change to the code."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import numpy as np
import pytest
import torch
from torch import nn

from backend.backbones.base import Backbone, BackboneFacts, Timestep, checkpointed_blocks, smm
from backend.backbones.flow_matching import FlowMatchingSchedule
from backend.backbones.registry import BackboneEntry, register, unregister
from backend.cli import main, settings_flags
from backend.edit import load_engine
from backend.video import write_video
from shared.settings import TransferSettings
from tests.conftest import SMALL_SETTINGS, moving_square_frames

TOY_TINY, TOY_RANDOM = "toy-tiny", "toy-random"
TOY_FACTS = BackboneFacts(
    name="toy", native_size=(64, 64), window_frames=16, frame_rate=8.0, side_multiple=8,
    defaults={"width": 64, "height": 64, "window_frames": 16, "prompt_prefix": "",
              "negative_prompt": "", "cfg_scale": 5.0, "guided_fraction": 0.4,
              "lr_start": 0.003, "lr_end": 0.002},
)
CELL, CHANNELS, WIDTH, TEXT = 8, 4, 8, 8  # pixels per latent cell, latent / feature / text widths


def build_toy(seed: int = 0) -> dict[str, nn.Module]:
    """The toy's networks: an 8×8-patch VAE, a byte embedding, and a two-block denoiser
    whose first block's output is the feature tap."""
    torch.manual_seed(seed)
    return {
        "encoder": nn.Conv2d(3, CHANNELS, CELL, stride=CELL),
        "decoder": nn.ConvTranspose2d(CHANNELS, 3, CELL, stride=CELL),
        "text": nn.Embedding(256, TEXT),
        "block": nn.Conv3d(CHANNELS + TEXT + 1, WIDTH, 3, padding=1),
        "out": nn.Conv3d(WIDTH, CHANNELS, 3, padding=1),
    }


class Toy(Backbone):
    """Latents (1, 4, F, H/8, W/8), one per pixel frame; the model output is a velocity."""

    tap_names = ("block",)

    def __init__(self, parts: dict[str, nn.Module], model_id: str, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.parts = {name: part.eval().requires_grad_(False) for name, part in parts.items()}
        self.schedule = FlowMatchingSchedule(shift=3.0)
        self.facts, self.model_id, self.device, self.dtype = TOY_FACTS, model_id, device, dtype

    latent_channels, latent_cell = CHANNELS, CELL

    def latent_frames(self, frames: int) -> int:
        return frames

    def modules(self) -> list[nn.Module]:
        """[denoiser, vae, text_encoder], the seam's roles."""
        parts = self.parts
        return [nn.ModuleList([parts["block"], parts["out"]]),
                nn.ModuleList([parts["encoder"], parts["decoder"]]), parts["text"]]

    @torch.no_grad()
    def encode(self, frames: np.ndarray, frames_per_slice: int) -> torch.Tensor:
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1
        return self.parts["encoder"](pixels).permute(1, 0, 2, 3).unsqueeze(0).float()

    def decode_slices(self, latent: torch.Tensor,
                      frames_per_slice: int) -> list[Callable[[], np.ndarray]]:
        @torch.no_grad()
        def decode() -> np.ndarray:
            pixels = self.parts["decoder"](latent[0].permute(1, 0, 2, 3).to(self.dtype)).clamp(-1, 1)
            return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [decode]

    @torch.no_grad()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        ids = [list(prompt.encode()[:16].ljust(16, b"\0")) for prompt in prompts]
        return self.parts["text"](torch.tensor(ids, device=self.device))

    def _features(self, latent: torch.Tensor, timestep: Timestep,
                  embedding: torch.Tensor) -> torch.Tensor:
        """The first block's output, (B, D, F, h, w): the latent with the prompt's mean
        embedding and the timestep as extra channels."""
        batch, _, frames, height, width = latent.shape
        text = embedding.mean(dim=1).expand(batch, -1)[:, :, None, None, None]
        time = torch.full((batch, 1, frames, height, width), float(timestep) / 1000,
                          device=latent.device, dtype=latent.dtype)
        conditioned = torch.cat([latent, text.expand(-1, -1, frames, height, width).to(latent.dtype),
                                 time], dim=1)
        return torch.relu(self.parts["block"](conditioned.to(self.dtype)))

    def predict(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor) -> torch.Tensor:
        return self.parts["out"](self._features(latent, timestep, embedding))

    def taps(self, latent: torch.Tensor, timestep: Timestep, embedding: torch.Tensor,
             truncated: bool, spatial: bool = False) -> list[torch.Tensor]:
        """The first block's output as (B, F, D, h, w); its SMM (B, F, D) unless spatial.
        The tap is the first block, so a truncated pass runs only that block."""
        features = self._features(latent, timestep, embedding).permute(0, 2, 1, 3, 4).float()
        return [features if spatial else smm(features)]

    def checkpointing(self, enabled: bool) -> AbstractContextManager:
        return checkpointed_blocks([], enabled)  # no block runs before the tapped one


def load_toy(model: str, device: torch.device, dtype: str | None, flag: str = "--model") -> Toy:
    parts = {name: part.to(device, torch.float32) for name, part in build_toy().items()}
    return Toy(parts, model, device, torch.float32)


def toy_shell(model: str, device: torch.device, dtype: str | None) -> Toy:
    """The toy built on the meta device (no weights): what the memory plan runs."""
    with torch.device("meta"):
        parts = build_toy()
    return Toy(parts, model, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def toy() -> Iterator[str]:
    register(BackboneEntry(
        name="toy", title="Toy", backbone=Toy, pipelines=("ToyPipeline",), load=load_toy,
        facts=TOY_FACTS, tiny=TOY_TINY, build_tiny=build_toy, tiny_clip=(4, 64, 64),
        random=TOY_RANDOM, build_random=build_toy, published=TOY_RANDOM,
        architectures={TOY_RANDOM: "toy"}, shell=toy_shell))
    try:
        yield TOY_TINY
    finally:
        unregister("toy")


def test_the_engine_edits_a_clip_with_the_toy_backbone(toy, tmp_path):
    engine = load_engine(toy, device="cpu", cache_dir=tmp_path / "cache")
    settings = TransferSettings(prompt="a red train", source_prompt="a square", seed=3,
                                **SMALL_SETTINGS)
    clip = moving_square_frames(6, 64, 64)
    result = engine.transfer(clip, settings)
    assert result.frames.shape == (4, 64, 64, 3) and result.frames.dtype == np.uint8
    assert result.sidecar.backbone == "toy" and result.sidecar.model == toy
    assert engine.model_passes["guide", "truncated"] > 0  # the toy's tap guided the edit
    again = engine.transfer(clip, settings)  # from the inversion cache: the same frames
    assert again.sidecar.inversion_from_cache
    assert np.array_equal(again.frames, result.frames)


def test_the_command_line_transfers_with_the_toy_backbone(toy, tmp_path):
    clip = tmp_path / "clip.mp4"
    write_video(moving_square_frames(6, 64, 64), clip)
    code = main(["transfer", str(clip), "-o", str(tmp_path / "out.mp4"), "--model", toy,
                 "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--prompt", "a cat",
                 *settings_flags(SMALL_SETTINGS)])
    assert code == 0
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert (sidecar["backbone"], sidecar["model"]) == ("toy", toy)


def test_bench_runs_the_toy_backbone(toy, tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", toy, "--frames", "2", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["backbone"], report["frames"], report["width"]) == ("toy", 2, 64)
    runs = report["runs"]
    assert runs["re-edit"]["forward_equivalents"]["invert"] == 0  # the cache served it
    assert runs["reference"]["forward_equivalents"]["invert"] >= 1000  # flow matching's grid


def test_the_memory_plan_plans_the_toy_backbone(toy, capsys):
    """The registry entry's shell is all the planner needs: it has no per-model code."""
    assert main(["memory", "--model", toy, "--frames", "4", "--size", "64x64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["model"], plan["frames"], plan["size"]) == (toy, 4, [64, 64])
    assert plan["peak_bytes"] >= max(plan["phases"].values()) > 0
