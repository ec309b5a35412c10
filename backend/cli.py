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

from backend.edit import DEFAULT_CACHE, DEFAULT_MODEL
from backend.errors import UnderstudyError
from backend.gang import DEFAULT_COLLECTIVE_TIMEOUT_S
from backend.tools.metrics import DEFAULT_CLIP_MODEL
from backend.tools.tracking import DEFAULT_GRID
from shared.settings import DEFAULTS, REFERENCE_FLAG, SPECS, TransferSettings
from shared.sidecar import Sidecar

# --------------------------------------------------------------------------- transfer


def add_settings_flags(parser: argparse.ArgumentParser, repeatable: tuple[str, ...] = ()) -> None:
    """One flag per TransferSettings field that has one; names, defaults and help come
    from shared/settings.py. The fields in `repeatable` may be given several times (a
    list, None when not given)."""
    for name, spec in SPECS.items():
        if spec.flag is None:
            continue
        default = DEFAULTS[name]
        if name in repeatable:
            parser.add_argument(spec.flag, dest=name, action="append", default=None,
                                help=f"{spec.help}; repeat it for takes of each prompt")
        elif spec.kind == "bool":
            action = "store_false" if default else "store_true"
            parser.add_argument(spec.flag, dest=name, action=action, help=spec.help)
        else:
            kind = {"int": int, "float": float}.get(spec.kind, str)
            parser.add_argument(spec.flag, dest=name, type=kind, default=default,
                                choices=spec.choices or None, help=spec.help)


def settings_flags(values: dict) -> list[str]:
    """The `transfer` flags that set these TransferSettings fields: {"num_frames": 8} → ["--frames", "8"]."""
    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    flag_of = {action.dest: action.option_strings[0] for action in parser._actions}
    return [part for name, value in values.items() for part in (flag_of[name], str(value))]


def settings_values(args: argparse.Namespace) -> dict:
    """The TransferSettings fields the `transfer` flags set."""
    import dataclasses

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TransferSettings)
            if hasattr(args, f.name)}


def take_values(sidecar_path: Path, take: int | None, given: dict) -> dict:
    """The settings of the take a sidecar records (its prompt, seed and every setting),
    with the flags given on this command line over them and this command's --quality
    (default final): `transfer --from-take out.json` renders that take again, from the
    cached inversion of the same clip. A sidecar listing several takes (`takes`) needs
    --take N (1-based); a sidecar of one edit is its one take.

    given: this command's settings flags; those left at their defaults are the take's."""
    try:
        data = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as error:
        raise UnderstudyError(f"Cannot read the take's sidecar {sidecar_path}: {error}.") from None
    takes = data.get("takes") if isinstance(data, dict) else None
    if isinstance(takes, list):
        if take is None or not 1 <= take <= len(takes):
            raise UnderstudyError(f"{sidecar_path} lists {len(takes)} takes; choose one with "
                                  f"--take N (1 to {len(takes)}).")
        data = takes[take - 1]
    elif take not in (None, 1):
        raise UnderstudyError(f"{sidecar_path} records one edit; leave out --take {take}.")
    record = Sidecar.from_dict(data)
    chosen = {name: value for name, value in given.items()
              if name != "quality" and value != DEFAULTS[name]}
    return {**record.settings, "seed": record.seed, **chosen, "quality": given["quality"]}


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


def cache_max_bytes(gigabytes: float | None) -> int | None:
    """--cache-max-gb in bytes; None keeps the engine's default cap."""
    if gigabytes is None:
        return None
    if not gigabytes > 0:
        raise UnderstudyError(f"--cache-max-gb is {gigabytes}; give a positive size in GiB.")
    return int(gigabytes * 2**30)


def command_transfer(args: argparse.Namespace) -> int:
    from backend.edit import Local, Remote, edit_clip

    if args.keys and not args.server:
        raise UnderstudyError("--keys only makes sense with --server; add --server tcp://HOST:PORT.")
    if args.job_id and not args.server:
        raise UnderstudyError("--job-id only makes sense with --server; add --server "
                              "tcp://HOST:PORT.")
    where = (Remote(args.server, args.keys, args.timeout, args.job_id) if args.server else
             Local(args.model, args.device, args.dtype, Path(args.cache_dir),
                   cache_max_bytes(args.cache_max_gb), args.upscale_model,
                   gpu_gigabytes(args.assume_gpu_memory_gb)))
    values = {**settings_values(args), "prompt": (args.prompt or [""])[0]}
    if args.from_take:
        values = take_values(Path(args.from_take), args.take, values)
    elif args.take is not None:
        raise UnderstudyError("--take only makes sense with --from-take SIDECAR.")
    prompts = args.prompt or [values["prompt"]]
    if args.takes != 1 or len(prompts) > 1:
        return transfer_takes(args, where, values, prompts)
    progress = ProgressBar()
    try:
        outcome = edit_clip(Path(args.clip), values, Path(args.output), where,
                            mask_paths=[Path(mask) for mask in args.mask or ()],
                            reference_paths=[Path(image) for image in args.reference or ()],
                            match_length=args.match_length,
                            frames_dir=Path(args.frames_dir) if args.frames_dir else None,
                            progress=progress)
    finally:
        progress.close()
    print(f"Wrote {outcome.output} ({outcome.frame_count} frames) and {outcome.sidecar_path}; "
          f"seed {outcome.sidecar.seed}.")
    return 0


def transfer_takes(args: argparse.Namespace, where, values: dict, prompts: list[str]) -> int:
    """`transfer --takes K` and/or `--prompt` repeated: every prompt with K seeds, from one
    inversion, here or on --server (backend/edit.py edit_takes); each take is said as it
    is written."""
    from backend.edit import edit_takes

    progress = ProgressBar()

    def written(take) -> None:  # each take as it is made, here or on the server
        progress.close()
        print(f"Wrote {take.output} ({take.frame_count} frames): seed {take.sidecar.seed}, "
              f"{take.sidecar.settings['prompt']!r}.", flush=True)

    try:
        outcome = edit_takes(Path(args.clip), values, prompts, args.takes, Path(args.output),
                             where, mask_paths=[Path(mask) for mask in args.mask or ()],
                             reference_paths=[Path(image) for image in args.reference or ()],
                             match_length=args.match_length,
                             frames_dir=Path(args.frames_dir) if args.frames_dir else None,
                             progress=progress, on_take=written)
    finally:
        progress.close()
    print(f"Wrote {outcome.sidecar_path} (every take) and the contact sheet "
          f"{outcome.contact_sheet}.")
    return 0


# --------------------------------------------------------------------------- server


def command_serve(args: argparse.Namespace) -> int:
    from backend.server import ServerConfig, serve
    from shared.protocol import DEFAULT_LIMITS

    limits = dict(DEFAULT_LIMITS)
    limits.update(max_message_bytes=int(args.max_message_mb * 2**20), max_frames=args.max_frames,
                  max_side=args.max_side, max_job_pixels=int(args.max_job_megapixels * 1e6),
                  max_queue=args.max_queue)
    config = ServerConfig(bind=args.bind, state_dir=Path(args.state_dir),
                          keys_dir=Path(args.keys) if args.keys else None,
                          insecure=args.insecure, limits=limits, keep_hours=args.keep_hours,
                          keep_jobs=args.keep_jobs, test_step_delay_s=args.test_step_delay,
                          test_plan_gate=Path(args.test_plan_gate) if args.test_plan_gate else None,
                          test_take_gate=Path(args.test_take_gate) if args.test_take_gate else None,
                          test_no_plan_warm_up=args.test_no_plan_warm_up,
                          cluster=cluster_options(args),
                          assume_gpu_memory_gb=gpu_gigabytes(args.assume_gpu_memory_gb))
    serve(config, args.model, device=args.device, dtype=args.dtype,
          cache_dir=Path(args.cache_dir), upscale_model=args.upscale_model)
    return 0


def gpu_gigabytes(gigabytes: float | None) -> float | None:
    """--assume-gpu-memory-gb, checked: a positive size or None."""
    if gigabytes is not None and not gigabytes > 0:
        raise UnderstudyError(f"--assume-gpu-memory-gb is {gigabytes}; give a positive size in GiB.")
    return gigabytes


def cluster_options(args: argparse.Namespace):
    """`--ray` and its companions as ClusterOptions; None without --ray."""
    if args.ray is None:
        if args.shared_cache or args.gang != 1:
            raise UnderstudyError(f"{'--shared-cache' if args.shared_cache else '--gang'} only "
                                  "makes sense with --ray; add --ray auto (or local:N).")
        return None
    from backend.cluster.connect import parse_ray_target
    from backend.cluster.gateway import ClusterOptions

    parse_ray_target(args.ray)  # a mistyped address is told before anything starts
    if args.gang < 1 or not args.gang_timeout > 0:
        raise UnderstudyError(f"--gang is {args.gang} and --gang-timeout {args.gang_timeout}; "
                              "give --gang 1 or more GPUs and a positive --gang-timeout.")
    return ClusterOptions(args.ray, shared_cache=args.shared_cache,
                          cancel_grace_s=args.cancel_grace, gang=args.gang,
                          gang_timeout_s=args.gang_timeout)


def command_keys(args: argparse.Namespace) -> int:
    from backend.server import write_keys

    paths = write_keys(Path(args.dir))
    print("Wrote " + ", ".join(str(path) for path in paths) + ".")
    print(f"Server: `python -m backend serve --keys {args.dir}`. Client machines need "
          f"{Path(args.dir) / 'server.key'} and {Path(args.dir) / 'client.key_secret'}.")
    return 0


# --------------------------------------------------------------------------- tiny model


def command_tiny_model(args: argparse.Namespace) -> int:
    from backend.backbones.zeroscope import save_tiny_model

    save_tiny_model(Path(args.dir), seed=args.seed)
    print(f"Wrote a small random model in diffusers layout to {args.dir} (not for quality).")
    return 0


# --------------------------------------------------------------------------- demo


def command_demo(args: argparse.Namespace) -> int:
    from backend.tools.demo import run_demo

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
    from backend.tools.evaluate import evaluate_clips, format_table, save_picture
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
    from backend.tools.bench import main_bench

    return main_bench(args)


# --------------------------------------------------------------------------- parser


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hub id or local diffusers folder (ZeroScope or Wan, told apart by its "
                             "model_index.json), or 'tiny' / 'wan-tiny' (random, for tests)")
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
    transfer.add_argument("-o", "--output", required=True,
                          help="output .mp4 (sidecar .json beside it); with several takes "
                               "OUT-take1.mp4, …")
    transfer.add_argument("--frames-dir", help="also write numbered PNGs here (with several "
                                               "takes, one take{k} folder per take)")
    transfer.add_argument("--mask", action="append", metavar="PATH",
                          help="a region to edit (white = subject): a video, a folder of "
                               "numbered PNGs, or one PNG for every frame, at the clip's size; "
                               "outside it the plate is kept. Repeat for several regions")
    transfer.add_argument(REFERENCE_FLAG, action="append", metavar="IMAGE",
                          help="a picture of the new subject's look (PNG or JPEG), for a "
                               "backbone that takes references (Wan VACE, a --model such as "
                               "Wan-AI/Wan2.1-VACE-1.3B-diffusers); repeat for several")
    transfer.add_argument("--match-length", action="store_true",
                          help="retime the result to the clip's frame count by holding frames")
    transfer.add_argument("--server", help="run on a backend server, e.g. tcp://127.0.0.1:5555")
    transfer.add_argument("--keys", help="folder with CURVE keys for --server")
    transfer.add_argument("--job-id", help="with --server: re-attach to this job (printed "
                          "by an earlier run) and fetch its result, or submit under this id")
    transfer.add_argument("--timeout", type=float, default=10.0,
                          help="seconds to wait for the --server to answer (default: %(default)s)")
    add_model_flags(transfer)
    transfer.add_argument("--cache-max-gb", type=float, default=None,
                          help="the inversion cache's size cap in GiB (2^30 bytes); the least "
                               "recently used inversions are deleted beyond it (default: 20)")
    transfer.add_argument("--upscale-model", default=None,
                          help="the upscaler for --upscale xl: hub id, local diffusers folder or "
                               "'tiny' (default: cerspense/zeroscope_v2_XL)")
    transfer.add_argument("--assume-gpu-memory-gb", type=float, default=None, metavar="N",
                          help="plan the edit (--memory auto) for a GPU with N GiB (2^30 bytes) "
                               "(default: the CUDA device's free memory; on a CPU nothing is "
                               "planned)")
    transfer.add_argument("--from-take", metavar="SIDECAR",
                          help="render the take this sidecar (a result's .json) records: its "
                               "prompt, seed and settings, at --quality (default final), "
                               "reusing the clip's cached inversion; flags given override them")
    transfer.add_argument("--take", type=int, default=None, metavar="N",
                          help="with --from-take and a sidecar of several takes: which (1-based)")
    transfer.add_argument("--takes", type=int, default=1, metavar="K",
                          help="K takes of each prompt, seeds --seed … --seed + K − 1, from one "
                               "inversion: out-take1.mp4, …, one sidecar listing them and "
                               "out-contact.png (default: %(default)s)")
    add_settings_flags(transfer, repeatable=("prompt",))
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
    bench.add_argument("--arch", default="tiny",
                       help="a backbone (zeroscope, wan, wan-vace), its tiny model (tiny, "
                            "wan-tiny, wan-vace-tiny) or its random-weight model "
                            "(zeroscope-random, wan-random, wan-vace-random: the backbone "
                            "with --random-weights); backend/backbones/registry.py lists them "
                            "(default: %(default)s)")
    bench.add_argument("--random-weights", action="store_true",
                       help="zeroscope, wan, wan-vace: full architecture with random weights "
                            "(no download)")
    bench.add_argument("--frames", type=int, default=None, help="default: 8 tiny, 24 zeroscope")
    bench.add_argument("--width", type=int, default=None, help="default: 128 tiny, 576 zeroscope")
    bench.add_argument("--height", type=int, default=None, help="default: 64 tiny, 320 zeroscope")
    bench.add_argument("--device", default=None)
    bench.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None)
    bench.add_argument("--gradient-checkpointing", action="store_true")
    bench.add_argument("--scaling", action="store_true",
                       help="clip-length scaling instead: one edit per length in --lengths")
    bench.add_argument("--lengths", default=None,
                       help="--scaling clip lengths, comma-separated (default: 24,48,96,240)")
    bench.add_argument("--upscale", action="store_true",
                       help="the upscaling stage's cost instead: one edit with it, both stages "
                            "at their native sizes")
    bench.add_argument("--memory", action="store_true",
                       help="GPU memory instead (CUDA only): the memory plan of one edit against "
                            "torch.cuda.max_memory_allocated in each phase")
    bench.add_argument("--preview", action="store_true",
                       help="preview against final, first edit and re-edit, at the default "
                            "settings, on each backbone's tiny model (or --preview-arch)")
    bench.add_argument("--preview-arch", action="append", metavar="ARCH",
                       help="with --preview: the model(s) to bench instead (repeatable)")
    bench.add_argument("--takes", type=int, default=None, metavar="K",
                       help="K takes batched against K single edits instead (FE and seconds)")
    bench.add_argument("--gang", type=int, default=None, metavar="N",
                       help="one edit on one process against the same edit on a gang of N "
                            "processes (GPUs 0 … N − 1, or the CPU): wall seconds, FE per rank, "
                            "and how far their frames are apart")
    bench.add_argument("--steps", type=int, default=None, metavar="N",
                       help="N sampling steps in every edit (the three edits, or with --takes "
                            "also N inversion steps; default: the settings' own)")
    bench.add_argument("-o", "--output", help="write the JSON report here")
    bench.set_defaults(func=command_bench)

    from backend.server import DEFAULT_STATE_DIR
    from shared.protocol import DEFAULT_ADDRESS, DEFAULT_LIMITS

    serve = commands.add_parser("serve", help="run the job server (docs/protocol.md)")
    serve.add_argument("--bind", default=DEFAULT_ADDRESS,
                       help="ZeroMQ address to listen on (default: %(default)s; port * = any)")
    serve.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                       help="job store folder (default: %(default)s)")
    serve.add_argument("--keys", help="folder from `keys`: turns on CURVE encryption and "
                       "client authentication (allowlist: KEYS/authorized_clients)")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback bind without keys (anyone can connect)")
    serve.add_argument("--max-message-mb", type=float,
                       default=DEFAULT_LIMITS["max_message_bytes"] / 2**20,
                       help="the largest message a client may send, in MiB (2^20 bytes) "
                       "(default: %(default)s)")
    serve.add_argument("--max-frames", type=int, default=DEFAULT_LIMITS["max_frames"])
    serve.add_argument("--max-side", type=int, default=DEFAULT_LIMITS["max_side"])
    serve.add_argument("--max-job-megapixels", type=float,
                       default=DEFAULT_LIMITS["max_job_pixels"] / 1e6,
                       help="decoded pixels of the frames one job uses, in millions: bounds "
                       "a job's input memory at 3 bytes a pixel (default: %(default)s)")
    serve.add_argument("--max-queue", type=int, default=DEFAULT_LIMITS["max_queue"])
    serve.add_argument("--keep-hours", type=float, default=72.0,
                       help="keep finished results this long (default: %(default)s)")
    serve.add_argument("--keep-jobs", type=int, default=200,
                       help="keep at most this many finished jobs (default: %(default)s)")
    serve.add_argument("--assume-gpu-memory-gb", type=float, default=None, metavar="N",
                       help="plan jobs (--memory auto) for a GPU with N GiB (2^30 bytes) for "
                       "this server (with --ray: for each worker), for sharing a GPU and for "
                       "tests (default: the CUDA device's free memory; on a CPU nothing is "
                       "planned)")
    serve.add_argument("--test-step-delay", type=float, default=0.0,
                       help="testing only: sleep this many seconds at every progress step, "
                       "so tests can catch a job mid-run")
    serve.add_argument("--test-plan-gate", default=None, metavar="FILE",
                       help="testing only: hold each memory plan until FILE exists, then "
                       "delete it and plan (a FILE saying `raise` makes the plan fail)")
    serve.add_argument("--test-take-gate", default=None, metavar="FILE",
                       help="testing only: after each take of a job of several takes is "
                       "stored and announced, hold the job until FILE exists, then delete it "
                       "and go on; a run going on from takes made before a restart is held so before "
                       "its first take too")
    serve.add_argument("--test-no-plan-warm-up", action="store_true",
                       help="testing only: do not plan the model's own clip at start (a "
                       "server with a GPU to fit plans it ahead of the first job; a test's "
                       "jobs are small clips, and that plan costs seconds of CPU)")
    cluster = serve.add_argument_group("many GPUs (README: Many GPUs; needs the cluster extra)")
    cluster.add_argument("--ray", metavar="ADDRESS",
                         help="run jobs on Ray workers, one per GPU: `auto` (the cluster "
                         "started on this machine), HOST:PORT of a head node, or local:N "
                         "(a private Ray instance with N workers)")
    cluster.add_argument("--shared-cache", action="store_true",
                         help="with --ray: every worker uses --cache-dir itself (a folder "
                         "shared by all machines) instead of a folder of its own")
    cluster.add_argument("--cancel-grace", type=float, default=30.0, metavar="S",
                         help="with --ray: kill and restart a worker that has not stopped a "
                         "cancelled job S seconds after the cancel (default: %(default)s)")
    cluster.add_argument("--gang", type=int, default=1, metavar="N",
                         help="with --ray: run each job on N GPUs of one node together (a "
                         "gang; Wan's attention split over them, ZeroScope on one of them), "
                         "the node's GPUs grouped in gangs of N (default: %(default)s, one job "
                         "per GPU)")
    cluster.add_argument("--gang-timeout", type=float, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                         metavar="S",
                         help="with --gang: a collective between the GPUs of a gang that has not "
                         "completed in S seconds fails its job and the gang is rebuilt "
                         "(default: %(default)s)")
    add_model_flags(serve)
    serve.add_argument("--upscale-model", default=None,
                       help="load an upscaler for upscale 'xl' jobs: hub id "
                            "(cerspense/zeroscope_v2_XL), local diffusers folder or 'tiny' "
                            "(default: none; the hello's engine.upscaler says which)")
    serve.set_defaults(func=command_serve)

    memory = commands.add_parser(
        "memory", help="the GPU memory an edit needs, per phase, planned without weights or a GPU")
    memory.add_argument("clip", nargs="?", help="plan for this clip's frame count and framing")
    memory.add_argument("--model", default=DEFAULT_MODEL,
                        help="tiny, zeroscope-random, wan-tiny, wan-random or a ZeroScope / Wan "
                             "hub id (default: %(default)s)")
    memory.add_argument("--frames", type=int, default=None,
                        help="frames to edit (default: the clip's, else the model's window)")
    memory.add_argument("--size", default=None, help="WxH the model sees (default: the model's)")
    memory.add_argument("--device", default="cuda", help="the device planned for (default: %(default)s)")
    memory.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                        help="default: the model's on CUDA (fp16 ZeroScope, bf16 Wan), fp32 on CPU")
    memory.add_argument("--gradient-checkpointing", action="store_true")
    memory.add_argument("--vae-slice", type=int, default=DEFAULTS["vae_slice"], help="frames per VAE slice")
    memory.add_argument("--window-frames", type=int, default=None, help="default: the model's")
    memory.add_argument("--regions", type=int, default=0,
                        help="plan an edit with this many regions (--mask), at the clip's size "
                             "(default: %(default)s)")
    memory.add_argument("--gpu-memory-gb", type=float, default=None, metavar="N",
                        help="also choose the cheapest combination of savers that fits a GPU with N GiB "
                             "(2^30 bytes) free, or say why none do")
    memory.add_argument("--json", action="store_true", help="print the plan as JSON")
    memory.set_defaults(func=command_memory)

    keys = commands.add_parser("keys", help="write CURVE key pairs for the server and a client")
    keys.add_argument("dir")
    keys.set_defaults(func=command_keys)
    return parser


def command_memory(args: argparse.Namespace) -> int:
    from backend.errors import BadSettingsError
    from backend.memory.planner import format_plan, plan_edit

    size = None
    if args.size is not None:
        try:
            width, height = (int(side) for side in args.size.lower().split("x"))
        except ValueError:
            raise BadSettingsError(f"--size {args.size!r} is not WxH; give it as 576x320.") from None
        size = (width, height)
    frames, source_size = args.frames, None
    if args.clip is not None:
        from backend.video import read_clip

        clip = read_clip(args.clip).frames
        frames = frames or len(clip)
        source_size = (clip.shape[2], clip.shape[1])
    settings = TransferSettings(prompt="a plan", source_prompt="a plan",
                                gradient_checkpointing=args.gradient_checkpointing,
                                vae_slice=args.vae_slice, window_frames=args.window_frames)
    if args.regions < 0:
        raise BadSettingsError(f"--regions {args.regions} is negative; give 0 or more regions.")
    from backend.edit import engine_phases

    plan = plan_edit(engine_phases, args.model, frames, size, args.device, args.dtype, settings,
                     source_size, regions=args.regions)
    report = plan.to_dict()
    if args.gpu_memory_gb is not None:
        from backend.memory.planner import choose_savers, gibibytes

        choice = choose_savers(plan, gibibytes(args.gpu_memory_gb))
        report["chosen"] = {"savers": list(choice.savers), "peak_bytes": choice.peak_bytes}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_plan(plan, tuple(report["chosen"]["savers"]) if "chosen" in report else None))
        if "chosen" in report:
            chosen = report["chosen"]
            print(f"  fits {args.gpu_memory_gb:g} GiB with: {', '.join(chosen['savers']) or 'no saver'} "
                  f"(predicted {chosen['peak_bytes'] / 2**30:.2f} GiB)")
    return 0


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
