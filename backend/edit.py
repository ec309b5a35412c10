"""One edit of one clip, on this machine or on a job server: what `transfer` and the
demo both run; and loading an engine, for them, the server and the Ray actors.

    outcome = edit_clip(Path("clip.mp4"), {"prompt": "a train"}, Path("out.mp4"),
                        Local(model="tiny"))                       # or Remote("tcp://…")
    outcome.sidecar.seed, outcome.frame_count   # shared/sidecar.py's record
    engine = load_engine("tiny", device="cpu")  # one loaded model, many edits

Writes out.mp4, the JSON sidecar out.json beside it and, when asked, numbered PNGs;
`edit_takes` several takes of one clip (out-take1.mp4, …, one out.json listing them, the
contact sheet out-contact.png). Every failure is an UnderstudyError with one sentence.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend.errors import UnderstudyError
from backend.results import ProgressCallback, RegionMasks
from shared.settings import TransferSettings
from shared.sidecar import Sidecar

if TYPE_CHECKING:  # torch and the models load only when an engine is
    from backend.backbones.base import Backbone
    from backend.gang import GangMember
    from backend.memory.phases import EditPhases
    from backend.memory.planner import MemoryPlanner
    from backend.memory.savers import MemoryDecision
    from backend.method.engine import Engine

DEFAULT_MODEL = "cerspense/zeroscope_v2_576w"
DEFAULT_CACHE = Path.home() / ".cache" / "understudy"

@dataclass
class Local:
    """Run the engine in this process."""

    model: str = DEFAULT_MODEL
    device: str | None = None
    dtype: str | None = None
    cache_dir: Path = DEFAULT_CACHE
    cache_max_bytes: int | None = None  # None: the engine's default cap
    upscale_model: str | None = None  # for upscale "xl"; None: the backbone's (ZeroScope XL)
    assume_gpu_memory_gb: float | None = None  # `--memory auto` fits into this; None: the GPU's


@dataclass
class Remote:
    """Run on a job server. `job_id` re-attaches to a job submitted before."""

    address: str
    keys: str | None = None
    timeout_s: float = 10.0
    job_id: str | None = None


@dataclass
class EditOutcome:
    """The files one edit wrote, and its record."""

    output: Path
    sidecar_path: Path
    frame_count: int
    sidecar: Sidecar


def sidecar_path(output: Path) -> Path:
    """out.mp4 → out.json"""
    return output.with_suffix(".json")


def edit_clip(clip_path: Path, settings: dict[str, Any], output: Path, where: Local | Remote,
              *, mask_paths: Sequence[Path] = (), match_length: bool = False,
              frames_dir: Path | None = None,
              progress: ProgressCallback | None = None,
              say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
              reference_paths: Sequence[Path] = (),
              ) -> EditOutcome:
    """Read the clip (its region masks, one region per path, and its reference images),
    run the edit where asked, write the outputs. The masks and references are read and
    checked before any model work."""
    from backend.video import read_clip

    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise UnderstudyError(f"The output {output} must end in .mp4.")
    clip = read_clip(clip_path)
    parsed = TransferSettings.from_dict(
        {**settings, "output_frames": len(clip.frames) if match_length else None})
    masks = read_region_masks(mask_paths, clip.frames) if mask_paths else None
    references = read_references(reference_paths)
    if isinstance(where, Remote):
        frames, sidecar = _on_server(where, clip.frames, parsed, progress, say, masks, references)
    else:
        regions = 0 if masks is None else len(masks)
        engine, planner = _engine_for(where, parsed, clip.frames, regions, len(references))
        savers = _savers_decided(planner, engine, parsed, clip.frames, regions)
        result = engine.transfer(clip.frames, parsed, progress=progress, masks=masks,
                                 savers=savers, references=references)
        frames, sidecar = result.frames, result.sidecar
    frames = _frames_for_files(clip.frames, frames, sidecar)
    fps = clip.fps * len(frames) / len(clip.frames)  # the clip's duration, whatever the count
    _write_outputs(frames, sidecar, output, fps, frames_dir)
    return EditOutcome(output, sidecar_path(output), len(frames), sidecar)


@dataclass
class TakesOutcome:
    """The files an edit of several takes wrote: each take's, the one sidecar that lists
    them all, and the contact sheet."""

    takes: list[EditOutcome]
    sidecar_path: Path
    contact_sheet: Path


def take_output(output: Path, take: int) -> Path:
    """out.mp4 → out-take2.mp4 for take 2 (takes count from 1)."""
    return output.with_name(f"{output.stem}-take{take}{output.suffix}")


def contact_sheet_path(output: Path) -> Path:
    """out.mp4 → out-contact.png"""
    return output.with_name(f"{output.stem}-contact.png")


def edit_takes(clip_path: Path, settings: dict[str, Any], prompts: Sequence[str], count: int,
               output: Path, where: Local | Remote, *, mask_paths: Sequence[Path] = (),
               match_length: bool = False, frames_dir: Path | None = None,
               progress: ProgressCallback | None = None,
               on_take: Callable[[EditOutcome], None] | None = None,
               say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
               reference_paths: Sequence[Path] = (),
               ) -> TakesOutcome:
    """Several takes of one clip (`transfer --takes K`, `--prompt` repeated): every prompt
    with each of the seeds seed … seed + count − 1 (backend/results.py takes_of), from one
    inversion, as many at once as the memory plan fits (MemoryPlanner.largest_batch; all
    of them with no GPU to fit); on this machine, or on a job server, which makes them
    the same way and sends each as it is made (docs/protocol.md §4, Takes). Every take
    has the same reference images (`reference_paths`), if any.

    Writes take k's video as out-take{k}.mp4 and, with frames_dir, its PNGs in
    frames_dir/take{k}, as soon as the take is made (`on_take(outcome)` then); one
    sidecar, out.json, the first take's record with `takes` listing every take's own
    (shared/sidecar.py; `transfer --from-take out.json --take k` renders take k again);
    and the contact sheet out-contact.png, the middle frame of each take labelled with
    its number, seed and prompt, one row per prompt."""
    import dataclasses
    import random

    from backend.results import takes_of
    from backend.video import read_clip

    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise UnderstudyError(f"The output {output} must end in .mp4.")
    if count < 1:
        raise UnderstudyError(f"--takes is {count}; ask for at least one take.")
    clip = read_clip(clip_path)
    parsed = TransferSettings.from_dict(
        {**settings, "prompt": prompts[0],
         "output_frames": len(clip.frames) if match_length else None})
    for prompt in prompts[1:]:  # each prompt refused in its own sentence, before any work
        TransferSettings.from_dict({**parsed.to_dict(), "prompt": prompt})
    seed = parsed.seed if parsed.seed is not None else random.SystemRandom().randrange(2**31)
    parsed = dataclasses.replace(parsed, seed=seed)
    takes = takes_of(list(prompts), seed, count)
    masks = read_region_masks(mask_paths, clip.frames) if mask_paths else None
    references = read_references(reference_paths)
    writer = _TakesWriter(clip, output, frames_dir, [take.prompt for take in takes], on_take)
    if isinstance(where, Remote):
        _takes_on_server(where, clip.frames, parsed, list(prompts), count, progress, say,
                         masks, writer, references)
        return writer.finish(count)
    regions = 0 if masks is None else len(masks)
    engine, planner = _engine_for(where, parsed, clip.frames, regions, len(references))
    frame_size = (clip.frames.shape[2], clip.frames.shape[1])
    engine.check_settings(parsed, len(clip.frames), frame_size)
    batch = planner.largest_batch(engine.backbone, parsed, len(clip.frames), frame_size,
                                  len(takes), regions=regions)
    savers = planner.decide(engine.backbone, parsed, len(clip.frames), frame_size,
                            regions=regions, batch=batch)
    engine.transfer_takes(clip.frames, parsed, takes, progress=progress, masks=masks,
                          savers=savers, batch_size=batch,
                          on_take=lambda index, result: writer.add(index + 1, result.frames,
                                                                   result.sidecar),
                          references=references)
    return writer.finish(count)


class _TakesWriter:
    """The files of an edit of several takes, wherever the takes are made: each take's
    video (and frames) as it arrives, then the one sidecar and the contact sheet."""

    def __init__(self, clip, output: Path, frames_dir: Path | None, prompts: list[str],
                 on_take: Callable[[EditOutcome], None] | None) -> None:
        self.clip = clip  # backend.video's Clip: frames and fps
        self.output = output
        self.frames_dir = frames_dir
        self.prompts = prompts  # each take's, in order
        self.on_take = on_take
        self.written: dict[int, tuple[EditOutcome, dict[str, Any], Any]] = {}

    def add(self, number: int, frames, sidecar: Sidecar) -> None:
        """Write take `number` (from 1): its video, its frames when asked."""
        import os

        frames = _frames_for_files(self.clip.frames, frames, sidecar)
        fps = self.clip.fps * len(frames) / len(self.clip.frames)
        video = take_output(self.output, number)
        take_frames = None if self.frames_dir is None else Path(self.frames_dir) / f"take{number}"
        _write_outputs(frames, None, video, fps, take_frames)
        outcome = EditOutcome(video, sidecar_path(self.output), len(frames), sidecar)
        entry = {  # the take's own sidecar, with where its files are
            "take": number, "prompt": self.prompts[number - 1],
            "video": os.path.relpath(video, self.output.parent),
            "frames_dir": None if take_frames is None else os.path.relpath(
                take_frames, self.output.parent),
            **sidecar.to_dict()}
        self.written[number] = (outcome, entry, frames[len(frames) // 2])
        if self.on_take is not None:
            self.on_take(outcome)

    def finish(self, columns: int) -> TakesOutcome:
        """The one sidecar listing every take (the first take's record) and the contact
        sheet, one row of `columns` takes per prompt."""
        import dataclasses

        from PIL import Image

        from backend.video import contact_sheet

        numbers = sorted(self.written)
        if numbers != list(range(1, len(self.prompts) + 1)):
            raise UnderstudyError(f"Only takes {numbers} of {len(self.prompts)} were made; "
                                  "run the edit again.")
        outcomes = [self.written[number][0] for number in numbers]
        entries = [self.written[number][1] for number in numbers]
        sidecar = dataclasses.replace(outcomes[0].sidecar, takes=entries)
        sidecar_path(self.output).write_text(json.dumps(sidecar.to_dict(), indent=2))
        labels = [f"take {entry['take']} · seed {entry['seed']} · {entry['prompt']}"
                  for entry in entries]
        sheet = contact_sheet_path(self.output)
        Image.fromarray(contact_sheet([self.written[number][2] for number in numbers], labels,
                                      columns=columns)).save(sheet)
        return TakesOutcome(outcomes, sidecar_path(self.output), sheet)


def _engine_for(where: Local, settings: TransferSettings, clip_frames,
                regions: int, references: int = 0) -> tuple[Engine, MemoryPlanner]:
    """The engine a local edit runs on (with the backbone's upscaler when the settings
    ask for one), loaded after the plan by name has refused what cannot fit; and the
    planner that decides its savers. References to a backbone that takes none (or too
    many) are refused first, by the model's name, before anything loads."""
    from backend.backbones.loading import backbone_entry, default_upscaler
    from backend.errors import BadReferenceError
    from backend.references import count_problem

    if references:
        facts = backbone_entry(where.model).facts
        if problem := count_problem(references, facts.max_references, facts.name):
            raise BadReferenceError(problem)

    upscaler = None if settings.upscale == "none" else (
        where.upscale_model or default_upscaler(where.model))
    planner = _memory_checked(where, settings, clip_frames, regions)
    engine = load_engine(where.model, device=where.device, dtype=where.dtype,
                         cache_dir=Path(where.cache_dir), cache_max_bytes=where.cache_max_bytes,
                         upscale_model=upscaler)
    return engine, planner


def load_engine(
    model: str, device: str | None = None, dtype: str | None = None, cache_dir: Path | None = None,
    cache_max_bytes: int | None = None, upscale_model: str | None = None,
    gang: GangMember | None = None,
) -> Engine:
    """Load a model ("tiny", "wan-tiny", a hub id, or a local diffusers folder; its
    backbone from its model_index.json, backend/backbones/loading.py) once; the inversion
    cache keeps at most `cache_max_bytes` (default: the engine's cap).

    upscale_model (for upscale "xl": its backbone's upscaler, such as ZeroScope XL, a
    local folder or "tiny"; None: no upscaler) is loaded first, so missing upscaler
    weights end in one sentence before anything else loads.

    gang (backend/gang.py, this process's place in a process group it has joined): the
    backbone splits its denoiser over the gang's ranks when it can (Wan: Ulysses) and the
    engine sums the latent's gradient over them before each Adam step; a backbone that
    cannot split (ZeroScope) loads as for one process, and its gang runs its jobs on
    one rank (`engine.backbone.gang_size()` says which happened)."""
    from backend.backbones.loading import load_backbone, load_upscaler
    from backend.method.engine import Engine

    upscaler = None
    if upscale_model is not None:
        upscaler = Engine(load_upscaler(upscale_model, device, dtype))
    engine = Engine(load_backbone(model, device, dtype), cache_dir, cache_max_bytes, upscaler)
    if gang is not None and gang.size > 1 and engine.backbone.split_over_gang(gang.size):
        engine.gradient_reducer = gang.reduce_gradient
    return engine


def read_references(paths: Sequence[Path]) -> list:
    """Each reference image (backend/references.py read_reference), (H, W, 3) uint8,
    in order; BadReferenceError with one sentence for any unusable one."""
    from backend.references import read_reference

    return [read_reference(path) for path in paths]


def read_region_masks(paths: Sequence[Path], clip_frames) -> RegionMasks:
    """One region per path (backend/masks.py read_mask_levels), stacked as
    the edit's RegionMasks (R, N, H, W) uint8 grey levels (a quarter of float32's bytes);
    BadMaskError with one sentence for any unusable mask."""
    import numpy as np

    from backend.masks import read_mask_levels

    size = (clip_frames.shape[2], clip_frames.shape[1])
    return np.stack([read_mask_levels(path, len(clip_frames), size) for path in paths])


def engine_phases(backbone: Backbone) -> EditPhases:
    """The phases of an edit on `backbone` that the memory plan runs: the Engine's
    (backend/memory/phases.py EditPhases). Whoever plans hands this to the planner
    (`plan_edit`, `MemoryPlanner`): the command line, the server, the Ray gateway, the
    tools and the tests; the memory package never imports the engine."""
    from backend.method.engine import Engine

    return Engine(backbone)


def _memory_checked(where: Local, settings: TransferSettings, clip_frames,
                    regions: int = 0) -> MemoryPlanner:
    """`--memory auto` before anything heavy loads: the plan of this clip on this GPU
    (the model's architecture on the meta device), so an edit that cannot fit is
    refused in one sentence (TooBigForGpuError) before the weights are read. Returns
    the planner that decides the savers once the model is loaded (its plan cached). A
    model the plan cannot name before loading (a local folder) is planned then."""
    import torch

    from backend.backbones.registry import plannable_models
    from backend.memory.planner import MemoryPlanner, gpu_description

    device = where.device or ("cuda" if torch.cuda.is_available() else "cpu")
    planner = MemoryPlanner(lambda: gpu_description(device, where.assume_gpu_memory_gb),
                            engine_phases)
    if where.model in plannable_models():
        planner.decide(where.model, settings, len(clip_frames),
                       (clip_frames.shape[2], clip_frames.shape[1]), device, where.dtype,
                       regions)
    return planner


def _savers_decided(planner: MemoryPlanner, engine: Any, settings: TransferSettings,
                    clip_frames, regions: int) -> MemoryDecision | None:
    """The savers `--memory auto` turns on for this edit on the loaded model (None: none),
    decided before it runs and handed to Engine.transfer. The settings are checked
    first, as the edit checks them, so a bad setting is refused in its own sentence."""
    frame_size = (clip_frames.shape[2], clip_frames.shape[1])
    engine.check_settings(settings, len(clip_frames), frame_size)
    return planner.decide(engine.backbone, settings, len(clip_frames), frame_size,
                          regions=regions)


def _frames_for_files(clip_frames, frames, sidecar: Sidecar):
    """What the files hold: the edit as it came back, except under crop, where it is
    put back into its box of the source frames (backend/method/framing.py, paste_into_box), so
    the file lies exactly over the source clip. The source frames behind it are those
    the model edited, held the way the result was retimed. A result composited through
    its regions is whole source frames already."""
    import numpy as np

    from backend.method.framing import Box, paste_into_box
    from backend.video import retime_indices

    framing = sidecar.framing or {}
    if (sidecar.regions or {}).get("composited") or framing.get("mode") != "crop":
        return frames
    used = np.asarray(sidecar.input_frame_indices)
    background = clip_frames[used[retime_indices(len(used), len(frames))]]
    return paste_into_box(background, frames, Box(*framing["crop_box"]))


def _write_outputs(frames, sidecar: Sidecar | None, output: Path, fps: float,
                   frames_dir: Path | None) -> None:
    """The video, the PNGs when asked, and the sidecar beside the video (None: none, a
    take's, whose record is the takes' one sidecar)."""
    from backend.video import write_frames_dir, write_video

    write_video(frames, output, fps=fps)
    if frames_dir is not None:
        write_frames_dir(frames, frames_dir)
    if sidecar is not None:
        sidecar_path(output).write_text(json.dumps(sidecar.to_dict(), indent=2))


def _on_server(remote: Remote, clip_frames, settings: TransferSettings,
               progress: ProgressCallback | None, say: Callable[[str], None],
               masks: RegionMasks | None = None, references: Sequence = ()):
    """Run one edit through a job server; returns (frames, sidecar) like a local run.

    The whole clip goes over as PNGs (the server samples and resizes, as the engine
    does locally), and each region's masks as grey PNGs (their levels, as read; the
    server reads them back on the same side of ½), and the reference images as PNGs
    (refused here, before the clip is sent, when the server announces it takes fewer:
    shared/client.py). The job id is
    printed first, so a result outlives this process: `--job-id ID` asks for that job
    instead of submitting a new one. Ctrl-C cancels.
    """
    from backend.video import decode_pngs
    from shared.client import ClientError

    client, job_id = _connected(remote, say)
    try:
        _submitted(client, job_id, remote, clip_frames, settings, masks, say,
                   references=references)
        try:
            result = client.wait(job_id, on_event=_progress_of(progress))
        except KeyboardInterrupt:
            client.cancel(job_id)
            raise
        return (decode_pngs(result.frames, f"the result of job {job_id}"),
                Sidecar.from_dict(result.sidecar))
    except ClientError as error:
        raise UnderstudyError(str(error)) from None
    finally:
        client.close()


def _takes_on_server(remote: Remote, clip_frames, settings: TransferSettings,
                     prompts: list[str], count: int, progress: ProgressCallback | None,
                     say: Callable[[str], None], masks: RegionMasks | None,
                     writer: _TakesWriter, references: Sequence = ()) -> None:
    """Make the takes on a job server: one job of every prompt with `count` seeds; each
    take is fetched and written as its take_ready event comes, and any the events
    missed (a reconnect, a re-attached job) once the job is done."""
    from backend.video import decode_pngs
    from shared.client import ClientError
    from shared.protocol import EventType

    client, job_id = _connected(remote, say)

    def fetched(number: int) -> None:
        if number in writer.written:
            return
        take = client.fetch(job_id, take=number)
        writer.add(number, decode_pngs(take.frames, f"take {number} of job {job_id}"),
                   Sidecar.from_dict(take.sidecar))

    report = _progress_of(progress)

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == EventType.TAKE_READY:
            fetched(event["take"])
        elif report is not None:
            report(event)

    try:
        _submitted(client, job_id, remote, clip_frames, settings, masks, say,
                   takes=count, prompts=prompts if len(prompts) > 1 else None,
                   references=references)
        try:
            client.wait(job_id, on_event=on_event)
        except KeyboardInterrupt:
            client.cancel(job_id)
            raise
        for number in range(1, len(writer.prompts) + 1):
            fetched(number)
    except ClientError as error:
        raise UnderstudyError(str(error)) from None
    finally:
        client.close()


def _connected(remote: Remote, say: Callable[[str], None]):
    """A client of the job server, greeted (its model and queue said), and the job id
    this command uses: --job-id's, or a new one."""
    from shared.client import Client, ClientError, load_client_keys

    try:
        client = Client(remote.address, timeout_s=remote.timeout_s,
                        **(load_client_keys(remote.keys) if remote.keys else {}))
    except ClientError as error:
        raise UnderstudyError(str(error)) from None
    try:
        info = client.hello()
    except ClientError as error:
        client.close()
        raise UnderstudyError(str(error)) from None
    say(f"Server {remote.address}: model {info.get('model')} on {info.get('device')}, "
        f"{info.get('queue_length')} jobs ahead.")
    return client, remote.job_id or f"cli-{uuid.uuid4().hex[:16]}"


def _submitted(client, job_id: str, remote: Remote, clip_frames, settings: TransferSettings,
               masks: RegionMasks | None, say: Callable[[str], None], takes: int = 1,
               prompts: list[str] | None = None, references: Sequence = ()) -> None:
    """Submit the job, unless --job-id names one the server has (then re-attach to it).
    The job id is said first, so a result outlives this process."""
    from backend.masks import as_levels
    from backend.video import encode_png
    from shared.client import UnknownJob

    try:
        known = remote.job_id is not None and client.status(job_id)
    except UnknownJob:
        known = False
    if known:
        say(f"Job {job_id}: re-attached ({known['state']}).")
        return
    regions = None if masks is None else [
        [encode_png(as_levels(mask)) for mask in region] for region in masks]
    client.submit(job_id, settings.to_dict(), [encode_png(frame) for frame in clip_frames],
                  masks=regions, takes=takes, prompts=prompts,
                  references=[encode_png(image) for image in references])
    say(f"Job {job_id}: submitted; if this command stops, fetch the result with "
        f"--server {remote.address} --job-id {job_id}.")


def _progress_of(progress: ProgressCallback | None):
    """The client's on_event for the edit's progress callback (None: none)."""
    if progress is None:
        return None

    from shared.protocol import EventType

    def on_event(event: dict[str, Any]) -> None:
        if event["type"] == EventType.PROGRESS:
            progress(event["phase"], event["step"], event["total"])

    return on_event
