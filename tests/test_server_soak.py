"""Soak: several clients submit while the server is SIGKILLed and restarted at random
points. Bounded by counts (clients, jobs, kills), not by time: it ends when every
job has ended. Counts accepted jobs lost (must be 0) and checks that each client gets
its own result.
"""

from __future__ import annotations

import random
import threading

from shared.client import Client, ClientError, ServerUnavailable
from tests.server_support import ServerProcess, clip_pngs, settings

CLIENTS, JOBS_EACH, KILLS = 3, 2, 3
SEED = 2026
WAIT_S = 600  # a hang guard for a busy machine, not a time limit


# Phases after which a job still has steps to go (decode, save), each held by the step
# delay: a kill right after one of these lands while the job runs.
MID_JOB_PHASES = ("encode", "invert", "features", "sample")


class Progress:
    """Counts mid-job progress events seen by all clients, so kills land mid-job."""

    def __init__(self) -> None:
        self.count = 0
        self.clients_done = 0
        self.changed = threading.Condition()

    def seen(self, event: dict) -> None:
        if event.get("phase") not in MID_JOB_PHASES:
            return
        with self.changed:
            self.count += 1
            self.changed.notify_all()

    def client_done(self) -> None:
        with self.changed:
            self.clients_done += 1
            self.changed.notify_all()

    def wait_for(self, count: int) -> bool:
        """Wait until `count` events were seen (True) or every client is done (False)."""
        with self.changed:
            self.changed.wait_for(
                lambda: self.count >= count or self.clients_done == CLIENTS, timeout=WAIT_S)
            return self.count >= count and self.clients_done < CLIENTS


def run_client(address: str, index: int, progress: Progress, outcomes: dict) -> None:
    """Submit this client's jobs and collect each one's end, riding out restarts."""
    client = Client(address, timeout_s=2.0)  # short: a timeout here only means "try again"
    try:
        for number in range(JOBS_EACH):
            job_id = f"soak-{index}-{number}"
            request = (settings(f"client {index} job {number}", seed=1000 * index + number),
                       clip_pngs(6, shade=30 * index + 10 * number))
            while True:  # the same submit again is safe: never run twice
                try:
                    client.submit(job_id, *request)
                    break
                except ServerUnavailable:
                    continue
            outcomes[job_id] = "accepted"
            while True:
                try:
                    result = client.wait(job_id, on_event=progress.seen, timeout_s=WAIT_S)
                    outcomes[job_id] = ("done", result.sidecar["settings"]["prompt"],
                                        result.sidecar["seed"])
                    break
                except ServerUnavailable:
                    continue
                except ClientError as error:
                    outcomes[job_id] = (error.code, str(error))
                    break
    finally:
        client.close()
        progress.client_done()


def test_accepted_jobs_survive_random_kills(tmp_path):
    rng = random.Random(SEED)
    server = ServerProcess(tmp_path / "state", "--test-step-delay", "0.05").start()
    progress, outcomes = Progress(), {}
    threads = [threading.Thread(target=run_client, args=(server.address, index, progress,
                                                         outcomes)) for index in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        target, kills = 0, 0
        for _ in range(KILLS):
            target += rng.randint(1, 6)
            if not progress.wait_for(target):
                break
            server.kill()
            kills += 1
            server.start()
        for thread in threads:
            thread.join(timeout=WAIT_S)
        with Client(server.address, timeout_s=30.0) as observer:
            attempts = {job_id: observer.status(job_id)["attempts"] for job_id in outcomes}
    finally:
        server.stop()
    assert not any(thread.is_alive() for thread in threads)
    assert kills == KILLS, f"only {kills} kills landed before the jobs ended"
    expected = {f"soak-{i}-{n}": ("done", f"client {i} job {n}", 1000 * i + n)
                for i in range(CLIENTS) for n in range(JOBS_EACH)}
    lost = [job_id for job_id in expected if outcomes.get(job_id) in (None, "accepted")
            or outcomes[job_id][0] == "unknown_job"]
    assert lost == []
    reruns = sum(attempts.values()) - len(attempts)
    assert reruns >= 1, "no kill interrupted a running job"
    print(f"soak: {len(outcomes)} jobs accepted, {kills} SIGKILLs, {reruns} jobs re-run after "
          f"one, {len(lost)} lost")
    # Interrupted twice is the documented end of a job that keeps dying with the server.
    assert {job_id: outcome for job_id, outcome in outcomes.items()
            if outcome != expected[job_id] and outcome[0] != "interrupted"} == {}
