"""The memory savers applied to a real (tiny) engine: where the networks are while each
phase runs, accelerate's hooks, ZeroScope's checkpointing part by part under the guided
backward, VAE tiling against whole frames, the settings savers, and `--memory auto`:
decided before the edit, turned on and recorded by the engine."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import backend.method.engine as engine_module
from backend.edit import engine_phases, load_engine
from backend.errors import TooBigForGpuError
from backend.memory.planner import MemoryPlanner, choose_savers
from backend.memory.savers import MemoryDecision, cast_skips, is_cast, savers_applied, with_savers
from backend.memory.text_encoder import text_encoder_placed
from shared.settings import MEMORY_SAVERS, TransferSettings

QUICK = dict(prompt="a cat", source_prompt="a dog", num_frames=4, width=64, height=64, steps=1,
             guided_steps=1, guidance_iterations=1, inversion_steps=1, seed=3)
HOST = torch.device("meta")  # a label for "host memory": the recorder moves nothing


@pytest.fixture(scope="module")
def engine():
    return load_engine("tiny", device="cpu")


def clip() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (4, 48, 64, 3), dtype=np.uint8)


class Recorder:
    """Stands in for module.to: remembers where each network was sent, in order."""

    def __init__(self, backbone) -> None:  # noqa: ANN001
        self.names = dict(zip(map(id, backbone.modules()), ("denoiser", "vae", "text_encoder"),
                              strict=True))
        self.where = dict.fromkeys(self.names.values(), "device")
        self.moves: list[tuple[str, str]] = []

    def __call__(self, module: torch.nn.Module, device: torch.device) -> None:
        name = self.names[id(module)]
        self.where[name] = "host" if device == HOST else "device"
        self.moves.append((name, self.where[name]))


def test_the_offloads_keep_each_network_on_the_gpu_only_while_it_works(engine) -> None:  # noqa: ANN001
    """text_encoder_offload and vae_offload, acted out on the CPU with a recorder: while
    the denoiser runs, the VAE and the text encoder are in host memory (the encoder
    lives there on a GPU and, with text_encoder_offload, embeds there:
    tests/test_text_encoder.py); the VAE visits the device for its own calls;
    afterwards all are home and the backbone is unpatched."""
    backbone = engine.backbone
    recorder = Recorder(backbone)
    recorder.where["text_encoder"] = "host"  # as the loaders leave it on CUDA
    seen_while_denoising: set[tuple[str, str]] = set()
    hook = backbone.unet.register_forward_pre_hook(lambda *_: seen_while_denoising.update(
        (name, recorder.where[name]) for name in ("vae", "text_encoder")))
    try:
        savers = ("gradient_checkpointing", "vae_slice_1", "text_encoder_offload", "vae_offload")
        with savers_applied(backbone, savers, host=HOST, move=recorder, active=True) as installed:
            assert installed == ["vae_offload"]
            engine.transfer(clip(), with_savers(TransferSettings(**QUICK), savers))
    finally:
        hook.remove()
    assert seen_while_denoising == {("vae", "host"), ("text_encoder", "host")}
    assert recorder.moves[:1] == [("vae", "host")]
    visits = recorder.moves[1:-3]
    assert ("vae", "device") in visits and all(name == "vae" for name, _ in visits)
    assert all(visits[i + 1] == (name, "host") for i, (name, where) in enumerate(visits)
               if where == "device")  # every visit ends in host memory
    assert recorder.moves[-3:] == [("denoiser", "device"), ("vae", "device"), ("text_encoder", "device")]
    assert not {"embed", "encode", "decode_slices"} & set(vars(backbone))


def placed_by(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """The engine's embed phase moves networks with the recorder and applies its savers,
    as on a GPU (backend/memory/text_encoder.py)."""
    monkeypatch.setattr(engine_module, "text_encoder_placed", functools.partial(
        text_encoder_placed, host=HOST, move=recorder, active=True))


def has_diffusers_hook(module: torch.nn.Module, name: str) -> bool:
    registry = module.__dict__.get("_diffusers_hook")
    return registry is not None and name in registry.hooks


def test_group_offload_hooks_the_denoisers_blocks_and_changes_no_pixel(engine) -> None:  # noqa: ANN001
    """diffusers' block-level group offloading on the denoiser while the edit runs,
    guided backward included (onto the CPU itself here: the streams are CUDA's, for the
    first GPU run, docs/memory.md): the same frames as without it, no hook left after."""
    backbone = engine.backbone
    plain = engine.transfer(clip(), TransferSettings(**QUICK)).frames
    hooked: list[bool] = []
    hook = backbone.unet.register_forward_pre_hook(
        lambda module, _args: hooked.append(has_diffusers_hook(module.down_blocks[0], "group_offloading")))
    try:
        with savers_applied(backbone, ("group_offload",), host=HOST, move=Recorder(backbone),
                            active=True) as installed:
            assert installed == ["group_offload"]
            offloaded = engine.transfer(clip(), TransferSettings(**QUICK)).frames
    finally:
        hook.remove()
    assert hooked and all(hooked)
    assert not any("_diffusers_hook" in vars(module) or "forward" in vars(module)
                   for network in backbone.modules() for module in network.modules())
    np.testing.assert_array_equal(plain, offloaded)


FP8_TOLERANCE = 8  # of 255: the largest pixel change fp8 weights make on the tiny models


@pytest.mark.parametrize("model, checkpointing", [("tiny", False), ("wan-tiny", True)])
def test_fp8_casting_backpropagates_and_moves_the_frames_by_its_rounding(
        model: str, checkpointing: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' layerwise casting of the denoiser and the text encoder (float8 storage,
    the model's dtype to compute) while an edit runs, through the guided backward with
    and without checkpointing: the guidance gradient reaches the latent (Adam moves it),
    the frames move by fp8's rounding only (within FP8_TOLERANCE levels,
    docs/memory.md), and afterwards the networks have their own weights back, bit for bit."""
    engine = load_engine(model, device="cpu")
    frames_count = 4 if model == "tiny" else 5
    settings = TransferSettings(**{**QUICK, "num_frames": frames_count,
                                   "gradient_checkpointing": checkpointing})
    frames = np.random.default_rng(1).integers(0, 255, (frames_count, 48, 64, 3), dtype=np.uint8)
    before = {name: tensor.clone() for network in engine.backbone.modules()
              for name, tensor in network.state_dict().items()}
    plain = engine.transfer(frames, settings).frames
    gradients: list[torch.Tensor] = []
    original_guide = engine.guide

    def guide(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        latent = original_guide(*args, **kwargs)
        gradients.append(latent - args[0])  # what the guided step's Adam made of the gradient
        return latent

    engine.guide = guide
    savers = ("text_encoder_fp8", "denoiser_fp8")
    placed_by(monkeypatch, Recorder(engine.backbone))  # the embed phase acts as on a GPU
    try:
        with savers_applied(engine.backbone, savers, host=HOST, move=Recorder(engine.backbone),
                            active=True) as installed:
            assert installed == ["denoiser_fp8"]  # the text encoder's acts in the embed phase
            denoiser = engine.backbone.modules()[0]
            assert torch.float8_e4m3fn in {p.dtype for p in denoiser.parameters()}
            cast = engine.transfer(frames, with_savers(settings, savers),
                                   savers=MemoryDecision(savers, 0, 0)).frames
    finally:
        del engine.guide
    assert gradients and all(torch.isfinite(g).all() and g.abs().max() > 0 for g in gradients)
    difference = np.abs(plain.astype(int) - cast.astype(int))
    assert 0 < difference.max() <= FP8_TOLERANCE
    after = {name: tensor for network in engine.backbone.modules()
             for name, tensor in network.state_dict().items()}
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.__future__.get_overwrite_module_params_on_conversion()
    np.testing.assert_array_equal(plain, engine.transfer(frames, settings).frames)


@contextlib.contextmanager
def weights_rounded_to_fp8(network: torch.nn.Module) -> Iterator[None]:
    """The layers layerwise casting stores in float8 (savers.cast_bytes' test) given their
    weights rounded through float8 in place, by hand, while the block runs: what fp8
    casting should compute with."""
    skips = cast_skips(network)
    own = {}
    for name, module in network.named_modules():
        if is_cast(name, module, skips):
            own.update({id(p): (p, p.data) for p in module.parameters(recurse=False)})
    for parameter, data in own.values():
        parameter.data = data.to(torch.float8_e4m3fn).to(data.dtype)
    try:
        yield
    finally:
        for parameter, data in own.values():
            parameter.data = data


@pytest.mark.parametrize("savers", [("group_offload",), ("denoiser_fp8",),
                                    ("denoiser_fp8", "gradient_checkpointing"),
                                    ("denoiser_fp8", "group_offload")])
def test_the_guidance_gradient_flows_through_the_savers(engine, savers: tuple[str, ...]) -> None:  # noqa: ANN001
    """The guidance loss backpropagates through the denoiser to the latent (the tapped,
    truncated pass) with each saver acting: the latent's gradient is finite and nonzero,
    and bit for bit the gradient of the same pass without the saver (under fp8 casting:
    of the pass whose cast layers hold the same weights rounded through float8 by hand,
    so backward read the rounded weights, not host copies or float8 storage)."""
    b = engine.backbone
    latent = torch.randn(1, b.latent_channels, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    text, t = b.embed(["a dog"]), b.schedule.timesteps(10)[1]
    checkpointing = "gradient_checkpointing" in savers

    def gradient(savers: tuple[str, ...]) -> torch.Tensor:
        x = latent.clone().requires_grad_(True)
        with savers_applied(b, savers, host=HOST, move=Recorder(b), active=True), \
                b.checkpointing(checkpointing), torch.enable_grad():
            sum(tap.float().pow(2).sum() for tap in b.taps(x, t, text, truncated=True)).backward()
        return x.grad

    saved = gradient(savers)
    with weights_rounded_to_fp8(b.unet) if "denoiser_fp8" in savers else contextlib.nullcontext():
        expected = gradient(())
    assert torch.isfinite(saved).all() and saved.abs().sum() > 0
    torch.testing.assert_close(saved, expected, rtol=0, atol=0)
    if "denoiser_fp8" in savers:
        assert not torch.equal(saved, gradient(()))  # the rounding moved it


def test_on_a_cpu_the_offloads_are_accepted_and_move_nothing(engine) -> None:  # noqa: ANN001
    recorder = Recorder(engine.backbone)
    with savers_applied(engine.backbone, MEMORY_SAVERS, move=recorder) as installed:
        assert installed == ["vae_tiling"]  # a switch of the VAE: it acts on any device
    assert recorder.moves == []
    with pytest.raises(ValueError, match="Unknown memory saver 'vae_slice_2'"):
        with savers_applied(engine.backbone, ("vae_slice_2",)):
            pass


def test_setting_savers() -> None:
    settings = TransferSettings(**QUICK)
    assert with_savers(settings, ()) is settings
    saved = with_savers(settings, ("gradient_checkpointing", "vae_slice_1"))
    assert (saved.gradient_checkpointing, saved.vae_slice) == (True, 1)


def test_memory_auto_records_its_choice_and_refuses_what_cannot_fit(engine) -> None:  # noqa: ANN001
    """A GPU just under the plan's peak: the cheapest saver that fits is decided before
    the edit, the engine turns it on and the sidecar records it; a GPU of 1 kB refuses
    before any model work; memory "off" plans nothing."""
    settings = TransferSettings(**QUICK)
    budget = {"budget_bytes": 10**12}
    planner = MemoryPlanner(lambda: dict(budget), engine_phases)

    def edited(settings: TransferSettings):  # noqa: ANN202  (as the command line runs one)
        savers = planner.decide(engine.backbone, settings, 4, (64, 48))
        return engine.transfer(clip(), settings, savers=savers)

    plan = planner.plan(engine.backbone, engine.resolve(settings), 4, (64, 48))
    budget["budget_bytes"] = plan.peak_bytes - 1
    cheapest = choose_savers(plan, plan.peak_bytes - 1)
    result = edited(settings)
    memory = result.sidecar.memory
    assert memory["budget_bytes"] == plan.peak_bytes - 1
    assert memory["predicted_peak_bytes"] == cheapest.peak_bytes < plan.peak_bytes
    assert memory["savers"] == list(cheapest.savers)
    assert result.sidecar.settings["gradient_checkpointing"] is ("gradient_checkpointing" in cheapest.savers)
    budget["budget_bytes"] = 1000
    passes = sum(engine.model_passes.values())
    with pytest.raises(TooBigForGpuError, match=r"^This edit needs about .* with .* on, and "):
        edited(settings)
    assert sum(engine.model_passes.values()) == passes  # refused before any model work
    off = edited(TransferSettings(**QUICK, memory="off"))
    assert off.sidecar.memory is None


def test_an_out_of_memory_error_names_the_plans_figure(engine) -> None:  # noqa: ANN001
    """A CUDA out-of-memory error that still happens is one sentence with the plan's
    prediction and the budget, so the estimate can be corrected."""
    from backend.errors import OutOfMemoryError
    from backend.memory.savers import readable

    settings = TransferSettings(**QUICK)
    planner = MemoryPlanner(lambda: {"budget_bytes": 10**12}, engine_phases)

    def out_of_memory(*_args) -> None:  # noqa: ANN002
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.backbone.unet.register_forward_pre_hook(out_of_memory)
    try:
        predicted = planner.decide(engine.backbone, engine.resolve(settings), 4, (64, 48))
        with pytest.raises(OutOfMemoryError) as ran_out:
            engine.transfer(clip(), settings, savers=predicted)
    finally:
        hook.remove()
    message = str(ran_out.value)
    assert message.startswith("The GPU ran out of memory; try ")
    assert (f"the memory plan predicted {readable(predicted.predicted_peak_bytes)} with no saver on, "
            f"against 931.3 GiB; please report both figures") in message
    assert message.endswith(").") and message.count(". ") == 0


def test_group_offload_hooks_survive_gradient_checkpointing_on_wan() -> None:
    """Checkpointing wraps the guided blocks' forward and unwraps it after guidance; under
    group offload that forward is diffusers' hook, which must come back: the CFG steps
    after guidance run hooked, and the frames are those of the same edit without offload.
    (The plan never takes the two together until a GPU run checks the stream's order in
    a recompute: planner.py EXCLUSIVE; the hooks must survive either way.)"""
    wan = load_engine("wan-tiny", device="cpu")
    settings = with_savers(TransferSettings(**{**QUICK, "num_frames": 5, "guidance_block": 2}),
                           ("gradient_checkpointing",))  # blocks 0 and 1 checkpointed
    frames = np.random.default_rng(1).integers(0, 255, (5, 48, 64, 3), dtype=np.uint8)
    plain = wan.transfer(frames, settings).frames
    block = wan.backbone.transformer.blocks[0]
    hooked: list[bool] = []  # per call of the first block: does the offload's hook run it?
    watch = block.register_forward_pre_hook(
        lambda module, _args: hooked.append(has_diffusers_hook(module, "group_offloading")
                                            and "forward" in module.__dict__))
    try:
        with savers_applied(wan.backbone, ("gradient_checkpointing", "group_offload"),
                            host=HOST, move=Recorder(wan.backbone), active=True):
            offloaded = wan.transfer(frames, settings).frames
    finally:
        watch.remove()
    assert hooked and all(hooked), hooked
    assert "forward" not in block.__dict__  # and gone after the edit
    np.testing.assert_array_equal(plain, offloaded)


TILE_TOLERANCE = 3.0  # mean levels of 255, tiled against whole frames (docs/memory.md)


def test_vae_tiling_matches_whole_frames_within_its_blend() -> None:
    """vae_tiling on the tiny Wan's VAE with 32-pixel tiles overlapping by 16 on 64×48
    frames (so every frame is tiled): the decode is within TILE_TOLERANCE mean levels of
    the whole frames' (docs/memory.md); tiles that skip their overlap are further off
    (the named mutant). Afterwards the VAE decodes whole frames again, bit for bit. (The
    tiny ZeroScope's random VAE is far off tiled, overlap or not: its tiling is for a
    GPU's bench to measure on the real VAE.)"""
    backbone = load_engine("wan-tiny", device="cpu").backbone
    backbone.vae_tile_pixels, backbone.vae_tile_overlap = 32, 16
    frames = np.random.default_rng(2).integers(0, 255, (5, 48, 64, 3), dtype=np.uint8)
    frames = np.asarray(torch.nn.functional.avg_pool2d(  # smooth, as video is
        torch.from_numpy(frames).permute(0, 3, 1, 2).float(), 9, 1, 4).round().byte().permute(0, 2, 3, 1))
    latent = backbone.encode(frames, 1)

    def decoded() -> np.ndarray:
        return np.concatenate([one() for one in backbone.decode_slices(latent, 1)])

    whole = decoded()
    with savers_applied(backbone, ("vae_tiling",)) as installed:
        assert installed == ["vae_tiling"]
        tiled = decoded()
    np.testing.assert_array_equal(whole, decoded())  # whole frames again after
    assert "decode_slices" not in vars(backbone)
    difference = np.abs(whole.astype(int) - tiled.astype(int))
    assert 0 < difference.mean() <= TILE_TOLERANCE, difference.mean()


def tile_weights(pixels: int, cells: int, tile: int, overlap: int, cell: int) -> list[list[tuple[int, int, float]]]:
    """For each output pixel along one axis of a tiled decode: (tile, pixel within the
    tile, weight) of every tile it comes from. Tiles of `tile` pixels start every
    tile − overlap pixels; across the first `overlap` pixels of each tile after the
    first, its weight rises linearly from 0 as the tile before's falls from 1."""
    stride = tile - overlap
    starts = range(0, cells, stride // cell)
    weights: list[list[tuple[int, int, float]]] = []
    for pixel in range(pixels):
        index = min(pixel // stride, len(starts) - 1)
        inside = pixel - index * stride
        if index > 0 and inside < overlap:
            ramp = inside / overlap
            weights.append([(index - 1, inside + stride, 1 - ramp), (index, inside, ramp)])
        else:
            weights.append([(index, inside, 1.0)])
    return weights


ZEROSCOPE_TILE_TOLERANCE = 1e-5  # the VAE's float32 output: the blend's rounding only


def test_zeroscope_vae_tiling_is_each_tiles_own_decode_blended_over_the_overlap() -> None:
    """vae_tiling on the tiny ZeroScope's VAE with 32-pixel tiles overlapping by 8 on
    64×48 frames (4×2 tiles): every pixel is its tile's own decode (the tile's latent
    decoded alone, untiled), and across each overlap the linear blend of the two tiles
    (but where a row overlap meets a column overlap), within ZEROSCOPE_TILE_TOLERANCE (docs/memory.md: a tile's decode is not the whole
    frame's there, its GroupNorm and attention see only the tile, so a random VAE is far
    from the whole frames; what tiling promises is this blend). Tiles that skip their
    overlap do not blend (the named mutant). Afterwards the VAE decodes whole frames again."""
    backbone = load_engine("tiny", device="cpu").backbone
    backbone.vae_tile_pixels, backbone.vae_tile_overlap = 32, 8
    vae, cell = backbone.vae, backbone.latent_cell
    latent = torch.randn(2, 4, 6, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = vae.decode(latent).sample
        with backbone.vae_tiling():
            tiled = vae.decode(latent).sample
        assert torch.equal(vae.decode(latent).sample, whole)  # whole frames again after
        tile_cells, stride_cells = 32 // cell, (32 - 8) // cell
        tiles = [[vae.decode(latent[:, :, top:top + tile_cells, left:left + tile_cells]).sample
                  for left in range(0, 8, stride_cells)] for top in range(0, 6, stride_cells)]
    rows, columns = tile_weights(48, 6, 32, 8, cell), tile_weights(64, 8, 32, 8, cell)
    expected = torch.zeros_like(tiled, dtype=torch.float64)
    for y, row in enumerate(rows):
        for x, column in enumerate(columns):
            for (i, ty, wy), (j, tx, wx) in itertools.product(row, column):
                expected[:, :, y, x] += wy * wx * tiles[i][j][:, :, ty, tx].double()
    assert any(len(weights) == 2 for weights in columns) and any(len(weights) == 2 for weights in rows)
    # where an overlap of rows meets one of columns the library blends the tile above
    # as already blended with its left one: those corners are left out
    corners = torch.tensor([[len(row) == 2 and len(column) == 2 for column in columns] for row in rows])
    assert 0 < corners.sum() < corners.numel() / 10
    difference = (tiled.double() - expected).abs()[:, :, ~corners]
    assert difference.max() <= ZEROSCOPE_TILE_TOLERANCE, difference.max()
    assert not torch.allclose(tiled, whole)  # the frames were tiled


def test_zeroscope_checkpointing_recomputes_each_part_once_in_backward(engine) -> None:  # noqa: ANN001
    """Gradient checkpointing part by part (backend/backbones/zeroscope.py
    checkpointed_parts): through a truncated pass and its backward, transformer_in and
    every part of the blocks before up_blocks[1] run twice (the forward, and its
    recompute in backward, one part at a time), up_blocks[1] once; the latent's gradient
    is the one without checkpointing (it flows), and so are the edit's frames."""
    from backend.backbones.zeroscope import checkpointed_parts

    b = engine.backbone
    parts = checkpointed_parts(b.unet)
    assert parts[0] is b.unet.transformer_in and b.unet.down_blocks[0].resnets[0] in parts
    latent = torch.randn(1, b.latent_channels, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    text, t = b.embed(["a dog"]), b.schedule.timesteps(10)[1]
    # a part's recompute calls its forward, not the part: its first child is watched
    watched = [next(part.children()) for part in parts] + [b.unet.up_blocks[1]]
    gradients, runs = [], []
    for enabled in (False, True):
        counted = dict.fromkeys(map(id, watched), 0)
        hooks = [module.register_forward_pre_hook(
            lambda module, _args, counted=counted: counted.__setitem__(id(module), counted[id(module)] + 1))
            for module in watched]
        x = latent.clone().requires_grad_(True)
        try:
            with b.checkpointing(enabled), torch.enable_grad():
                sum(tap.sum() for tap in b.taps(x, t, text, truncated=True)).backward()
        finally:
            for hook in hooks:
                hook.remove()
        gradients.append(x.grad)
        runs.append(counted)
    assert set(runs[0].values()) == {1}
    assert [runs[1][id(child)] for child in watched[:-1]] == [2] * len(parts)
    assert runs[1][id(b.unet.up_blocks[1])] == 1
    assert gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[1], gradients[0], rtol=0, atol=1e-5)
    plain = engine.transfer(clip(), TransferSettings(**QUICK)).frames
    checkpointed = engine.transfer(clip(), TransferSettings(**QUICK, gradient_checkpointing=True)).frames
    np.testing.assert_array_equal(plain, checkpointed)
