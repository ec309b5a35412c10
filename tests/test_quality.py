"""Preview and final (issue 27): one inversion for both, the preview's cost against the
final's, the step cache only on unguided steps, the sidecar's cost, --from-take."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from backend.backbones.ddim import DDIMSchedule
from backend.backbones.flow_matching import FlowMatchingSchedule
from backend.backbones.registry import backbones
from backend.backbones.zeroscope import REFERENCE_SCHEDULER
from backend.cli import take_values
from backend.edit import load_engine
from backend.errors import UnderstudyError
from backend.method.cost import forward_equivalents
from backend.method.quality import PREVIEW, route_passes, sampling_route
from shared.settings import DEFAULTS, TransferSettings
from shared.sidecar import Sidecar
from tests.conftest import moving_square_frames

# Small, but enough steps for a preview of three steps, one of them guided.
SETTINGS = {"num_frames": 4, "width": 64, "height": 64, "steps": 15, "inversion_steps": 15,
            "guided_steps": 3, "guidance_iterations": 2, "seed": 3}


def test_a_preview_is_a_strided_subset_of_the_finals_grid_guiding_inside_its_guided_stretch():
    settings = TransferSettings(prompt="a train", **{**SETTINGS, "steps": 50, "guided_steps": 20,
                                                     "guidance_iterations": 10, "lr_start": 0.1,
                                                     "lr_end": 0.05})
    final = sampling_route(settings)
    preview = sampling_route(TransferSettings(**{**settings.to_dict(), "quality": "preview"}))
    assert final.indices == tuple(range(50)) and final.restart and not final.step_cache
    assert preview.indices == tuple(range(0, 50, PREVIEW.stride)) and set(preview.indices) < set(final.indices)
    assert preview.spans == (5,) * 10
    assert preview.guided_steps == 4  # grid indices 0, 5, 10, 15 of the final's 20 guided
    assert preview.learning_rates == tuple(final.learning_rates[i] for i in (0, 5, 10, 15))
    assert preview.guidance_iterations == PREVIEW.guidance_iterations and not preview.restart


@pytest.mark.parametrize("entry", backbones(), ids=lambda entry: entry.name)
@pytest.mark.parametrize("share", [0.0, 0.5, 0.66, 1.0])
def test_a_preview_re_edit_costs_at_most_an_eighth_of_the_finals_at_the_default_settings(entry, share):
    settings = TransferSettings(prompt="a train").resolved(entry.facts.defaults)
    preview = TransferSettings(**{**settings.to_dict(), "quality": "preview"})
    final_fe = sum(forward_equivalents(route_passes(sampling_route(settings), 1), share).values())
    preview_fe = sum(forward_equivalents(route_passes(sampling_route(preview), 1), share).values())
    assert preview_fe <= final_fe / 8


@pytest.mark.parametrize("model", ["tiny", "wan-tiny"])
def test_a_preview_then_the_final_invert_once_and_count_what_the_plan_says(model, tmp_path):
    engine = load_engine(model, device="cpu", cache_dir=tmp_path)
    clip = moving_square_frames(4, 64, 64)
    outcomes = []
    for quality, prompt in (("preview", "a red car"), ("final", "a red car"), ("preview", "a bus")):
        engine.model_passes.clear()
        settings = TransferSettings(prompt=prompt, quality=quality, **SETTINGS)
        result = engine.transfer(clip, settings)
        outcomes.append((result.sidecar, Counter(engine.model_passes)))
    (preview, first_passes), (final, final_passes), (re_preview, re_passes) = outcomes
    assert preview.inversion_from_cache is False and first_passes["invert", "full"] > 0
    # The final reads the preview's inversion: no inversion pass, no source features.
    assert final.inversion_from_cache is True
    assert final_passes["invert", "full"] == final_passes["features", "truncated"] == 0
    assert re_preview.inversion_from_cache is True
    resolved = engine.resolve(TransferSettings(prompt="x", **SETTINGS))
    for sidecar, passes, quality in ((final, final_passes, "final"), (re_preview, re_passes, "preview")):
        route = sampling_route(TransferSettings(**{**resolved.to_dict(), "quality": quality}))
        assert dict(passes) == route_passes(route, len(sidecar.windows))
        assert sidecar.steps == len(route.indices) and sidecar.guided_steps == route.guided_steps
        assert sidecar.settings["quality"] == quality
    assert (preview.steps, preview.guided_steps, final.steps) == (3, 1, 15)
    # The sidecar's cost: FE per phase and in total, seconds per phase and in total.
    cost = re_preview.cost
    fe = cost["forward_equivalents"]
    assert fe["invert"] == 0 and fe["sample"] > 0
    assert fe["total"] == pytest.approx(fe["invert"] + fe["sample"] + fe["decode"], abs=0.11)
    assert set(cost["seconds"]) >= {"invert", "sample", "decode", "total"}
    assert cost["truncated_pass_share"] == engine.backbone.truncated_pass_share
    assert preview.cost["forward_equivalents"]["invert"] > 0
    assert Sidecar.from_dict(json.loads(json.dumps(re_preview.to_dict()))).cost == cost


def test_the_step_cache_is_on_only_around_unguided_steps_never_during_guidance(tmp_path):
    engine = load_engine("wan-tiny", device="cpu", cache_dir=tmp_path)
    backbone = engine.backbone
    seen: dict[str, list[bool]] = {"taps": [], "predict": []}
    taps, predict = backbone.taps, backbone.predict

    def spy_taps(*args, **kwargs):
        seen["taps"].append(backbone.step_cache_on())
        return taps(*args, **kwargs)

    def spy_predict(*args, **kwargs):
        seen["predict"].append(backbone.step_cache_on())
        return predict(*args, **kwargs)

    backbone.taps, backbone.predict = spy_taps, spy_predict
    engine.transfer(moving_square_frames(4, 64, 64),
                    TransferSettings(prompt="a red car", quality="preview", **SETTINGS))
    # Inversion, source features and the guided step's taps ran without the hook; the two
    # unguided steps' CFG passes (4 of them) with it; it is gone after the edit.
    assert seen["taps"] and not any(seen["taps"])
    assert seen["predict"][-4:] == [True] * 4 and not any(seen["predict"][:-4])
    assert not backbone.step_cache_on()


def test_a_final_never_turns_the_step_cache_on(tmp_path):
    engine = load_engine("wan-tiny", device="cpu", cache_dir=None)
    turned: list[bool] = []
    step_cache = engine.backbone.step_cache
    engine.backbone.step_cache = lambda enabled: (turned.append(enabled), step_cache(enabled))[1]
    engine.transfer(moving_square_frames(4, 64, 64), TransferSettings(prompt="a car", **SETTINGS))
    assert turned == []


def test_a_ddim_step_over_a_span_is_ddims_own_step_on_the_coarser_grid():
    from diffusers import DDIMScheduler

    schedule = DDIMSchedule(DDIMScheduler.from_config(REFERENCE_SCHEDULER))
    latent, eps = torch.randn(2, 1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    # Every 5th of the 50 leading timesteps from the 5th (901, 801, …, 1) is the 10-step grid.
    assert schedule.timesteps(50)[4::5] == schedule.timesteps(10)
    torch.testing.assert_close(schedule.step(eps, 50, 4, latent, span=5),
                               schedule.step(eps, 10, 0, latent), rtol=1e-5, atol=1e-5)


def test_a_flow_step_over_a_span_is_one_euler_step_to_the_level_span_steps_on():
    schedule = FlowMatchingSchedule(3.0)
    latent, velocity = torch.randn(2, 1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    sigmas = schedule.sigmas(50)
    torch.testing.assert_close(schedule.step(velocity, 50, 45, latent, span=5),
                               latent + (0 - sigmas[45]) * velocity)
    torch.testing.assert_close(schedule.step(velocity, 50, 10, latent, span=5),
                               latent + (sigmas[15] - sigmas[10]) * velocity)


def _sidecar(prompt: str, seed: int, quality: str) -> dict:
    settings = TransferSettings(prompt=prompt, quality=quality, **{**SETTINGS, "seed": None})
    return Sidecar(settings=settings.to_dict(), seed=seed, model="tiny", steps=3, guided_steps=1,
                   device="cpu", dtype="float32", input_frame_indices=[0, 1, 2, 3],
                   windows=[[0, 4]], inversion_from_cache=False, timings_s={}).to_dict()


def test_from_take_reads_the_takes_prompt_seed_and_settings_at_this_commands_quality(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(_sidecar("a red car", 7, "preview")))
    given = {**DEFAULTS, "quality": "final"}
    values = take_values(one, None, given)
    assert (values["prompt"], values["seed"], values["quality"]) == ("a red car", 7, "final")
    assert values["steps"] == SETTINGS["steps"] and values["guided_steps"] == 3
    assert take_values(one, None, {**given, "seed": 9, "quality": "preview"})["seed"] == 9
    several = tmp_path / "takes.json"
    several.write_text(json.dumps({"takes": [_sidecar("a", 1, "preview"), _sidecar("b", 2, "preview")]}))
    assert take_values(several, 2, given)["prompt"] == "b"
    with pytest.raises(UnderstudyError, match="lists 2 takes; choose one with --take N"):
        take_values(several, None, given)
    with pytest.raises(UnderstudyError, match="records one edit"):
        take_values(one, 2, given)


def test_transfer_from_take_renders_the_preview_at_final_quality_from_its_inversion(
        tmp_path, clip_path):
    from backend.cli import main, settings_flags

    common = [str(clip_path), "--model", "tiny", "--device", "cpu",
              "--cache-dir", str(tmp_path / "cache"),
              *settings_flags({key: value for key, value in SETTINGS.items() if key != "seed"})]

    def transfer(*args: str) -> int:  # the command line, in this process (torch loaded)
        return main(["transfer", *common, *args])

    assert transfer("--prompt", "a red car", "--seed", "4", "--quality", "preview",
                    "-o", str(tmp_path / "preview.mp4")) == 0
    assert transfer("--from-take", str(tmp_path / "preview.json"),
                    "-o", str(tmp_path / "final.mp4")) == 0
    preview_record = json.loads((tmp_path / "preview.json").read_text())
    final_record = json.loads((tmp_path / "final.json").read_text())
    assert preview_record["settings"]["quality"] == "preview" and preview_record["steps"] == 3
    assert final_record["settings"]["quality"] == "final" and final_record["steps"] == 15
    assert final_record["seed"] == 4 and final_record["settings"]["prompt"] == "a red car"
    assert final_record["inversion_from_cache"] is True
    assert final_record["cost"]["forward_equivalents"]["invert"] == 0
    assert (tmp_path / "final.mp4").exists()


def test_a_preview_job_through_the_server_and_then_its_final_invert_once(tmp_path):
    from shared.client import Client
    from tests.server_support import ServerProcess, clip_pngs
    from tests.server_support import settings as job_settings

    steps = {"steps": 10, "inversion_steps": 10, "guided_steps": 2, "guidance_iterations": 1}
    process = ServerProcess(tmp_path / "state").start()
    try:
        with Client(process.address, timeout_s=30.0) as client:
            client.submit("preview", job_settings(seed=5, quality="preview", **steps), clip_pngs(6))
            preview = client.wait("preview", timeout_s=300).sidecar
            client.submit("final", job_settings(seed=5, **steps), clip_pngs(6))
            final = client.wait("final", timeout_s=300).sidecar
    finally:
        process.stop()
    assert preview["settings"]["quality"] == "preview" and preview["steps"] == 2
    assert preview["inversion_from_cache"] is False and preview["cost"]["forward_equivalents"]["total"] > 0
    assert final["settings"]["quality"] == "final" and final["steps"] == 10
    assert final["inversion_from_cache"] is True
