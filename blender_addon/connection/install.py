"""The project on this computer that runs the backend, and the command that starts it.

Plain Python (no bpy). The editor enters the project folder (its `.venv` Python is used)
or that Python itself; it is checked at once by asking that Python for the command
line's defaults (the state folder, the model, the cache folder), the one place they
live. What cannot run the backend is one sentence naming the command to run there.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..rules.errors import UserError

SETUP_COMMAND = "python build.py"  # what sets up the project's environment
# Asks the project's Python for the command line's defaults: the one place they live.
DEFAULTS_QUERY = ("import json; from backend.edit import DEFAULT_CACHE, DEFAULT_MODEL; "
                  "from backend.server.app import DEFAULT_STATE_DIR; "
                  "print(json.dumps({'model': DEFAULT_MODEL, 'cache_dir': str(DEFAULT_CACHE), "
                  "'state_dir': str(DEFAULT_STATE_DIR)}))")



@dataclass(frozen=True)
class Install:
    """A project checkout whose Python can run the backend, and the command line's defaults."""

    python: str
    project: str
    defaults: dict  # model, cache_dir, state_dir: what `serve` uses without flags


@dataclass(frozen=True)
class LocalSettings:
    """How to run the backend on this computer (the preferences); empty: the command line's
    default."""

    address: str
    model: str = ""
    device: str = ""
    state_dir: str = ""
    cache_dir: str = ""
    extra_args: str = ""  # more `serve` flags, as typed on a command line


def venv_python(project: Path) -> Path:
    """The Python of a project's `.venv` (build.py makes it)."""
    if sys.platform == "win32":
        return project / ".venv" / "Scripts" / "python.exe"
    return project / ".venv" / "bin" / "python"


def is_project(folder: Path) -> bool:
    return (folder / "backend" / "__main__.py").is_file()


def project_of(python: Path) -> Path | None:
    """The project a Python belongs to: the nearest folder above it holding `backend/`."""
    for folder in python.absolute().parents:
        if is_project(folder):
            return folder
    return None


def locate(entered: str) -> tuple[Path, Path]:
    """(python, project) from a project folder or its Python; UserError in one sentence."""
    text = entered.strip()
    if not text:
        raise UserError("Set the project folder (or its Python) in the Understudy preferences, "
                        "under Backend.")
    path = Path(text).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist; pick the folder the Understudy project is in "
                        f"(or its .venv Python) in the preferences.")
    if path.is_dir():
        if not is_project(path):
            raise UserError(f"{path} holds no Understudy backend (no backend/ folder); pick the "
                            f"folder the project is in, where `{SETUP_COMMAND}` was run.")
        python = venv_python(path)
        if not python.is_file():
            raise UserError(f"{path} has no backend environment yet; run `{SETUP_COMMAND}` "
                            f"there, then try again.")
        return python, path
    project = project_of(path)
    if project is None:
        raise UserError(f"{path} is not the Python of an Understudy project; pick the project "
                        f"folder, where `{SETUP_COMMAND}` was run.")
    return path, project


def find_install(entered: str) -> Install:
    """Check a project folder or Python and ask it for the command line's defaults."""
    python, project = locate(entered)
    try:
        answer = subprocess.run([str(python), "-c", DEFAULTS_QUERY], cwd=project,
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise UserError(f"{python} could not be run ({error}); run `{SETUP_COMMAND}` in "
                        f"{project}, then try again.") from error
    try:
        defaults = json.loads(answer.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        defaults = None
    if answer.returncode != 0 or not isinstance(defaults, dict):
        raise UserError(f"{python} cannot run the backend (its environment is incomplete); run "
                        f"`{SETUP_COMMAND}` in {project}, then try again.")
    return Install(str(python), str(project), defaults)


def loopback_host_port(address: str) -> tuple[str, int]:
    """("127.0.0.1", 5555) from "tcp://127.0.0.1:5555"; the backend on this computer listens
    on loopback only (another computer reaches it through "a server" with keys)."""
    text = address.strip()
    host, _, port = text.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    if not text.startswith("tcp://") or not port.isdigit() or host not in (
            "127.0.0.1", "localhost", "::1"):
        raise UserError(f"The backend on this computer listens on a loopback address such as "
                        f"tcp://127.0.0.1:5555, not {address!r}; change the address in the "
                        f"preferences.")
    return host, int(port)


def listening(address: str) -> bool:
    """Whether something accepts connections at this loopback address (refused at once
    when nothing listens, so this never waits for a timeout)."""
    host, port = loopback_host_port(address)
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def state_folder(settings: LocalSettings, install: Install) -> Path:
    return Path(settings.state_dir or install.defaults["state_dir"]).expanduser()


def serve_command(install: Install, settings: LocalSettings) -> list[str]:
    """`python -m backend serve` with the flags the preferences set (empty ones are left
    to the command line's defaults)."""
    command = [install.python, "-m", "backend", "serve", "--bind", settings.address.strip(),
               "--state-dir", str(state_folder(settings, install))]
    for flag, value in (("--model", settings.model), ("--device", settings.device),
                        ("--cache-dir", settings.cache_dir)):
        if value.strip():
            command += [flag, value.strip()]
    try:
        command += shlex.split(settings.extra_args)
    except ValueError as error:
        raise UserError(f"The extra serve flags cannot be read ({error}); fix them in the "
                        f"preferences.") from error
    return command
