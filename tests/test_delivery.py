"""Issue 17.1 on one box: a real `python -m backend serve` process and real client
sockets; the scenarios are in tests/delivery.py (the gateway runs them in
tests/test_cluster.py)."""

from __future__ import annotations

import pytest

from shared.client import Client
from tests.delivery import SCENARIOS
from tests.server_support import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("delivery") / "state").start()
    yield process
    process.stop()
    assert "Traceback" not in process.log()


@pytest.fixture
def make_client():
    clients: list[Client] = []

    def make(address: str) -> Client:
        clients.append(Client(address))  # the default timeout: a lost reply fails the test
        return clients[-1]

    yield make
    for client in clients:
        client.close()


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda scenario: scenario.__name__)
def test_every_reply_arrives_and_every_result_is_fetched(server, make_client, scenario):
    scenario(server.address, make_client, scenario.__name__.replace("_", "-")[:40])
