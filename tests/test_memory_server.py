"""`--memory auto` on a real server told its GPU has N GB (`serve --assume-gpu-memory-gb`):
it picks the cheapest combination of savers that fits, refuses in one sentence before queueing what
cannot fit, answers `plan`, reports its GPU in the hello and records the choice in the
sidecar; a plan is made off the socket loop, so nobody else waits for it; the command
line refuses before loading the model."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backend.edit import engine_phases
from backend.memory.planner import MemoryPlanner, choose_savers
from backend.server.requests import PLANNING_BUG
from shared import protocol
from shared.client import Client, JobRejected, PlanPending, ServerUnavailable, UnknownJob
from shared.settings import MEMORY_SAVERS, TransferSettings
from tests.server_support import (
    NO_WARM_UP,
    ServerProcess,
    clip_pngs,
    settings,
    wait_for_event,
    wait_until,
)

CLIP_SIZE = (48, 32)  # clip_pngs' frames
BIG = {"width": 256, "height": 256}  # 16× the pixels of QUICK_SETTINGS' 64×64


def tiny_plan(regions: int = 0, **overrides):
    """The plan the server makes of settings(**overrides) on a clip_pngs() clip."""
    parsed = TransferSettings.from_dict(settings(**overrides))
    return MemoryPlanner(lambda: None, engine_phases).plan("tiny", parsed, parsed.num_frames, CLIP_SIZE, "cpu",
                                            regions=regions)


@pytest.fixture(scope="module")
def plans():
    return {"quick": tiny_plan(), "big": tiny_plan(**BIG)}


@pytest.fixture(scope="module")
def budget(plans) -> int:
    """Room for the quick job with its lowest combination of savers, not for the big one."""
    budget = min(c["peak_bytes"] for c in plans["quick"].combinations) + 256
    assert budget < plans["quick"].peak_bytes
    assert budget < min(c["peak_bytes"] for c in plans["big"].combinations)
    return budget


@pytest.fixture(scope="module")
def server(tmp_path_factory, budget):
    process = ServerProcess(tmp_path_factory.mktemp("memory") / "state",
                            "--assume-gpu-memory-gb", repr(budget / 2**30),
                            *NO_WARM_UP).start()
    yield process
    process.stop()


def test_the_server_picks_the_cheapest_savers_and_the_sidecar_records_them(server, plans, budget) -> None:  # noqa: ANN001
    chosen = choose_savers(plans["quick"], budget)
    with Client(server.address, timeout_s=120.0) as client:
        hello = client.hello()
        assert hello["gpu"]["assumed"] is True
        assert hello["gpu"]["total_bytes"] == hello["gpu"]["budget_bytes"] == budget
        assert hello["memory_savers"] == list(MEMORY_SAVERS)
        planned = client.plan(settings(), 6, CLIP_SIZE)
        assert planned["fits"] is True and planned["message"] is None
        assert planned["savers"] == list(chosen.savers)
        assert planned["predicted_peak_bytes"] == chosen.peak_bytes
        assert planned["peak_bytes"] == plans["quick"].peak_bytes
        with_region = client.plan(settings(), 6, CLIP_SIZE, regions=1)  # its masks count
        assert with_region["peak_bytes"] == tiny_plan(regions=1).peak_bytes
        assert with_region["peak_bytes"] != plans["quick"].peak_bytes
        client.submit("fits", settings(), clip_pngs())
        wait_for_event(client, "fits", "result_ready")
        memory = client.fetch("fits").sidecar["memory"]
    assert memory == {"savers": list(chosen.savers), "predicted_peak_bytes": chosen.peak_bytes,
                      "budget_bytes": budget}


def test_a_plan_of_several_takes_covers_the_batch_they_sample_in(server, budget) -> None:  # noqa: ANN001
    """Issue 27: the takes sample in the largest batch the GPU fits, and the plan is that
    batch's (the one a submit of those takes is planned and run with)."""
    planner = MemoryPlanner(lambda: {"budget_bytes": budget}, engine_phases)
    parsed = TransferSettings.from_dict(settings())
    batch = planner.largest_batch("tiny", parsed, 6, CLIP_SIZE, 3, "cpu")
    with Client(server.address, timeout_s=120.0) as client:
        planned = client.plan(settings(), 6, CLIP_SIZE, takes=3)
        one = client.plan(settings(), 6, CLIP_SIZE)
    assert (planned["batch"], one["batch"]) == (batch, 1)
    assert planned["peak_bytes"] == planner.plan("tiny", parsed, parsed.num_frames, CLIP_SIZE,
                                                 "cpu", batch=batch).peak_bytes


def test_the_server_refuses_what_cannot_fit_before_queueing(server, plans) -> None:  # noqa: ANN001
    with Client(server.address, timeout_s=120.0) as client:
        planned = client.plan(settings(**BIG), 6, CLIP_SIZE)
        assert planned["fits"] is False
        assert planned["predicted_peak_bytes"] == min(c["peak_bytes"] for c in plans["big"].combinations)
        with pytest.raises(JobRejected) as refused:
            client.submit("too-big", settings(**BIG), clip_pngs())
        assert refused.value.code == "too_big_for_gpu"
        assert str(refused.value) == planned["message"]
        message = str(refused.value)
        assert message.startswith("This edit needs about ") and message.count(". ") == 0
        assert "fewer frames per window" in message and "a GPU with more memory" in message
        with pytest.raises(UnknownJob):
            client.status("too-big")  # nothing was queued
        assert client.hello()["queue_length"] == 0
        off = client.plan(settings(**BIG, memory="off"), 6, CLIP_SIZE)
        assert off["fits"] is True and off["savers"] == []


def test_a_server_without_a_gpu_plans_nothing(tmp_path) -> None:  # noqa: ANN001
    process = ServerProcess(tmp_path / "state").start()
    try:
        with Client(process.address, timeout_s=60.0) as client:
            hello = client.hello()
            assert (hello["gpu"], hello["memory_savers"]) == (None, [])
            planned = client.plan(settings(**BIG), 6, CLIP_SIZE)
            assert (planned["fits"], planned["predicted_peak_bytes"]) == (True, None)
    finally:
        process.stop()


def test_the_command_line_refuses_before_loading_the_model(clip_path, tmp_path, monkeypatch,
                                                          capsys) -> None:  # noqa: ANN001
    import backend.edit as edit_module
    from backend.cli import main

    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(edit_module, "load_engine", no_loading)
    code = main(["transfer", str(clip_path), "-o", str(tmp_path / "out.mp4"), "--model", "tiny",
                 "--device", "cpu", "--prompt", "a cat", "--width", "64", "--height", "64",
                 "--steps", "1", "--inversion-steps", "1", "--assume-gpu-memory-gb", "0.000001"])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: This edit needs about ") and error.count("\n") == 1


def test_assumed_gpu_memory_is_checked(capsys) -> None:  # noqa: ANN001
    from backend.cli import main

    assert main(["serve", "--assume-gpu-memory-gb", "0"]) == 1
    assert capsys.readouterr().err == ("error: --assume-gpu-memory-gb is 0.0; give a positive "
                                       "size in GiB.\n")


def release(gate: Path, word: str = "go") -> None:
    """Let the held plan go (`serve --test-plan-gate`); renamed into place, so the server
    never reads half a word. `raise` makes the plan fail as a planning bug would."""
    written = gate.with_name(gate.name + ".new")
    written.write_text(word)
    written.rename(gate)


def plans_waiting(client: Client, count: int) -> bool:
    return client.hello()["plans_waiting"] == count


def test_a_plan_holds_up_nobody_but_its_own_request(tmp_path, plans) -> None:  # noqa: ANN001
    gate = tmp_path / "plan-gate"
    process = ServerProcess(tmp_path / "state", "--assume-gpu-memory-gb", "1000",
                            "--test-plan-gate", str(gate), *NO_WARM_UP).start()
    try:
        with Client(process.address, timeout_s=20.0) as other, \
                Client(process.address, timeout_s=3.0) as editor, \
                ThreadPoolExecutor(max_workers=1) as editor_thread:
            other.submit("unplanned", settings(memory="off"), clip_pngs())  # queued at once
            wait_for_event(other, "unplanned", "result_ready")
            asked_at = time.monotonic()
            submitted = editor_thread.submit(editor.submit, "planned", settings(), clip_pngs())
            wait_until(lambda: plans_waiting(other, 1), "the submit waiting for its plan")
            # While the plan is held the server answers everyone else and runs their jobs.
            assert other.fetch("unplanned").sidecar["memory"] is None
            assert other.status("unplanned")["state"] == "done"
            with pytest.raises(UnknownJob):
                other.status("planned")  # nothing is stored before its plan says it fits
            other.submit("meanwhile", settings(memory="off", seed=3), clip_pngs())
            wait_for_event(other, "meanwhile", "progress")
            wait_for_event(other, "meanwhile", "result_ready")
            # The editor waits past its own timeout: the server answers its heartbeats.
            wait_until(lambda: time.monotonic() - asked_at > 3 * editor.timeout_s
                       and plans_waiting(other, 1), "the plan held past the editor's timeout")
            assert not submitted.done()
            release(gate)
            assert submitted.result(timeout=300)["duplicate"] is False
            assert plans_waiting(other, 0)
            wait_for_event(editor, "planned", "result_ready")
            assert editor.fetch("planned").sidecar["memory"] == {
                "savers": [], "predicted_peak_bytes": plans["quick"].peak_bytes,
                "budget_bytes": 1000 * 2**30}

            asked = editor_thread.submit(editor.plan, settings(**BIG), 6, CLIP_SIZE)
            wait_until(lambda: plans_waiting(other, 1), "the plan request waiting")
            assert not asked.done()
            release(gate)
            assert asked.result(timeout=300)["peak_bytes"] == plans["big"].peak_bytes

            # An editor who asks again and again while a plan is made (Check GPU Memory
            # pressed repeatedly) holds one place, however long the plan takes: each plan
            # request replaces the same client's one that waits, not yet begun.
            with Client(process.address, timeout_s=3.0, heartbeat_s=0.1) as presser:
                for _ in range(protocol.DEFAULT_LIMITS["max_queue"] + 2):
                    with pytest.raises(PlanPending):
                        presser.plan(settings(**BIG), 5, CLIP_SIZE, wait_s=0.5)
                wait_until(lambda: plans_waiting(other, 2), "one plan held, the newest waiting")
            asked = editor_thread.submit(editor.plan, settings(**BIG), 5, CLIP_SIZE)

            def answered_with_the_gate_open() -> bool:
                if not gate.exists():
                    release(gate)
                return asked.done()

            wait_until(answered_with_the_gate_open, "the editor's plan request answered",
                       timeout_s=600)
            assert asked.result()["peak_bytes"] > plans["quick"].peak_bytes
            assert plans_waiting(other, 0)
            gate.unlink(missing_ok=True)  # a release nobody took: the next plan waits again

            # A plan that fails (a bug) answers its request in one sentence; nothing is
            # stored and the server goes on.
            failing = editor_thread.submit(editor.submit, "unlucky", settings(seed=5), clip_pngs())
            wait_until(lambda: plans_waiting(other, 1), "the unlucky submit waiting")
            release(gate, "raise")
            with pytest.raises(JobRejected) as refused:
                failing.result(timeout=300)
            assert (refused.value.code, str(refused.value)) == ("internal", PLANNING_BUG)
            with pytest.raises(UnknownJob):
                other.status("unlucky")
            assert plans_waiting(other, 0)
            release(gate)  # the next plan may go as soon as it is asked for
            assert editor.submit("unlucky", settings(seed=5), clip_pngs())["duplicate"] is False
        log = process.log()
        assert "Planning a request's memory failed" in log and "--test-plan-gate said so" in log
    finally:
        # A server whose socket loop waits at the gate (the mutant that plans there)
        # answers no stop: let it through, so it stops now rather than after stop()'s wait.
        release(gate)
        process.stop()


class PlanNeverAnswered:
    """A fake server that never answers `plan` and answers the first `heartbeats`
    heartbeats (all of them: None), as a server still planning does."""

    def __init__(self, heartbeats: int | None) -> None:
        import threading

        import zmq

        self.heartbeats = heartbeats
        self.answered = 0
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.address = f"tcp://127.0.0.1:{self.router.bind_to_random_port('tcp://127.0.0.1')}"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            routing_id, *frames = self.router.recv_multipart()
            header = protocol.decode_header(frames[0])
            if header["type"] == "heartbeat" and (self.heartbeats is None
                                                  or self.answered < self.heartbeats):
                self.answered += 1
                self.router.send_multipart([routing_id, *protocol.encode(
                    {"type": "heartbeat", "req": header["req"], "queue_length": 0, "time": 0})])

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.router.close()


def test_the_client_waits_for_a_plan_while_the_server_answers_and_no_longer() -> None:
    quiet = PlanNeverAnswered(heartbeats=5)
    try:
        with Client(quiet.address, timeout_s=1.0, heartbeat_s=0.2) as client, \
                pytest.raises(ServerUnavailable, match="did not answer within 1 s") as caught:
            client.plan(settings(), 6, CLIP_SIZE)
        assert not isinstance(caught.value, PlanPending)  # silent at the end: gone
        assert quiet.answered == 5  # it waited on past its timeout while they were answered
    finally:
        quiet.close()
    alive = PlanNeverAnswered(heartbeats=None)
    try:
        with Client(alive.address, timeout_s=1.0, heartbeat_s=0.2) as client, \
                pytest.raises(PlanPending, match="answered other requests but not this plan"):
            client.plan(settings(), 6, CLIP_SIZE, wait_s=3.0)  # an interface's short wait
    finally:
        alive.close()
    silent = PlanNeverAnswered(heartbeats=0)
    try:
        with Client(silent.address, timeout_s=1.0, heartbeat_s=0.2) as client, \
                pytest.raises(ServerUnavailable) as caught:
            client.plan(settings(), 6, CLIP_SIZE, wait_s=0.5)  # never heard: not "pending"
        assert not isinstance(caught.value, PlanPending)
    finally:
        silent.close()


GIB_10 = 10 * 2**30
FULL_SIZE = [("zeroscope-random", 24, (576, 320)), ("wan-random", 81, (832, 480))]


@pytest.mark.parametrize("model, frames, size", FULL_SIZE)
def test_a_server_told_10_gib_plans_both_full_size_backbones_without_offloading_the_denoiser(
        model: str, frames: int, size: tuple[int, int]) -> None:
    """The plan a server makes before it queues a job, told its GPU has 10 GiB (`serve
    --assume-gpu-memory-gb 10`), for each backbone at its full size: ServerMemory by the
    workers' model name, as a Ray gateway plans (backend/cluster/gateway.py), so no
    weights load and no full-size edit runs on the CPU. ZeroScope's 24 frames at 576x320
    and Wan's 81 at 832x480 fit with savers that stream nothing at every model pass (no
    group offload, and no leaf-by-leaf offload exists any more), and the plan's figure is
    within the 10 GiB. (One plan each:
    about 30 s and 60 s on a 2-core CPU.)"""
    from backend.cluster.engine_actor import ActorSpec
    from backend.cluster.gateway import gateway_memory
    from backend.memory.planner import gpu_description
    from backend.video import frames_to_edit

    memory = gateway_memory(ActorSpec(model), [{"engine": {"device": "cuda"}}],
                            lambda: gpu_description(None, 10))
    settings = TransferSettings(prompt="a plan", source_prompt="a plan")
    decision = memory.decide(settings, frames, size)
    assert decision.budget_bytes == GIB_10
    assert decision.predicted_peak_bytes <= GIB_10
    assert decision.savers and "group_offload" not in decision.savers
    plan = memory.plan(settings, frames_to_edit(settings, frames), size)  # the same plan, cached
    assert plan.frames == frames and plan.size == size and plan.peak_bytes > GIB_10
