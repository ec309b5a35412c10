"""The Blender round trip of `python build.py demo`, all headless.

    python -m backend.tools.blender_demo --zip dist/understudy-0.1.0-linux_x64.zip --output demo_output

Starts a backend server, starts Blender (the bpy module) in a second process with the
built extension installed, loads the demo clip as a movie strip, runs
`bpy.ops.understudy.transfer`, and writes to the output folder:

    understudy_demo.blend     the edit, with the result strip above the source
    understudy/<job>/         the result frames the strip shows
    contact_sheet.png         source frames (top row) above result frames (bottom row)

The model is the demo's choice (backend.tools.demo): ZeroScope when its weights and a GPU
are here, else the tiny random model, whose output is noise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from backend.backbones.zeroscope import TINY
from backend.errors import UnderstudyError
from backend.tools.demo import DEMO_PROMPT, TINY_DEMO_SETTINGS, choose_demo_model, demo_clip_frames

ROOT = Path(__file__).resolve().parents[1]
ADDON = "bl_ext.user_default.understudy"
BLEND_NAME = "understudy_demo.blend"
SHEET_NAME = "contact_sheet.png"
SHEET_COLUMNS = 8
SHEET_THUMB_WIDTH = 192
CLIP_FPS = 8
SERVER_START_TIMEOUT_S = 300
READY_LINE = re.compile(r"Understudy server ready on (\S+?)\.? ")


# --------------------------------------------------------------------------- server


def start_server(model: str, state_dir: Path) -> tuple[subprocess.Popen, str]:
    """`python -m backend serve` on a free loopback port; returns (process, address)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "backend", "serve", "--model", model, "--bind", "tcp://127.0.0.1:*",
         "--state-dir", str(state_dir), "--cache-dir", str(state_dir / "cache")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            match = READY_LINE.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(SERVER_START_TIMEOUT_S) or not found:
        process.kill()
        raise UnderstudyError("The demo's backend server did not start; run "
                              "`python -m backend serve --model tiny` to see why.")
    return process, found[0]


# --------------------------------------------------------------------------- inside Blender


def inside_blender(job: dict) -> dict:
    """Runs in the bpy process: install the extension, build the edit, run the operator."""
    import bpy

    bpy.ops.extensions.package_install_files(filepath=job["zip"], repo="user_default",
                                             enable_on_install=True)
    prefs = bpy.context.preferences.addons[ADDON].preferences
    prefs.backend_kind = "SERVER"  # the demo runs its own server; not "this computer"
    prefs.server_address = job["address"]
    bpy.context.preferences.filepaths.save_version = 0  # no .blend1 backups in demo_output
    scene = bpy.context.scene
    scene.render.resolution_x, scene.render.resolution_y = 576, 320
    scene.render.fps, scene.render.fps_base = CLIP_FPS, 1.0
    editor = scene.sequence_editor_create()
    strips = editor.strips if hasattr(editor, "strips") else editor.sequences
    source = strips.new_movie("demo clip", job["clip"], 1, 1, fit_method="FIT")
    editor.active_strip = source
    scene.frame_start, scene.frame_end = source.frame_final_start, source.frame_final_end - 1
    for name, value in job["settings"].items():
        if name != "num_frames":  # the extension sends every visible frame of the strip
            setattr(scene.understudy, name, value)
    scene.understudy.source_prompt = job["source_prompt"]
    bpy.ops.wm.save_as_mainfile(filepath=job["blend"])  # so the frames land beside it
    bpy.ops.understudy.transfer(prompt=job["prompt"])
    bpy.ops.wm.save_as_mainfile(filepath=job["blend"])
    record = scene.understudy_jobs[-1]
    return {"job_id": record.job_id, "seed": record.seed, "strip": record.result_strip,
            "frames_dir": bpy.path.abspath(record.frames_dir),
            "source_range": [source.frame_final_start, source.frame_final_end]}


def run_blender(job: dict, user_dir: Path) -> dict:
    """Run `inside_blender` in a fresh bpy process with a throw-away Blender user folder."""
    env = {**os.environ, "BLENDER_USER_RESOURCES": str(user_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "backend.tools.blender_demo", "--inside-blender",
                             json.dumps(job)], cwd=ROOT, env=env, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("DEMO_RESULT "):
            return json.loads(line[len("DEMO_RESULT "):])
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
    raise UnderstudyError(f"Blender stopped before the demo finished:\n{tail}")


# --------------------------------------------------------------------------- contact sheet


def contact_sheet(source: np.ndarray, result: np.ndarray, columns: int = SHEET_COLUMNS,
                  thumb_width: int = SHEET_THUMB_WIDTH) -> np.ndarray:
    """Evenly spaced source frames in the top row above the same result frames below."""
    from backend.video import resize_frames

    count = min(columns, len(source), len(result))
    picks = np.linspace(0, len(source) - 1, count).round().astype(int)
    height = round(thumb_width * source.shape[1] / source.shape[2] / 2) * 2
    top = resize_frames(source[picks], thumb_width, height)
    bottom = resize_frames(result[np.minimum(picks, len(result) - 1)], thumb_width, height)
    return np.concatenate([np.concatenate(list(top), axis=1),
                           np.concatenate(list(bottom), axis=1)], axis=0)


def run_blender_demo(extension_zip: Path, output_dir: Path) -> dict:
    """The whole round trip; returns the paths it wrote."""
    from PIL import Image

    from backend.video import decode_pngs, write_video

    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    frames = demo_clip_frames()
    clip = output_dir / "blender_source.mp4"
    write_video(frames, clip, fps=CLIP_FPS)
    model, why = choose_demo_model()
    print(f"Blender demo: model {model} ({why}).", flush=True)
    settings = dict(TINY_DEMO_SETTINGS) if model == TINY else {}
    with tempfile.TemporaryDirectory(prefix="understudy-demo-") as scratch:
        server, address = start_server(model, Path(scratch) / "server")
        try:
            job = {"zip": str(extension_zip.resolve()), "address": address, "clip": str(clip),
                   "blend": str(output_dir / BLEND_NAME), "prompt": DEMO_PROMPT,
                   "source_prompt": "a red ball rolling on grass", "settings": settings}
            outcome = run_blender(job, Path(scratch) / "blender-user")
        finally:
            server.kill()
            server.wait()
    result_files = sorted(Path(outcome["frames_dir"]).glob("frame_*.png"))
    result = decode_pngs([path.read_bytes() for path in result_files], "the result frames")
    sheet = output_dir / SHEET_NAME
    Image.fromarray(contact_sheet(frames, result)).save(sheet)
    return {"blend": output_dir / BLEND_NAME, "sheet": sheet, "frames": Path(outcome["frames_dir"]),
            "strip": outcome["strip"], "seed": outcome["seed"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backend.tools.blender_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", help="the built extension zip for this platform")
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--inside-blender", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside_blender:
        print("DEMO_RESULT " + json.dumps(inside_blender(json.loads(args.inside_blender))),
              flush=True)
        return 0
    if not args.zip:
        parser.error("--zip is required (build it with `python build.py`)")
    try:
        written = run_blender_demo(Path(args.zip), Path(args.output))
    except UnderstudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Blender round trip written: {written['blend']} (strip {written['strip']!r}, seed "
          f"{written['seed']}), frames in {written['frames']}/, contact sheet {written['sheet']} "
          f"(source frames on top, result frames below).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
