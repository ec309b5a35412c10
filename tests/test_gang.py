"""One edit across several processes, on Ray: a gang (backend/cluster/gang.py) running the
Wan edit under Ulysses context parallelism (the maths without Ray, a gang of plain
processes over gloo: tests/test_gang_maths.py).

One gateway, `serve --ray local:2 --gang 2 --model wan-tiny`, shared by its tests: a job
through `python -m backend transfer --server` equal to the single-process edit, a rank
stopped mid-job (the collective times out: the job fails in one sentence), a rank killed
mid-job (the job runs once more on a rebuilt gang).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from shared.client import Client, JobCancelledError
from shared.errors import ErrorCode, UnderstudyError
from tests.conftest import REPO_ROOT, moving_square_frames
from tests.gang_support import GANG_SETTINGS, single_edit
from tests.server_support import (
    ServerProcess,
    clip_pngs,
    settings,
    subprocess_env,
    wait_for_event,
)
from tests.test_cluster import WAIT_S, command_line, descendants, serve

# Every test of the modules that share one local Ray instance runs in one test process
# when the suite runs in parallel (build.py test): two Ray heads at once would compete
# for the CPU their start-up timeouts assume.
pytestmark = pytest.mark.xdist_group("ray")

# A stopped rank fails its job this long after its peers' collective began (the gateway
# fails the job then: peers that waited the whole timeout were alive, none died).
GANG_TIMEOUT_S = "8"
STEP_DELAY = "0.02"
# The gateway plans a job only where the test is about the plan: each plan of the tiny
# Wan costs seconds of CPU (the first test's plan request, and the job of
# `transfer --server` that finds that plan made). Others run unplanned, as on a CPU.
UNPLANNED = {"memory": "off"}
# Long enough for a kill or a stop to land mid-job, after its first progress report (the
# encode's first): some thirty progress steps at the step delay, each a gang's Wan step.
VICTIM = {"steps": 12, "inversion_steps": 12, "guided_steps": 0, "num_frames": 5,
          "width": 64, "height": 64, **UNPLANNED}
# A job that only has to run through: the gang takes jobs again after a fault.
AFTER = {**VICTIM, "steps": 3, "inversion_steps": 3}


@pytest.fixture(scope="module")
def gang_gateway(tmp_path_factory):
    """`serve --ray local:2 --gang 2 --model wan-tiny`: one gang of two ranks."""
    process = ServerProcess(tmp_path_factory.mktemp("gang-gateway") / "state", "--ray", "local:2",
                            "--gang", "2", "--gang-timeout", GANG_TIMEOUT_S, "--model",
                            "wan-tiny", "--test-step-delay", STEP_DELAY,
                            "--assume-gpu-memory-gb", "64").start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The tiny Wan's edit of GANG_SETTINGS in this process, alone (tests/gang_support.py)."""
    return single_edit(tmp_path_factory.mktemp("single-edit"))


@pytest.fixture
def client(gang_gateway):
    client = Client(gang_gateway.address, timeout_s=30.0)
    yield client
    client.close()


def gang_ranks(gateway: ServerProcess) -> list[int]:
    """The pids of the gateway's gang actors (processes titled ray::GangActor)."""
    return [pid for pid in descendants(gateway.process.pid)
            if command_line(pid).startswith("ray::GangActor")]


def test_a_gang_job_through_transfer_server_equals_the_single_process_edit(
        gang_gateway, client, single, tmp_path, python):
    hello = client.hello()
    assert (hello["engine"]["gang"], hello["engine"]["workers"]) == (2, 1)
    # The plan of the job below (made once: the job finds it made).
    planned = client.plan(GANG_SETTINGS, 5, (64, 64))
    assert planned["fits"] and planned["gang"] == {"size": 2, "peak": "per rank, at most"}
    # The frames the single-process edit edited, as a folder of PNGs (lossless).
    clip = tmp_path / "clip"
    clip.mkdir()
    for index, frame in enumerate(moving_square_frames(5, 64, 64)):
        Image.fromarray(frame).save(clip / f"{index:04d}.png")
    flags = ["--prompt", GANG_SETTINGS["prompt"], "--source-prompt",
             GANG_SETTINGS["source_prompt"], "--frames", "5", "--width", "64", "--height", "64",
             "--steps", "2", "--inversion-steps", "2", "--guided-steps", "2", "--iterations",
             "1", "--seed", str(GANG_SETTINGS["seed"])]
    run = subprocess.run([python, "-m", "backend", "transfer", str(clip), *flags, "-o",
                          str(tmp_path / "out.mp4"), "--frames-dir", str(tmp_path / "frames"),
                          "--server", gang_gateway.address],
                         cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                         timeout=WAIT_S)
    assert run.returncode == 0, run.stderr[-2000:]
    sidecar = json.loads((tmp_path / "out.json").read_text())
    assert {key: sidecar["gang"][key] for key in ("size", "rank", "split")} == {
        "size": 2, "rank": 0, "split": True}
    assert sidecar["worker"]["actor"] == "gang0-rank0"
    gang_frames = np.stack([np.asarray(Image.open(path))
                            for path in sorted((tmp_path / "frames").glob("*.png"))])
    alone = single["frames"].numpy()
    assert gang_frames.shape == alone.shape
    assert np.abs(gang_frames.astype(int) - alone).max() <= 1  # one 8-bit level


def test_a_job_of_several_takes_runs_on_the_whole_gang_and_rank_0_ships_each_take(client):
    takes = {**GANG_SETTINGS, "guided_steps": 1, **UNPLANNED}
    client.submit("gang-takes", takes, clip_pngs(5, 64, 64), takes=2)
    client.wait("gang-takes", timeout_s=WAIT_S)
    fetched = [client.fetch("gang-takes", take=take) for take in (1, 2)]
    assert [take.sidecar["seed"] for take in fetched] == [7, 8]
    assert all(take.sidecar["gang"]["split"] and take.sidecar["gang"]["rank"] == 0
               for take in fetched)
    assert client.status("gang-takes")["takes_done"] == [1, 2]


def test_a_rank_without_the_cached_inversion_makes_every_rank_invert(gang_gateway, client):
    job = {**GANG_SETTINGS, "steps": 3, "inversion_steps": 3, "guided_steps": 1, **UNPLANNED}
    client.submit("cached-first", job, clip_pngs(5, 64, 64))
    client.wait("cached-first", timeout_s=WAIT_S)
    client.submit("cached-again", {**job, "seed": 8}, clip_pngs(5, 64, 64))
    assert client.wait("cached-again", timeout_s=WAIT_S).sidecar["inversion_from_cache"]
    rank_1_cache = gang_gateway.state_dir.parent / "cache" / "workers" / "gang0-rank1"
    assert any(rank_1_cache.iterdir())
    shutil.rmtree(rank_1_cache)  # rank 0 still holds the inversion; rank 1 no longer
    client.submit("cached-on-one", {**job, "seed": 9}, clip_pngs(5, 64, 64))
    result = client.wait("cached-on-one", timeout_s=WAIT_S)
    assert result.sidecar["inversion_from_cache"] is False  # both inverted, together


def test_cancel_a_job_running_on_a_gang(client):
    client.submit("gang-cancel", settings(seed=4, **VICTIM), clip_pngs(5, 64, 64))
    wait_for_event(client, "gang-cancel", "progress", timeout_s=WAIT_S)
    assert client.cancel("gang-cancel")["cancel_requested"] is True
    with pytest.raises(JobCancelledError):
        client.wait("gang-cancel", timeout_s=WAIT_S)
    assert client.status("gang-cancel")["state"] == "cancelled"
    # The gang (kept, or rebuilt when its ranks stopped apart) takes the next job.
    client.submit("after-cancel", settings(seed=5, **AFTER), clip_pngs(5, 64, 64))
    assert len(client.wait("after-cancel", timeout_s=WAIT_S).frames) == 5


def test_a_stopped_rank_fails_the_job_within_the_gang_timeout_in_one_sentence(
        gang_gateway, client):
    client.submit("stalled", settings(seed=1, **VICTIM), clip_pngs(5, 64, 64))
    wait_for_event(client, "stalled", "progress", timeout_s=WAIT_S)
    ranks = gang_ranks(gang_gateway)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGSTOP)
    try:
        with pytest.raises(UnderstudyError) as failure:
            client.wait("stalled", timeout_s=WAIT_S)
    finally:
        os.kill(ranks[1], signal.SIGCONT)  # the gang is rebuilt; Ray ends the old ranks
    assert failure.value.code == ErrorCode.GANG_STALLED
    message = str(failure.value)
    assert message.count(". ") == 0 and message.endswith("submit the job again.")
    assert f"within {GANG_TIMEOUT_S} s" in message
    assert client.status("stalled")["attempts"] == 1  # failed, not re-run
    # The rebuilt gang takes the next job.
    client.submit("after-stall", settings(seed=2, **AFTER), clip_pngs(5, 64, 64))
    result = client.wait("after-stall", timeout_s=WAIT_S)
    assert not set(ranks) & set(result.sidecar["gang"]["pids"])


def test_a_rank_killed_mid_job_reruns_the_job_once_on_a_rebuilt_gang(gang_gateway, client):
    client.submit("rank-killed", settings(seed=3, **VICTIM), clip_pngs(5, 64, 64))
    wait_for_event(client, "rank-killed", "progress", timeout_s=WAIT_S)
    ranks = gang_ranks(gang_gateway)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    result = client.wait("rank-killed", timeout_s=WAIT_S)
    assert client.status("rank-killed")["attempts"] == 2  # once more, on the rebuilt gang
    assert len(result.frames) == 5 and result.sidecar["gang"]["size"] == 2
    assert not set(ranks) & set(result.sidecar["gang"]["pids"])
    assert gang_gateway.log().count("Gang gang0 lost rank") == 1


def test_gang_flags_a_user_can_get_wrong_are_one_sentence(tmp_path):
    alone = serve("--gang", "2", "--state-dir", str(tmp_path / "state"))
    assert alone.returncode == 1
    assert alone.stderr.strip().splitlines() == [
        "error: --gang only makes sense with --ray; add --ray auto (or local:N)."]
    zero = serve("--ray", "local:2", "--gang", "0", "--state-dir", str(tmp_path / "state"))
    assert zero.returncode == 1
    assert zero.stderr.strip().splitlines() == [
        "error: --gang is 0 and --gang-timeout 300.0; give --gang 1 or more GPUs and a "
        "positive --gang-timeout."]
