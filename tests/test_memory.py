"""The memory tracker: what it counts on fake tensors is what it counts on real ones."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet3DConditionModel

from backend.edit import engine_phases, load_engine
from backend.memory.counter import (
    CudaAutocast,
    LiveBytes,
    fake_world,
    materialise,
    measure,
    rounded,
)
from backend.memory.planner import plan_edit
from shared.settings import MEMORY_SAVERS, TransferSettings

TINY_UNET = dict(
    sample_size=8, block_out_channels=(16, 16, 32, 32),
    down_block_types=("DownBlock3D", "DownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D", "UpBlock3D"),
    layers_per_block=1, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                norm_num_groups=4)


def unet_step(unet: UNet3DConditionModel, frames: int) -> torch.Size:
    """One forward and backward to the latent, as guidance runs them."""
    latent = torch.randn(1, 4, frames, 16, 24, requires_grad=True)
    text = torch.randn(1, 77, 32)
    out = unet(latent, 500, encoder_hidden_states=text).sample
    out.float().square().mean().backward()
    return latent.grad.shape


def vae_round_trip(vae: AutoencoderKL) -> torch.Size:
    with torch.no_grad():
        latent = vae.encode(torch.randn(3, 3, 64, 96)).latent_dist.mean
        return vae.decode(latent).sample.shape


def real_and_fake_peaks(cls: type, config: dict, run) -> tuple[int, int]:  # noqa: ANN001
    real = cls(**config).eval().requires_grad_(False)
    tracker = LiveBytes()
    with tracker:
        tracker.track_module(real)
        real_peak, _ = measure(lambda: run(real), tracker)
    with torch.device("meta"):
        shell = cls(**config).eval().requires_grad_(False)
    with fake_world() as (_fake, fake_tracker):
        materialise(shell, fake_tracker)
        fake_peak, _ = measure(lambda: run(shell), fake_tracker)
    return real_peak, fake_peak


def test_unet_forward_backward_counts_the_same_on_fake_and_real_tensors() -> None:
    peaks = {}
    for frames in (4, 8):
        real_peak, fake_peak = real_and_fake_peaks(
            UNet3DConditionModel, TINY_UNET, lambda unet, f=frames: unet_step(unet, f))
        assert real_peak == fake_peak
        peaks[frames] = real_peak
    assert peaks[8] > peaks[4]  # activations grow with the frames


def test_vae_encode_decode_counts_the_same_on_fake_and_real_tensors() -> None:
    real_peak, fake_peak = real_and_fake_peaks(AutoencoderKL, TINY_VAE, vae_round_trip)
    assert real_peak == fake_peak > 0


def test_live_bytes_by_hand() -> None:
    """Two 1000-float tensors alive, one freed, then a third: peak 8000, current 8000."""
    tracker = LiveBytes()
    with tracker:
        a = torch.zeros(1000)
        b = torch.zeros(1000)
        assert tracker.current == 8000
        del a
        assert tracker.current == 4000
        c = torch.zeros(1000)
        view = b[:10]  # a view shares its storage: not counted again
    assert (tracker.current, tracker.peak) == (8000, 8000)
    del b, c, view
    assert tracker.current == 0
    assert rounded(1, 512) == 512 and rounded(512, 512) == 512 and rounded(513, 512) == 1024


def test_untracked_storage_leaves_the_count_with_its_views() -> None:
    """untrack takes a storage's bytes out at once; a later view of it, or its death,
    changes nothing more."""
    tracker = LiveBytes()
    with tracker:
        kept = torch.zeros(1000)
        host = torch.zeros(500)
        assert tracker.untrack(host) == 2000
        assert tracker.current == 4000
        view = host[:10] + 0  # a new 40-byte tensor counts; the view of host does not
        assert tracker.current == 4040
        del host, view
        assert tracker.current == 4000
    del kept
    assert tracker.current == 0


def test_cuda_autocast_keeps_matmuls_half_and_norms_float() -> None:
    weight = torch.randn(8, 8, dtype=torch.float16)
    with CudaAutocast(torch.float16):
        product = torch.nn.functional.linear(torch.randn(2, 8), weight)
        normed = torch.nn.functional.layer_norm(product, (8,))
        joined = torch.cat([product, normed])
    assert (product.dtype, normed.dtype, joined.dtype) == (torch.float16, torch.float32, torch.float32)


def test_full_size_zeroscope_unet_plans_without_memory() -> None:
    """ZeroScope's UNet (1.4 G parameters) in half precision, a CFG pass at 24×40×72
    latents, on fake tensors: gigabytes counted, none allocated."""
    with torch.device("meta"):
        unet = UNet3DConditionModel().to(torch.float16).eval().requires_grad_(False)
    with fake_world(block=512) as (_fake, tracker):
        materialise(unet, tracker)
        weights = tracker.current

        def cfg_pass() -> None:
            with torch.no_grad(), CudaAutocast(torch.float16):
                unet(torch.randn(2, 4, 24, 40, 72), 500,
                     encoder_hidden_states=torch.randn(2, 77, 1024, dtype=torch.float16))

        peak, _ = measure(cfg_pass, tracker)
    assert 2.5e9 < weights < 3.0e9  # 1.41 G fp16 parameters
    assert peak > weights + 1e9


# --------------------------------------------------------------------------- the plan


def tracked_peak_of_real_edit(model: str, frames: int, size: tuple[int, int],
                              settings: TransferSettings) -> int:
    """LiveBytes over a whole real Engine.transfer on the CPU (weights included)."""
    engine = load_engine(model, device="cpu")
    tracker = LiveBytes()
    with tracker:
        for module in engine.backbone.modules():
            tracker.track_module(module)
        engine.transfer(np.zeros((frames, size[1], size[0], 3), np.uint8), settings)
    return tracker.peak


SHORT = dict(prompt="a cat", source_prompt="a dog", steps=2, inversion_steps=2,
             guidance_iterations=1, guided_steps=1, seed=1)


@pytest.mark.parametrize("model, frames, checkpointing", [
    ("tiny", 40, False),  # two windows of ZeroScope's 24
    ("tiny", 12, True),
    ("wan-tiny", 9, False),
    ("wan-tiny", 9, True),  # the finer checkpointing on the other backbone
])
def test_plan_predicts_the_peak_of_a_real_edit(model: str, frames: int, checkpointing: bool) -> None:
    """The plan (tensors only), on fake tensors, against the same counter over a whole
    real edit: within 3 %. (The plan with its CPU terms against resident memory:
    tests/test_memory_rss.py.)"""
    size = (96, 64)
    settings = TransferSettings(**SHORT, width=size[0], height=size[1],
                                gradient_checkpointing=checkpointing)
    plan = plan_edit(engine_phases, model, frames, size, "cpu", settings=settings, host_terms=False)
    real = tracked_peak_of_real_edit(model, frames, size, settings)
    assert abs(plan.peak_bytes - real) <= 0.03 * real
    assert plan.phases["weights"] == sum(plan.modules.values())
    assert [saver["name"] for saver in plan.savers] == list(MEMORY_SAVERS)
    # None raises it but the denoiser's float8 copy alone, beside the compute-dtype
    # weights autograd keeps through the guided backward (docs/memory.md).
    raising = {saver["name"] for saver in plan.savers if saver["peak_bytes"] > plan.peak_bytes}
    assert raising <= {"denoiser_fp8"}
    assert all(c["peak_phase"] in plan.phases for c in plan.combinations)
    # every combination but those with both group offload and checkpointing (EXCLUSIVE)
    assert len(plan.combinations) == 2 ** len(MEMORY_SAVERS) - 1 - 2 ** (len(MEMORY_SAVERS) - 2)


def tracked_decode_and_peak(model: str, frames: int, size: tuple[int, int], settings: TransferSettings,
                            savers: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """LiveBytes over a whole real edit with `savers` (as --memory auto hands them to the
    engine): (the peak while the first decode slice runs, the edit's peak)."""
    from backend.memory.savers import MemoryDecision

    engine = load_engine(model, device="cpu")
    tracker = LiveBytes()
    decode_peak: list[int] = []
    original = type(engine.backbone).decode_slices

    def watched(self, latent, frames_per_slice):  # noqa: ANN001, ANN202
        def first(one):  # noqa: ANN001, ANN202
            def run():  # noqa: ANN202
                edit_peak = tracker.peak
                tracker.reset_peak()
                try:
                    return one()
                finally:
                    decode_peak.append(tracker.peak)
                    tracker.peak = max(edit_peak, tracker.peak)
            return run
        return [first(one) for one in original(self, latent, frames_per_slice)]

    monkeypatch.setattr(type(engine.backbone), "decode_slices", watched)
    with tracker:
        for module in engine.backbone.modules():
            tracker.track_module(module)
        engine.transfer(np.zeros((frames, size[1], size[0], 3), np.uint8), settings,
                        savers=MemoryDecision(savers, 0, 0))
    return decode_peak[0], tracker.peak


@pytest.mark.parametrize("model, frames", [("wan-tiny", 9), ("tiny", 8)])
def test_plan_predicts_a_tiled_decode_and_the_peak_with_the_new_savers(
        model: str, frames: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """vae_tiling with 64-pixel tiles overlapping by 16 at 192×128 (every frame in 3×2
    tiles), and the finer checkpointing: the plan's tiled decode (two short latents,
    extended in a straight line to the clip's length) against the counter over the real
    edit's first decode slice, and the plan's peak with both savers against the real
    edit's, each within 3 %."""
    backbone_class = type(load_engine(model, device="cpu").backbone)
    monkeypatch.setattr(backbone_class, "vae_tile_pixels", 64)
    monkeypatch.setattr(backbone_class, "vae_tile_overlap", 16)
    size = (192, 128)
    settings = TransferSettings(**SHORT, width=size[0], height=size[1], gradient_checkpointing=True)
    plan = plan_edit(engine_phases, model, frames, size, "cpu", settings=settings, host_terms=False)
    tiled = next(saver for saver in plan.savers if saver["name"] == "vae_tiling")
    both = next(c for c in plan.combinations if c["savers"] == ["gradient_checkpointing", "vae_tiling"])
    decode, peak = tracked_decode_and_peak(model, frames, size, settings,
                                           ("gradient_checkpointing", "vae_tiling"), monkeypatch)
    assert tiled["phases"]["decode"] < plan.phases["decode"]  # tiles hold less than whole frames
    assert abs(tiled["phases"]["decode"] - decode) <= 0.03 * decode
    assert abs(both["peak_bytes"] - peak) <= 0.03 * peak


def test_cuda_plan_on_a_machine_without_one() -> None:
    """A CUDA half-precision plan runs here: weights in fp16 (half the fp32 bytes, in
    512-byte blocks), checkpointing lowers the guidance peak."""
    settings = TransferSettings(**SHORT, width=96, height=64)
    cpu = plan_edit(engine_phases, "tiny", 8, (96, 64), "cpu", settings=settings)
    cuda = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings)
    assert cuda.dtype == "float16" and cpu.dtype == "float32"
    assert 0.5 * cpu.modules["denoiser"] <= cuda.modules["denoiser"] < 0.6 * cpu.modules["denoiser"]
    assert all(size % 512 == 0 for size in cuda.modules.values())
    checkpointed = next(s for s in cuda.savers if s["name"] == "gradient_checkpointing")
    assert checkpointed["peak_bytes"] <= cuda.peak_bytes


def test_the_plan_prices_group_offload_and_fp8_casting() -> None:
    """On a CUDA plan of the tiny model: group offload takes the denoiser off the GPU
    where it does not run (decode) and keeps part of it where it does (cfg), and moves
    its weights at every model pass (a whole number of denoisers); fp8 casting keeps the
    cast layers at a byte a parameter (the denoiser's in cfg and decode, the text
    encoder's while it embeds) and is priced as changing the output; with both, float8
    weights cross the bus."""
    settings = TransferSettings(**SHORT, width=96, height=64)
    plan = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings)
    alone = {saver["name"]: saver for saver in plan.savers}
    denoiser = plan.modules["denoiser"]
    group = alone["group_offload"]
    assert group["phases"]["decode"] == plan.phases["decode"] - denoiser
    assert plan.phases["cfg"] - denoiser < group["phases"]["cfg"] < plan.phases["cfg"]
    assert group["bytes_moved"] > 0 and group["bytes_moved"] % denoiser == 0
    assert group["output"] == "identical"
    fp8 = alone["denoiser_fp8"]
    assert fp8["phases"]["decode"] < plan.phases["decode"] and fp8["phases"]["cfg"] < plan.phases["cfg"]
    assert (fp8["output"], fp8["bytes_moved"]) == ("fp8 weights", 0)
    assert alone["text_encoder_fp8"]["phases"]["embed"] < plan.phases["embed"]
    both = next(c for c in plan.combinations if c["savers"] == ["denoiser_fp8", "group_offload"])
    assert both["costs"]["group_offload"]["bytes_moved"] < group["bytes_moved"]


def test_memory_command_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    assert main(["memory", "--model", "tiny", "--frames", "8", "--size", "96x64", "--device", "cpu",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan) >= {"peak_bytes", "phases", "savers"}
    assert plan["peak_bytes"] == max(plan["phases"].values())
    assert list(plan["phases"]) == ["weights", "embed", "encode", "invert", "features", "guide",
                                    "cfg", "decode"]
    tiny = ["memory", "--model", "tiny", "--frames", "8", "--size", "96x64", "--device", "cpu"]
    assert main([*tiny, "--gpu-memory-gb", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"]["savers"] == []  # 1 GB is plenty
    assert main([*tiny, "--gpu-memory-gb", "0.001"]) == 1
    assert capsys.readouterr().err.startswith("error: This edit needs about ")
    assert main(["memory", "--model", "tiny", "--size", "96by64", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == "error: --size '96by64' is not WxH; give it as 576x320."
    assert main(["memory", "--model", "some/other-model", "--device", "cpu"]) == 1
    assert "plan the one with the same architecture" in capsys.readouterr().err


def test_memory_auto_takes_the_cheapest_savers_that_fit() -> None:
    """Hand-built figures: peak 20 GiB; checkpointing (200 recomputed FE) → 12, the VAE
    offload (0.5 GiB moved per edit) → 18, both → 11, tiling (blended tiles) with
    checkpointing → 10.5, group offload (400 GiB streamed) → 9, fp8 weights → 8. The
    cheapest combination that fits is taken, wherever it stands in the list of savers:
    bytes moved once a call beat blended tiles, which beat recomputed FE, which beat
    streaming the weights at every pass, which beats float8 weights."""
    from backend.errors import TooBigForGpuError
    from backend.memory.planner import MemoryPlan, SaverChoice, choose_savers, cost_key

    gib = 2**30
    free = {"recomputed_fe": 0.0, "bytes_moved": 0, "bytes_per_step": 0, "output": "identical",
            "cpu_embedding": False}
    costs = {"gradient_checkpointing": {**free, "recomputed_fe": 200.0},
             "vae_offload": {**free, "bytes_moved": gib // 2},
             "vae_tiling": {**free, "output": "tiles blended"},
             "group_offload": {**free, "bytes_moved": 400 * gib},
             "denoiser_fp8": {**free, "output": "fp8 weights"}}

    def combination(peak: float, *savers: str) -> dict:
        return {"savers": list(savers), "peak_bytes": int(peak * gib), "costs": {s: costs[s] for s in savers}}

    combinations = sorted([combination(9, "group_offload"), combination(12, "gradient_checkpointing"),
                           combination(8, "denoiser_fp8"),
                           combination(18, "vae_offload"), combination(19, "vae_tiling"),
                           combination(11, "gradient_checkpointing", "vae_offload"),
                           combination(10.5, "gradient_checkpointing", "vae_tiling")], key=cost_key)
    assert [c["savers"][-1] for c in combinations] == [
        "vae_offload", "vae_tiling", "gradient_checkpointing", "vae_offload", "vae_tiling",
        "group_offload", "denoiser_fp8"]
    plan = MemoryPlan(model="m", device="cuda", dtype="float16", frames=24, size=(576, 320), windows=1,
                      phases={"weights": 3 * gib, "guide": 20 * gib}, modules={},
                      combinations=combinations)
    assert choose_savers(plan, 24 * gib) == SaverChoice((), 20 * gib)
    assert choose_savers(plan, 18 * gib) == SaverChoice(("vae_offload",), 18 * gib)
    assert choose_savers(plan, 12 * gib) == SaverChoice(("gradient_checkpointing",), 12 * gib)
    assert choose_savers(plan, 11 * gib) == SaverChoice(("gradient_checkpointing", "vae_offload"), 11 * gib)
    assert choose_savers(plan, int(10.5 * gib)).savers == ("gradient_checkpointing", "vae_tiling")
    assert choose_savers(plan, 10 * gib) == SaverChoice(("group_offload",), 9 * gib)
    assert choose_savers(plan, int(8.5 * gib)) == SaverChoice(("denoiser_fp8",), 8 * gib)
    with pytest.raises(TooBigForGpuError) as refused:
        choose_savers(plan, 10 * gib, allowed=("gradient_checkpointing", "vae_offload"))
    assert str(refused.value) == (
        "This edit needs about 11.0 GiB of GPU memory even with gradient_checkpointing, "
        "vae_offload on, and 10.0 GiB are free; edit fewer frames per window (--window-frames), "
        "a smaller --width/--height, or use a GPU with more memory.")
    assert refused.value.code == "too_big_for_gpu"


def test_memory_command_plans_a_clip(capsys: pytest.CaptureFixture[str], clip_path) -> None:  # noqa: ANN001
    """A clip gives its frame count; its framing (fit, within the --width/--height budget
    the model defaults to) gives the size."""
    from backend.cli import main

    assert main(["memory", str(clip_path), "--model", "tiny", "--device", "cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["frames"] == 8
    assert plan["size"][0] * plan["size"][1] <= 576 * 320


class LiveBytesAllocator:
    """bench --memory's Allocator on the CPU: the plan's tensor counter over real tensors."""

    def __init__(self, tracker: LiveBytes) -> None:
        self.tracker = tracker

    def allocated(self) -> int:
        return self.tracker.current

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def peak(self) -> int:
        return self.tracker.peak


def test_bench_memory_sets_each_phase_against_the_plan_on_a_cpu() -> None:
    """bench --memory's own measuring code, run on the CPU with LiveBytes standing in for
    CUDA's counters: every phase is read, and the peak is the plan's within 3 %."""
    from backend.tools.bench_memory import format_memory_report, run_memory_bench

    engine = load_engine("tiny", device="cpu")
    settings = TransferSettings(**SHORT, width=96, height=64, memory="off")
    tracker = LiveBytes()
    with tracker:
        for module in engine.backbone.modules():
            tracker.track_module(module)
        report = run_memory_bench(engine, 12, (96, 64), settings, LiveBytesAllocator(tracker))
    phases = report["phases"]
    assert list(phases) == ["weights", "embed", "encode", "invert", "features", "guide", "cfg",
                            "decode", "peak"]
    # The plan runs inside the tracker here, so a few small tensors it keeps count too.
    assert 1.0 <= phases["weights"]["ratio"] <= 1.01
    assert 0.97 <= phases["peak"]["ratio"] <= 1.03
    print(format_memory_report(report))


def test_bench_memory_needs_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    assert main(["bench", "--memory", "--arch", "tiny", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (
        "error: bench --memory measures GPU memory and needs a CUDA GPU, which this machine "
        "does not have; run `python -m backend memory` here for the plan alone.\n")


# --------------------------------------------------------------------------- regions


def moving_square_masks(regions: int, frames: int, size: tuple[int, int]) -> np.ndarray:
    """`regions` masks (uint8 levels, as the command line reads them) of squares moving
    across a clip of `frames` frames of size (width, height)."""
    width, height = size
    masks = np.zeros((regions, frames, height, width), np.uint8)
    for region in range(regions):
        for frame in range(frames):
            left = (3 * frame + 20 * region) % (width - 16)
            masks[region, frame, 8 + 20 * region:24 + 20 * region, left:left + 16] = 255
    return masks


@pytest.mark.parametrize("model, frames, regions, source_size", [
    ("tiny", 12, 1, (96, 64)),
    ("tiny", 12, 2, (96, 64)),
    ("tiny", 12, 2, (384, 256)),  # masks and plate at 4× the model's sides (fit)
    ("tiny", 40, 2, (96, 64)),  # two windows of ZeroScope's 24
    ("wan-tiny", 9, 1, (96, 64)),
    ("wan-tiny", 9, 2, (96, 64)),
])
def test_plan_of_a_region_edit_predicts_its_peak(model: str, frames: int, regions: int,
                                                 source_size: tuple[int, int]) -> None:
    """The plan with `regions` (the engine's own region functions on fake tensors) against
    the tensor counter over a real Engine.transfer with that many masks: within 3 %."""
    size = (96, 64)
    settings = TransferSettings(**SHORT, width=size[0], height=size[1], region_grow=4,
                                region_feather=4)
    plan = plan_edit(engine_phases, model, frames, None, "cpu", settings=settings, regions=regions, host_terms=False,
                     source_size=source_size)
    assert plan.size == size
    engine = load_engine(model, device="cpu")
    tracker = LiveBytes()
    with tracker:
        for module in engine.backbone.modules():
            tracker.track_module(module)
        engine.transfer(np.zeros((frames, source_size[1], source_size[0], 3), np.uint8), settings,
                        masks=moving_square_masks(regions, frames, source_size))
    print(f"{model}, {frames} frames, {regions} region(s): planned {plan.peak_bytes}, "
          f"counted {tracker.peak}, ratio {plan.peak_bytes / tracker.peak:.4f}")
    assert abs(plan.peak_bytes - tracker.peak) <= 0.03 * tracker.peak
    assert list(plan.phases)[:3] == ["weights", "regions", "embed"]
    assert plan.regions == regions
    assert plan.host_bytes["plate"] == frames * source_size[0] * source_size[1]  # 1 byte a pixel


def test_a_cuda_plan_keeps_the_plate_in_host_memory() -> None:
    """On a GPU the plate (m at the source's size, whole counts: 1 byte a pixel at the
    default feather) is host memory; the GPU holds the latent-size masks; the regions'
    loss and blend add to the guidance and sampling phases."""
    settings = TransferSettings(**SHORT, width=96, height=64)
    plain = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings)
    region = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings, regions=2,
                       source_size=(192, 128))
    assert region.host_bytes["plate"] == 8 * 128 * 192  # uint8 counts of the whole frame
    assert region.host_bytes["regions"] >= region.host_bytes["plate"]
    assert region.phases["regions"] - region.phases["weights"] < region.host_bytes["plate"]
    assert region.phases["guide"] >= plain.phases["guide"]
    assert region.phases["cfg"] >= plain.phases["cfg"]
    assert set(plain.host_bytes) == {"inverted"} and plain.regions == 0


def test_a_cuda_plan_keeps_the_inverted_latents_in_host_memory() -> None:
    """On a GPU the inverted latent of each sampling timestep is host memory, moved there
    as the inversion reaches it: three times the steps keep three times the host bytes
    and not one more byte on the GPU in any phase the inversion reaches."""
    def plan(steps: int):  # noqa: ANN202
        settings = TransferSettings(**{**SHORT, "steps": steps, "inversion_steps": steps},
                                    width=96, height=64)
        return plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings)

    few, more = plan(2), plan(6)
    latent = 4 * 8 * (64 // 8) * (96 // 8) * 2  # (1, 4, 8, 8, 12) in fp16
    assert few.host_bytes == {"inverted": 2 * latent}
    assert more.host_bytes == {"inverted": 6 * latent}
    for phase in ("invert", "features", "guide", "cfg", "decode"):
        assert more.phases[phase] == few.phases[phase], phase


def test_a_cuda_plan_keeps_wans_clip_pixels_in_host_memory() -> None:
    """On a GPU Wan's VAE takes the clip's pixels from host memory and gives the decoded
    frames back there a call at a time (backend/backbones/wan_vae.py): 33 frames
    against 9 (at 64×64; both past the causal cache's warm-up, the third call) add their
    frames' bytes to host memory exactly, and to the encode and decode phases less than
    those bytes (what grows there is latent-sized)."""
    def plan(frames: int):  # noqa: ANN202
        settings = TransferSettings(**SHORT, width=64, height=64)
        return plan_edit(engine_phases, "wan-tiny", frames, (64, 64), "cuda", settings=settings)

    short, long = plan(9), plan(33)
    frame_bytes = 64 * 64 * 3  # uint8
    assert (short.host_bytes["decode"], long.host_bytes["decode"]) == (9 * frame_bytes, 33 * frame_bytes)
    more = 24 * frame_bytes
    assert long.phases["decode"] - short.phases["decode"] < more
    assert long.phases["encode"] - short.phases["encode"] < more


def test_memory_command_plans_regions(capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    tiny = ["memory", "--model", "tiny", "--frames", "8", "--size", "96x64", "--device", "cpu"]
    assert main([*tiny, "--regions", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["regions"] == 2 and "regions" in plan["phases"]
    assert plan["host_bytes"]["plate"] == 8 * 64 * 96  # the model's size: no clip given


def test_a_batch_of_takes_plans_more_for_guidance_and_cfg_only() -> None:
    """B takes sample together: their latent (B, …) grows guide and cfg; the inversion,
    the features and each take's decode are the single edit's, with the takes' target
    embeddings kept alive through them."""
    settings = TransferSettings(**SHORT, width=96, height=64)
    one = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings)
    three = plan_edit(engine_phases, "tiny", 8, (96, 64), "cuda", settings=settings, batch=3)
    assert three.batch == 3 and three.to_dict()["batch"] == 3
    assert three.phases["weights"] == one.phases["weights"]
    growth = {phase: three.phases[phase] - one.phases[phase] for phase in one.phases}
    shared = max(growth[phase] for phase in ("encode", "invert", "decode"))  # what stays alive
    assert growth["guide"] > shared and growth["cfg"] > shared
    assert three.peak_bytes > one.peak_bytes


def test_the_plan_picks_the_largest_batch_of_takes_under_an_assumed_gpu() -> None:
    """--assume-gpu-memory-gb decides the batch on a machine without a GPU: the largest B
    whose plan fits with the savers --memory auto may turn on; all of them without a GPU."""
    from backend.memory.planner import MemoryPlanner, gpu_description

    settings = TransferSettings(**SHORT, width=96, height=64, memory="auto")
    # The planner keeps its plans: the bisection below finds those of 2 and 3 takes made.
    budget_gb: list[float] = []  # the GPU's size, once the plans say it
    planner = MemoryPlanner(lambda: gpu_description("cuda", budget_gb[0]), engine_phases)
    plans = [planner.plan("tiny", settings, 8, (96, 64), "cuda", batch=batch)
             for batch in (1, 2, 3)]
    assert [(plan.frames, plan.size, plan.batch) for plan in plans] == [
        (8, (96, 64), batch) for batch in (1, 2, 3)]
    lowest = [min(c["peak_bytes"] for c in plan.combinations) for plan in plans]
    assert lowest[0] < lowest[1] < lowest[2]
    budget_gb.append((lowest[1] + lowest[2]) / 2 / 1e9)  # two takes fit, three do not
    assert planner.largest_batch("tiny", settings, 8, (96, 64), takes=5, device="cuda") == 2
    decision = planner.decide("tiny", settings, 8, (96, 64), device="cuda", batch=2)
    assert decision.predicted_peak_bytes <= decision.budget_bytes
    no_gpu = MemoryPlanner(lambda: None, engine_phases)
    assert no_gpu.largest_batch("tiny", settings, 8, (96, 64), takes=5, device="cuda") == 5
