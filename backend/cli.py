"""Command line: `python -m backend COMMAND …`.

Each command is a small function that parses nothing itself: `build_parser` declares
the flags, the function turns them into calls on the engine, server or metrics
modules. Any UnderstudyError ends as one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from backend.errors import UnderstudyError
from backend.metrics import DEFAULT_CLIP_MODEL
from backend.settings import TransferSettings
from backend.tracking import DEFAULT_GRID

DEFAULT_MODEL = "cerspense/zeroscope_v2_576w"
DEFAULT_CACHE = Path.home() / ".cache" / "understudy"


# --------------------------------------------------------------------------- transfer


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TransferSettings field (defaults come from the dataclass)."""
    d = TransferSettings(prompt="x")
    p = parser.add_argument
    p("--prompt", required=True, help="what the subject should become")
    p("--source-prompt", default=d.source_prompt, help="describes the source clip (default empty)")
    p("--negative-prompt", default=d.negative_prompt)
    p("--prompt-prefix", default=d.prompt_prefix, help="prepended to both prompts")
    p("--seed", type=int, default=None, help="random unless given; always recorded")
    p("--frames", dest="num_frames", type=int, default=d.num_frames, help="frames fed to the model")
    p("--start", type=int, default=None, help="first clip frame of a contiguous range "
      "(default: sample evenly over the whole clip)")
    p("--width", type=int, default=d.width)
    p("--height", type=int, default=d.height)
    p("--inversion-steps", type=int, default=d.inversion_steps,
      help="DDIM inversion steps (the reference uses 999)")
    p("--steps", type=int, default=d.steps)
    p("--guided-steps", type=int, default=d.guided_steps)
    p("--iterations", dest="guidance_iterations", type=int, default=d.guidance_iterations,
      help="Adam iterations per guided step")
    p("--lr-start", type=float, default=d.lr_start)
    p("--lr-end", type=float, default=d.lr_end)
    p("--loss", choices=("cosine", "l2"), default=d.loss)
    p("--cfg-scale", type=float, default=d.cfg_scale)
    p("--lowfreq-factor", type=int, default=d.lowfreq_factor)
    p("--no-restart", dest="restart", action="store_false", help="skip restart re-noising")
    p("--gradient-checkpointing", action="store_true", help="less GPU memory, slower guidance")
    p("--vae-slice", type=int, default=d.vae_slice, help="frames per VAE slice")


def settings_from_args(args: argparse.Namespace, output_frames: int | None = None) -> TransferSettings:
    import dataclasses

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransferSettings)
              if hasattr(args, f.name)}
    values["output_frames"] = output_frames
    return TransferSettings.from_dict(values)


def sidecar_path(output: Path) -> Path:
    """out.mp4 → out.json"""
    return output.with_suffix(".json")


def write_outputs(frames, metadata: dict, output: Path, fps: float, frames_dir: Path | None) -> None:
    from backend.video import write_frames_dir, write_video

    write_video(frames, output, fps=fps)
    if frames_dir is not None:
        write_frames_dir(frames, frames_dir)
    sidecar_path(output).write_text(json.dumps(metadata, indent=2))


class ProgressBar:
    """tqdm bar per phase, driven by the engine's progress callback."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.bar = None

    def __call__(self, phase: str, step: int, total: int) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=f"{phase:>8}", unit="step", file=sys.stderr)
        self.bar.n = step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def command_transfer(args: argparse.Namespace) -> int:
    from backend.engine import load_engine
    from backend.video import read_clip

    clip = read_clip(args.clip)
    output_frames = len(clip.frames) if args.match_length else None
    settings = settings_from_args(args, output_frames)
    output = Path(args.output)
    if output.suffix.lower() != ".mp4":
        raise UnderstudyError(f"The output {output} must end in .mp4.")
    progress = ProgressBar()
    try:
        if args.server:
            raise UnderstudyError("Remote jobs (--server) are not available yet.")
        engine = load_engine(args.model, device=args.device, dtype=args.dtype,
                             cache_dir=Path(args.cache_dir))
        result = engine.transfer(clip.frames, settings, progress=progress)
    finally:
        progress.close()
    fps = clip.fps if args.match_length else clip.fps * settings.num_frames / len(clip.frames)
    write_outputs(result.frames, result.metadata, output, fps,
                  Path(args.frames_dir) if args.frames_dir else None)
    print(f"Wrote {output} ({len(result.frames)} frames) and {sidecar_path(output)}; "
          f"seed {result.metadata.get('seed')}.")
    return 0


# --------------------------------------------------------------------------- tiny model


def command_tiny_model(args: argparse.Namespace) -> int:
    from backend.model import save_tiny_model

    save_tiny_model(Path(args.dir), seed=args.seed)
    print(f"Wrote a small random model in diffusers layout to {args.dir} (not for quality).")
    return 0


# --------------------------------------------------------------------------- demo


def command_demo(args: argparse.Namespace) -> int:
    from backend.demo import run_demo

    return run_demo(Path(args.output_dir))


# --------------------------------------------------------------------------- evaluate


def check_cuda_device(device: str) -> None:
    """'cuda' or 'cuda:N' must name a GPU this machine has (else one sentence, not a trace)."""
    import torch

    number = device.partition(":")[2]
    index = 0 if not number else int(number) if number.isdigit() else -1
    if not torch.cuda.is_available() or not 0 <= index < torch.cuda.device_count():
        raise UnderstudyError(f"--device {device} is not a usable CUDA GPU on this machine; "
                              f"drop --device or use --device cpu.")


def command_evaluate(args: argparse.Namespace) -> int:
    from backend.evaluate import evaluate_clips, format_table, save_picture
    from backend.video import read_clip

    picture = Path(args.picture) if args.picture else None
    if picture is not None and picture.suffix.lower() != ".png":
        raise UnderstudyError(f"The picture {picture} must end in .png.")
    if args.device and args.device.startswith("cuda"):
        check_cuda_device(args.device)
    source, result = read_clip(args.source), read_clip(args.result)
    clip_model = None if args.clip_model.lower() == "none" else args.clip_model
    evaluation = evaluate_clips(source.frames, result.frames, args.prompt, clip_model=clip_model,
                                tracker_checkpoint=args.tracker_checkpoint, grid=args.grid,
                                device=args.device)
    report = {"source": str(args.source), "result": str(args.result), **evaluation.report}
    print(format_table(report))
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))
        print(f"Wrote {output}.")
    if picture is not None:
        save_picture(picture, evaluation.source, evaluation.result,
                     evaluation.source_tracks.points, evaluation.result_tracks.points)
        print(f"Wrote {picture}.")
    return 0


# --------------------------------------------------------------------------- bench


def command_bench(args: argparse.Namespace) -> int:
    from backend.bench import main_bench

    return main_bench(args)


# --------------------------------------------------------------------------- parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id, local diffusers folder, or 'tiny' (random, for tests)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                        help="default: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE),
                        help="where inversions are cached (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m backend",
        description="Understudy backend: text-driven motion transfer (Yatim et al., CVPR 2024).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    transfer = commands.add_parser("transfer", help="edit one clip")
    transfer.add_argument("clip", help="video file (mp4, mov, mkv, webm, gif) or folder of frames")
    transfer.add_argument("-o", "--output", required=True, help="output .mp4 (sidecar .json beside it)")
    transfer.add_argument("--frames-dir", help="also write numbered PNGs here")
    transfer.add_argument("--match-length", action="store_true",
                          help="retime the result to the clip's frame count by holding frames")
    transfer.add_argument("--server", help="run on a backend server, e.g. tcp://127.0.0.1:5555")
    transfer.add_argument("--keys", help="folder with CURVE keys for --server")
    add_model_flags(transfer)
    add_settings_flags(transfer)
    transfer.set_defaults(func=command_transfer)

    tiny = commands.add_parser("tiny-model", help="write a small random model in diffusers layout")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=command_tiny_model)

    demo = commands.add_parser("demo", help="run the main job on a generated example clip")
    demo.add_argument("--output-dir", default="demo_output")
    demo.set_defaults(func=command_demo)

    evaluate = commands.add_parser(
        "evaluate", help="score a result against its source: motion fidelity and edit fidelity")
    evaluate.add_argument("source", help="the source clip (video file or folder of frames)")
    evaluate.add_argument("result", help="the edited clip (video file or folder of frames)")
    evaluate.add_argument("--prompt", required=True, help="the target prompt the result was made with")
    evaluate.add_argument("-o", "--output", help="write the JSON report here")
    evaluate.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL,
                          help="CLIP hub id or local folder for edit fidelity, or 'none' "
                               "(default: %(default)s; offline only if cached)")
    evaluate.add_argument("--tracker-checkpoint",
                          help="CoTracker v3 offline checkpoint (scaled_offline.pth); "
                               "default: OpenCV Lucas-Kanade tracks")
    evaluate.add_argument("--grid", type=int, default=DEFAULT_GRID, help="grid×grid tracked points")
    evaluate.add_argument("--picture", help="write a PNG of both clips with tracks drawn")
    evaluate.add_argument("--device", default=None,
                          help="for CLIP and CoTracker (default: cuda if available)")
    evaluate.set_defaults(func=command_evaluate)
    bench = commands.add_parser("bench", help="cost of an edit against the reference procedure")
    bench.add_argument("--arch", choices=("tiny", "zeroscope"), default="tiny")
    bench.add_argument("--random-weights", action="store_true",
                       help="zeroscope: full architecture with random weights (no download)")
    bench.add_argument("--frames", type=int, default=None, help="default: 8 tiny, 24 zeroscope")
    bench.add_argument("--width", type=int, default=None, help="default: 128 tiny, 576 zeroscope")
    bench.add_argument("--height", type=int, default=None, help="default: 64 tiny, 320 zeroscope")
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None)
    bench.add_argument("--gradient-checkpointing", action="store_true")
    bench.add_argument("-o", "--output", help="write the JSON report here")
    bench.set_defaults(func=command_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return args.func(args)
    except UnderstudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"Interrupted after {time.perf_counter() - started:.0f} s.", file=sys.stderr)
        return 130
