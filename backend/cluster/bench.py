"""Throughput of the Ray gateway: K small jobs through `serve --ray local:N`.

    python -m backend.cluster.bench --workers 1 2 3 --jobs 12 -o bench-cluster.json

For each N it starts a real gateway (`python -m backend serve --model tiny --ray
local:N`, plus the single-box server without `--ray` as the baseline), waits until
it is ready (model loads are not timed), then K editors (one client and thread each)
submit one job at once, each on its own clip (so no job reuses another's inversion),
and wait for their results.
It reports the wall time from the first submit to the last result, jobs per minute,
the gateway process's CPU seconds per job (the cost that grows with the number of
GPUs behind one gateway) and which worker ran each job.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from shared.sidecar import Sidecar

# Small but complete jobs: every phase runs, about a second each with the tiny model.
SMALL_JOB = {"num_frames": 4, "width": 64, "height": 64, "steps": 3, "guided_steps": 1,
             "guidance_iterations": 2, "inversion_steps": 3}
READY_TIMEOUT_S = 600


def clip(shade: int, count: int = 6, width: int = 64, height: int = 48) -> list[bytes]:
    """A bright square moving right over a flat background of this shade, as PNGs."""
    from backend.video import encode_png

    frames = []
    for index in range(count):
        frame = np.full((height, width, 3), shade % 200, np.uint8)
        left = index * (width - 8) // (count - 1)
        frame[height // 2 - 4:height // 2 + 4, left:left + 8] = 255
        frames.append(encode_png(frame))
    return frames


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Gateway:
    """`python -m backend serve` in a subprocess of its own session, on a free port."""

    def __init__(self, folder: Path, workers: int | None, jobs: int) -> None:
        ray = ["--ray", f"local:{workers}"] if workers else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "backend", "serve", "--model", "tiny", "--device", "cpu",
             "--bind", "tcp://127.0.0.1:*", "--state-dir", str(folder / "state"),
             "--cache-dir", str(folder / "cache"), "--max-queue", str(jobs), *ray],
            stdout=subprocess.PIPE, stderr=open(folder / "gateway.log", "wb"), text=True,
            start_new_session=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(self.process.stdout, lines), daemon=True).start()
        while True:
            line = lines.get(timeout=READY_TIMEOUT_S)
            if line == "":
                raise RuntimeError(f"the gateway exited; see {folder / 'gateway.log'}")
            if "ready on " in line:
                self.address = line.split("ready on ")[1].split(" ")[0]
                return

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put("")  # end of output: the process exited


def measure(workers: int | None, jobs: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from shared.client import Client

    def edit(index: int):
        """One editor: its own client, one job, wait for the result."""
        with Client(gateway.address, timeout_s=60.0) as client:
            client.submit(f"bench-{index}", {"prompt": f"job {index}", "seed": index,
                                             **SMALL_JOB}, clip(shade=17 * index))
            return client.wait(f"bench-{index}", timeout_s=3600)

    with tempfile.TemporaryDirectory(prefix="understudy-cluster-bench-") as folder:
        gateway = Gateway(Path(folder), workers, jobs)
        try:
            with Client(gateway.address, timeout_s=60.0) as client:
                engine = client.hello()["engine"]
            cpu_before = process_cpu_s(gateway.process.pid)
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=jobs) as editors:
                results = list(editors.map(edit, range(jobs)))
            wall_s = time.perf_counter() - started
            cpu_s = process_cpu_s(gateway.process.pid) - cpu_before
        finally:
            gateway.stop()
    records = [Sidecar.from_dict(result.sidecar) for result in results]
    ran_on = Counter((record.worker or {}).get("actor", "local") for record in records)
    engine_s = [sum(record.timings_s.values()) for record in records]
    return {"workers": workers or "single box (no --ray)", "jobs": jobs,
            "wall_s": round(wall_s, 2), "jobs_per_minute": round(60 * jobs / wall_s, 1),
            "gateway_cpu_s_per_job": round(cpu_s / jobs, 3),
            "mean_engine_s_per_job": round(sum(engine_s) / jobs, 2),
            "jobs_per_worker": dict(sorted(ran_on.items())), "engine": engine}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the single-box server without --ray")
    parser.add_argument("-o", "--output", help="write the JSON report here")
    args = parser.parse_args(argv)
    runs = [] if args.no_baseline else [None]
    report = []
    for workers in runs + args.workers:
        row = measure(workers, args.jobs)
        report.append(row)
        print(f"{row['workers']!s:>22}  {row['jobs']} jobs in {row['wall_s']:7.1f} s  "
              f"{row['jobs_per_minute']:6.1f} jobs/min  gateway {row['gateway_cpu_s_per_job']:.3f}"
              f" CPU s/job  engine {row['mean_engine_s_per_job']:.2f} s/job  "
              f"{row['jobs_per_worker']}", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
