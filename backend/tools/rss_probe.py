"""The CPU memory of real edits, measured as the memory plan counts it.

    python -m backend.tools.rss_probe --model tiny --frames 16 40 --size 192x128 [--gradient-checkpointing]

prints, per edit, the growth of the process's resident memory over the edit beside the
plan's prediction of the same quantity (backend/memory/planner.py, device "cpu"), and their
ratio; `--json` prints them as JSON lines. docs/memory.md gives the protocol's reasons.

The protocol, for each edit:

1. The allocator. glibc's thresholds are fixed in the measuring process's environment
   (ALLOCATOR_ENVIRONMENT): every block of a page (4 KiB) or more gets its own mapping,
   given back to the kernel when freed, and the heap's top is trimmed above 128 KiB.
   With the defaults, glibc raises its mapping threshold to 32 MiB after the first
   large free, so tensors freed later stay in the heap, whose free pages below its top
   are never returned: resident memory would then measure the heap's history, not the
   memory alive. A 64 KiB threshold still left the many small tensors of a small edit
   in the heap (tiny ZeroScope, 40 frames at 128×96: 42.4 MiB measured, 36.8 MiB with
   4 KiB; the plan says 33.8).
   Transparent huge pages are turned off for the process (prctl PR_SET_THP_DISABLE):
   where the kernel's setting is "always", large mappings would be resident in 2 MiB
   steps.
2. One intra-op thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)): every thread keeps
   its own kernel scratch and its own malloc arena, so with more threads the figure
   would depend on the machine's cores; the plan counts tensors, which do not.
3. A fresh process per edit: one measuring process imports the engine's modules (and
   runs nothing), then forks a child per edit, so no edit sees another's leftovers and
   the imports are paid once.
4. In the child: the model loaded and the clip made (both in the baseline), a warm-up
   edit of one window at the same size and settings pulls in the lazily imported
   modules and builds the kernels for every shape the edit uses (a warm-up at another
   size left their first use, a few MiB, in the measurement); then Python's garbage is collected, glibc's free pages returned
   (malloc_trim), the kernel's peak mark reset (`5` to /proc/self/clear_refs resets
   VmHWM) and VmRSS read as the baseline. The measured edit is Engine.transfer of the
   clip without the inversion cache; then VmHWM is read.

measured = VmHWM − baseline
planned  = the CPU plan's peak − its weights (they are in the baseline)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

# glibc's tunables (mallopt(3)); fixing them also turns off glibc's dynamic thresholds.
ALLOCATOR_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": "4096",
    "MALLOC_TRIM_THRESHOLD_": "131072",
    "MALLOC_TOP_PAD_": "0",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
MEASURING_FLAG = "--measure-in-children"
PR_SET_THP_DISABLE = 41  # linux/prctl.h

# A short edit that still runs every phase: inversion, source features, one Adam
# iteration of guidance, CFG sampling, decode.
SHORT_EDIT = dict(prompt="a cat", source_prompt="a dog", steps=2, inversion_steps=2,
                  guidance_iterations=1, guided_steps=1, seed=1)


@dataclasses.dataclass(frozen=True)
class Edit:
    """One measured edit: a model, its frame count and size (width, height), checkpointing,
    and the window length (None: the model's)."""

    model: str
    frames: int
    size: tuple[int, int]
    gradient_checkpointing: bool = False
    window_frames: int | None = None

    def settings(self, size: tuple[int, int] | None = None) -> Any:
        from shared.settings import TransferSettings

        width, height = size or self.size
        return TransferSettings(**SHORT_EDIT, width=width, height=height,
                                gradient_checkpointing=self.gradient_checkpointing,
                                window_frames=self.window_frames)

    def label(self) -> str:
        checkpointing = ", checkpointing" if self.gradient_checkpointing else ""
        window = f", window {self.window_frames}" if self.window_frames else ""
        return f"{self.model} {self.frames} f {self.size[0]}×{self.size[1]}{window}{checkpointing}"


def start_measuring(edits: list[Edit]) -> subprocess.Popen:
    """Start the measuring process (the protocol above) for `edits`; read it with
    `measurements`. The caller can plan while it runs."""
    environment = {**os.environ, **ALLOCATOR_ENVIRONMENT,
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                               os.environ.get("PYTHONPATH")]))}
    payload = json.dumps([dataclasses.asdict(edit) for edit in edits])
    return subprocess.Popen([sys.executable, "-m", "backend.tools.rss_probe", MEASURING_FLAG, payload],
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def measurements(process: subprocess.Popen, timeout_s: float = 900.0) -> list[int]:
    """Each edit's measured growth in bytes, in the order started."""
    out, err = process.communicate(timeout=timeout_s)
    if process.returncode != 0:
        raise RuntimeError(f"The memory probe failed ({process.returncode}): {err.strip()[-3000:]}")
    return [json.loads(line)["measured_bytes"] for line in out.splitlines() if line.startswith("{")]


def planned_growth(edit: Edit) -> int:
    """The plan's prediction of the measured quantity: its peak less the weights resident
    before the edit starts."""
    from backend.edit import engine_phases
    from backend.memory.planner import plan_edit

    plan = plan_edit(engine_phases, edit.model, edit.frames, edit.size, "cpu", settings=edit.settings())
    return plan.peak_bytes - plan.phases["weights"]


# --------------------------------------------------------------------------- the measuring process


def _status_kib(field: str) -> int:
    """A /proc/self/status field in KiB ("VmRSS", "VmHWM")."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _measure_one(edit: Edit) -> int:
    """Steps 4 of the protocol, in this (forked) process: bytes VmHWM rose over the edit."""
    import ctypes
    import gc

    import numpy as np
    import torch

    from backend.edit import load_engine
    from backend.method.engine import Procedure

    torch.set_num_threads(1)
    engine = load_engine(edit.model, device="cpu")
    width, height = edit.size
    clip = np.random.default_rng(0).integers(0, 256, (edit.frames, height, width, 3), np.uint8)
    no_cache = Procedure(use_cache=False)
    # One window of the same size: every kernel shape of the measured edit (its windows
    # are alike), so kernels' code built on first use (oneDNN's JIT) is in the baseline.
    window = engine.resolve(edit.settings()).window_frames
    engine.transfer(clip[:min(window, edit.frames)], edit.settings(), procedure=no_cache)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    engine.transfer(clip, edit.settings(), procedure=no_cache)
    return (_status_kib("VmHWM") - baseline) * 1024


def _measure_in_children(edits: list[Edit]) -> None:
    """Import once, then one forked child per edit; each prints a JSON line."""
    import ctypes

    import backend.backbones.registry  # noqa: F401  (the imports every child shares)
    import backend.method.engine  # noqa: F401

    # No transparent huge pages (inherited by the children): where the kernel's setting
    # is "always", a large tensor's mapping would be resident in 2 MiB steps.
    ctypes.CDLL("libc.so.6").prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)

    for edit in edits:
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read_end)
            code = 0
            try:
                line = json.dumps({"edit": edit.label(), "measured_bytes": _measure_one(edit)})
                os.write(write_end, (line + "\n").encode())
            except BaseException as error:  # noqa: BLE001 - reported by the parent
                os.write(2, f"{edit.label()}: {error!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as reader:
            line = reader.read()
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"measuring {edit.label()} failed")
        sys.stdout.write(line)
        sys.stdout.flush()


def _edit_from(fields: dict[str, Any]) -> Edit:
    return Edit(**{**fields, "size": tuple(fields["size"])})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MEASURING_FLAG]:
        _measure_in_children([_edit_from(fields) for fields in json.loads(argv[1])])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--frames", type=int, nargs="+", default=[24])
    parser.add_argument("--size", nargs="+", default=["192x128"], help="WxH, one or more")
    parser.add_argument("--window-frames", type=int, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        parser.error("the memory probe reads the kernel's counters in /proc/self; run it on Linux.")
    sizes = []
    for size in args.size:
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            parser.error(f"--size {size!r} is not WxH; give it as 128x96.")
        sizes.append((int(width), int(height)))
    edits = [Edit(args.model, frames, size, args.gradient_checkpointing, args.window_frames)
             for size in sizes for frames in args.frames]
    process = start_measuring(edits)
    planned = [planned_growth(edit) for edit in edits]
    for edit, measured, plan in zip(edits, measurements(process), planned, strict=True):
        ratio = measured / plan
        if args.json:
            print(json.dumps({"edit": edit.label(), "planned_bytes": plan, "measured_bytes": measured,
                              "measured_over_planned": ratio}))
        else:
            print(f"{edit.label():<44} planned {plan / 2**20:8.2f} MiB  measured "
                  f"{measured / 2**20:8.2f} MiB  ratio {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
