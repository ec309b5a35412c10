"""One error root, one registry of codes, one way from an exception to a reply."""

from __future__ import annotations

import ast
import importlib

import pytest

from shared.errors import ErrorCode, UnderstudyError
from shared.protocol import ProtocolError, failure_reply
from tests.conftest import REPO_ROOT

# Every module that defines an error class: importing them fills UnderstudyError's tree.
ERROR_MODULES = (
    "shared.errors", "shared.protocol", "shared.client", "shared.sidecar", "backend.errors",
    "backend.server.engine_api", "backend.server.security", "backend.server.store",
    "backend.cluster.connect", "backend.cluster.runner", "blender_addon.rules.errors",
    "blender_addon.rules.channels",
)


def all_subclasses(root: type) -> set[type]:
    found, waiting = set(), [root]
    while waiting:
        for sub in waiting.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                waiting.append(sub)
    return found


def test_every_error_class_carries_a_registered_code():
    for name in ERROR_MODULES:
        importlib.import_module(name)
    classes = {UnderstudyError, *all_subclasses(UnderstudyError)}
    unregistered = {cls.__qualname__: cls.code for cls in classes
                    if not isinstance(cls.code, str) or cls.code not in set(ErrorCode)}
    assert not unregistered
    # the codes issue 17 found missing, and the Ray actor's former literal
    for code in ("model_missing", "out_of_memory", "cancelled", "worker_lost", "internal"):
        assert code in set(ErrorCode)


def test_the_client_the_protocol_and_the_extension_share_one_root():
    from blender_addon.rules.errors import UserError
    from shared.client import ClientError, JobFailed

    for cls in (ClientError, ProtocolError, UserError):
        assert issubclass(cls, UnderstudyError)
    carried = JobFailed("The GPU ran out of memory; try fewer frames.", "out_of_memory")
    assert carried.code == "out_of_memory" and JobFailed("x").code == "job_failed"
    error = ProtocolError("The header must be a JSON object.", ErrorCode.BAD_HEADER)
    assert error.code == "bad_header"


def test_failure_reply_keeps_a_user_error_and_names_a_bug():
    from backend.errors import BadClipError, OutOfMemoryError

    assert failure_reply(BadClipError("The clip is empty; pick another."), "The server failed "
                         "on this job", "the server log") == ("bad_clip", "The clip is empty; pick another.")
    assert failure_reply(OutOfMemoryError("Less."), "x", "y") == ("out_of_memory", "Less.")
    assert failure_reply(UnderstudyError("Pass the code.", "worker_lost"), "x", "y") == (
        "worker_lost", "Pass the code.")
    assert failure_reply(KeyError("frames"), "Worker worker-0 failed on this job",
                         "its Ray worker log") == (
        "internal", "Worker worker-0 failed on this job (KeyError); see its Ray worker log.")


@pytest.mark.parametrize("path", ["backend/server/job_thread.py", "backend/cluster/engine_actor.py"])
def test_the_job_thread_and_the_ray_actor_reply_through_failure_reply(path):
    source = (REPO_ROOT / path).read_text()
    assert "failure_reply(" in source and '"internal"' not in source


def imported_modules(path: str) -> set[str]:
    tree = ast.parse((REPO_ROOT / path).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_the_pool_and_the_actor_handles_do_not_import_each_other():
    assert "backend.cluster.pool" in imported_modules("backend/cluster/engine_handles.py")
    assert "backend.cluster.engine_handles" not in imported_modules("backend/cluster/pool.py")
