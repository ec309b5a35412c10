"""Start or join Ray from `serve --ray ADDRESS`, with Ray's token authentication on.

    auto         join the Ray cluster running on this machine (`ray start` was run here)
    HOST:PORT    join the cluster whose head (GCS) listens there
    local:N      start a private Ray instance in this process with N worker slots

Ray (2.52 and later) authenticates every control-plane call with one shared token when
RAY_AUTH_MODE=token. For `local:N` this module makes a token of its own (a file in the
gateway's state folder) and starts the instance in token mode. When joining a cluster
it sends the token Ray finds (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)
and then checks, with a throw-away client that has no token, that the cluster refuses
strangers; a cluster without authentication is refused with one sentence.

Workers: one per GPU (`num_gpus=1`); on machines without GPUs, one per unit of the
custom resource `understudy_slot` (`local:N` declares N of them; a CPU node of a real
cluster declares them with `ray start --resources='{"understudy_slot": 1}'`).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.errors import UnderstudyError
from shared.errors import ErrorCode

SLOT_RESOURCE = "understudy_slot"
TOKEN_FILE_NAME = "ray_auth_token"
# How long the stranger probe may try before it must have been refused.
PROBE_TIMEOUT_S = 60
_LOCAL = re.compile(r"local:(\d+)")
_HOST_PORT = re.compile(r"[A-Za-z0-9.\-\[\]:]+:\d+")


class ClusterConfigError(UnderstudyError):
    """`--ray` cannot be used as given; the sentence says what to do."""

    code = ErrorCode.CLUSTER_CONFIG


@dataclass(frozen=True)
class RayTarget:
    """What `--ray` asked for: a cluster to join (`address`) or a private instance."""

    address: str | None  # "auto" or HOST:PORT; None for a private local instance
    local_slots: int | None = None

    @property
    def label(self) -> str:
        return self.address or f"local:{self.local_slots}"


@dataclass(frozen=True)
class WorkerPlacement:
    """How many workers the cluster holds and the Ray resources each one asks for."""

    count: int
    actor_options: dict[str, Any]  # passed to ActorClass.options(...)
    description: str  # "2 GPUs", "3 worker slots", for the start-up line
    torch_threads: int | None = None  # CPU workers sharing one machine split its cores


@dataclass
class RayConnection:
    """This process's link to Ray; `close()` stops a private instance or leaves a cluster."""

    target: RayTarget
    gcs_address: str
    placement: WorkerPlacement
    token_path: Path | None = None  # the private instance's token file
    closed: bool = field(default=False, init=False)

    def close(self) -> None:
        if not self.closed:
            import ray

            ray.shutdown()
            self.closed = True


def parse_ray_target(text: str) -> RayTarget:
    """`auto`, `local:N` or HOST:PORT; anything else is a ClusterConfigError."""
    text = text.strip()
    if text == "auto":
        return RayTarget(address="auto")
    local = _LOCAL.fullmatch(text)
    if local:
        slots = int(local.group(1))
        if slots < 1:
            raise ClusterConfigError("--ray local:N needs at least one worker slot; use local:1 "
                                     "or more.")
        return RayTarget(address=None, local_slots=slots)
    if _HOST_PORT.fullmatch(text):
        return RayTarget(address=text)
    raise ClusterConfigError(f"--ray {text!r} is not a Ray address; give `auto` (the cluster "
                             "started on this machine with `ray start`), HOST:PORT of the head "
                             "node, or local:N for a private instance with N workers.")


def connect(target: RayTarget, token_dir: Path) -> RayConnection:
    """Start or join Ray with token authentication, and work out the worker placement."""
    if target.address is None:
        return _start_private(target, Path(token_dir))
    return _join(target)


def _start_private(target: RayTarget, token_dir: Path) -> RayConnection:
    """`local:N`: a Ray instance inside this process, in token mode with a token of its own."""
    token_path = _private_token(token_dir)
    _enable_token_auth({"RAY_AUTH_TOKEN_PATH": str(token_path)})
    ray = _import_ray()
    context = ray.init(num_gpus=None, resources={SLOT_RESOURCE: target.local_slots},
                       include_dashboard=False, log_to_driver=False)
    placement = _local_placement(ray.cluster_resources(), target.local_slots)
    return RayConnection(target, context.address_info["gcs_address"], placement, token_path)


def _join(target: RayTarget) -> RayConnection:
    """`auto` or HOST:PORT: join with this machine's token, and only a cluster that
    refuses clients without one."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        raise ClusterConfigError("RAY_AUTH_MODE is set to "
                                 f"{os.environ['RAY_AUTH_MODE']!r}; Understudy joins Ray clusters "
                                 "only with token authentication, so unset it or set it to token.")
    if not _token_available():
        raise ClusterConfigError(
            "Understudy joins Ray clusters with token authentication and this machine has no "
            "Ray token; copy the cluster's token (`ray get-auth-token` on the head) to "
            "~/.ray/auth_token or point RAY_AUTH_TOKEN_PATH at it.")
    _enable_token_auth({})
    ray = _import_ray()
    from ray.exceptions import AuthenticationError

    try:
        context = ray.init(address=target.address, log_to_driver=False)
    except ConnectionError as error:
        raise ClusterConfigError(_not_found(target, str(error))) from None
    except AuthenticationError:
        raise ClusterConfigError(
            f"The Ray cluster at {target.label} refused this machine's token; copy the "
            "cluster's token (`ray get-auth-token` on the head) to ~/.ray/auth_token or "
            "point RAY_AUTH_TOKEN_PATH at it.") from None
    gcs_address = context.address_info["gcs_address"]
    try:
        if not refuses_strangers(gcs_address):
            raise ClusterConfigError(
                f"The Ray cluster at {target.label} accepts clients without a token; restart "
                "it with token authentication (`ray get-auth-token --generate`, then "
                "`RAY_AUTH_MODE=token ray start ...` on every node with that token).")
        placement = _cluster_placement(ray.cluster_resources(), target.label)
    except ClusterConfigError:
        ray.shutdown()
        raise
    return RayConnection(target, gcs_address, placement)


def _not_found(target: RayTarget, ray_says: str) -> str:
    """The sentence for a cluster Ray could not find or reach."""
    if target.address != "auto":
        return (f"No Ray cluster answers at {target.label}; check the address and that "
                "`ray start --head` runs there (README: Many GPUs).")
    if "multiple active Ray instances" in ray_says:
        return ("Several Ray clusters run on this machine; give --ray HOST:PORT of the one to "
                "join (`ray status` on its head prints the address).")
    return ("No Ray cluster is running on this machine; start one with `ray start --head` "
            "(README: Many GPUs), or give --ray HOST:PORT of a head node, or local:N.")


def refuses_strangers(gcs_address: str) -> bool:
    """True when a Ray client without the token cannot connect to `gcs_address`.

    Runs a throw-away interpreter with authentication off and no token anywhere it
    could look (a fresh HOME, no RAY_AUTH_* variables), allowed a single connection
    attempt: Ray would otherwise keep retrying a refused connection for 20 s.
    """
    import tempfile

    code = f"import ray\nray.init(address={gcs_address!r}, log_to_driver=False)\nprint('JOINED')"
    with tempfile.TemporaryDirectory(prefix="understudy-ray-probe-") as home:
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("RAY_AUTH")}
        env.update(HOME=home, RAY_AUTH_MODE="disabled", RAY_gcs_server_port_wait_time_s="1")
        try:
            probe = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                   text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return True  # it never got in
    return "JOINED" not in probe.stdout


# --------------------------------------------------------------------------- helpers


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterConfigError("--ray needs Ray, which is not installed here; install the "
                                 "cluster extra (`pip install '.[cluster]'` in the project, or "
                                 "`pip install 'ray>=2.60'`).") from None
    return ray


def _enable_token_auth(variables: dict[str, str]) -> None:
    """Turn on token mode for this process and the Ray processes it starts.

    Ray reads RAY_AUTH_MODE into its cached config when it is first imported; if it was
    imported already, the cache is refreshed the way Ray's own start-up does it.
    """
    os.environ.update(RAY_AUTH_MODE="token", **variables)
    if sys.modules.get("ray") is not None:
        from ray._raylet import Config

        Config.initialize("")


def _token_available() -> bool:
    """Whether Ray will find a token where it looks (its own order of precedence)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def _private_token(token_dir: Path) -> Path:
    """The private instance's token: made once, readable by this user only."""
    path = token_dir / TOKEN_FILE_NAME
    if not path.exists():
        token_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secrets.token_hex(32))
    return path


def _local_placement(resources: dict[str, float], slots: int) -> WorkerPlacement:
    """`local:N`: N workers, each on its own GPU when the machine has GPUs."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        if slots > gpus:
            raise ClusterConfigError(f"--ray local:{slots} asks for {slots} workers but this "
                                     f"machine has {gpus} GPU{'s' if gpus > 1 else ''}; use "
                                     f"local:{gpus} or fewer.")
        return WorkerPlacement(slots, {"num_gpus": 1}, f"{slots} GPU{'s' if slots > 1 else ''}")
    cores = int(resources.get("CPU", 1))
    return WorkerPlacement(slots, {"num_cpus": 0, "resources": {SLOT_RESOURCE: 1}},
                           f"{slots} worker slot{'s' if slots > 1 else ''} on CPU",
                           torch_threads=max(1, cores // slots))


def _cluster_placement(resources: dict[str, float], label: str) -> WorkerPlacement:
    """A joined cluster: one worker per GPU, or per `understudy_slot` on CPU nodes."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return WorkerPlacement(gpus, {"num_gpus": 1}, f"{gpus} GPU{'s' if gpus > 1 else ''}")
    slots = int(resources.get(SLOT_RESOURCE, 0))
    if slots:
        return WorkerPlacement(slots, {"num_cpus": 0, "resources": {SLOT_RESOURCE: 1}},
                               f"{slots} worker slot{'s' if slots > 1 else ''}")
    raise ClusterConfigError(
        f"The Ray cluster at {label} has no GPUs; run `ray start` on GPU machines, or give CPU "
        f"machines worker slots with `ray start --resources='{{\"{SLOT_RESOURCE}\": 1}}'`.")

