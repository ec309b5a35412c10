"""Issue 17.1 as clients live it: three ways of using one connection, each of which
must get every reply, never time out, and fetch every result. Run against a single
server (tests/test_delivery.py) and a `serve --ray local:2` gateway (test_cluster.py).

The clients keep the shared client's default timeout: a reply the server dropped
would end the test with ServerUnavailable instead of an answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.client import Client
from tests.server_support import clip_pngs, settings, wait_until

WAIT_S = 300  # a hang guard for a busy machine, not a time limit
SILENT_S = 10.0  # how long the silent client reads nothing (the scenario)
MakeClient = Callable[[str], Client]


def submit_jobs(client: Client, prefix: str, count: int) -> list[str]:
    job_ids = [f"{prefix}-{index}" for index in range(count)]
    for index, job_id in enumerate(job_ids):
        client.submit(job_id, settings(job_id, seed=index), clip_pngs(6, shade=index))
    return job_ids


def assert_result(job_id: str, index: int, result) -> None:
    assert len(result.frames) == 4, job_id
    assert result.sidecar["seed"] == index and result.sidecar["settings"]["prompt"] == job_id


def sixteen_in_flight_waited_in_order(address: str, make_client: MakeClient, prefix: str) -> None:
    """One client, 16 jobs in flight, waiting on each in turn while the others' events
    pile up behind it: nothing it asked for is lost."""
    observer, client = make_client(address), make_client(address)
    dropped = observer.hello()["dropped_messages"]
    job_ids = submit_jobs(client, prefix, 16)
    for index, job_id in enumerate(job_ids):
        assert_result(job_id, index, client.wait(job_id, timeout_s=WAIT_S))
    assert observer.hello()["dropped_messages"] == dropped


def silent_then_newest_first(address: str, make_client: MakeClient, prefix: str) -> None:
    """One client submits, then reads (and sends) nothing for ten seconds and until
    another client sees every job done, then fetches newest first."""
    observer, client = make_client(address), make_client(address)
    job_ids = submit_jobs(client, prefix, 4)
    silent_since = time.monotonic()
    wait_until(lambda: all(observer.status(job_id)["state"] == "done" for job_id in job_ids),
               "every job done", timeout_s=WAIT_S)
    # The scenario's ten silent seconds, not a synchronisation (that is the wait above):
    # past them the server has forgotten the client as silent, and must still answer it.
    time.sleep(max(0.0, SILENT_S - (time.monotonic() - silent_since)))
    for index, job_id in reversed(list(enumerate(job_ids))):
        assert_result(job_id, index, client.fetch(job_id))


def polls_and_fetches_as_fast_as_it_can(address: str, make_client: MakeClient,
                                        prefix: str) -> None:
    """One client asks for status and fetches in a tight loop, no pause between
    requests, while its jobs' events stream in."""
    observer, client = make_client(address), make_client(address)
    dropped = observer.hello()["dropped_messages"]
    job_ids = submit_jobs(client, prefix, 4)
    fetched: dict[str, object] = {}
    requests = 0
    while len(fetched) < len(job_ids):
        for job_id in job_ids:
            if job_id not in fetched and client.status(job_id)["state"] == "done":
                fetched[job_id] = client.fetch(job_id)
            requests += 1
            assert requests < 10**6, "the jobs never finished"
    for index, job_id in enumerate(job_ids):
        assert_result(job_id, index, fetched[job_id])
    assert observer.hello()["dropped_messages"] == dropped


SCENARIOS = (sixteen_in_flight_waited_in_order, silent_then_newest_first,
             polls_and_fetches_as_fast_as_it_can)
