#!/usr/bin/env python3
"""Set-up, packaging, tests and demo for Understudy.

    python build.py            build the Blender extension zip(s) into dist/
    python build.py test [ARGS] set up .venv if needed, then run pytest (ARGS go to pytest)
    python build.py demo       run the main job on the bundled example
    python build.py env        only create or refresh .venv

The virtual environment lives in `.venv` (Python 3.11, the Python of Blender 4.2-5.0).
It is reused while the dependency lists in pyproject.toml are unchanged, and refreshed
when they change: a stamp file inside .venv records what was installed.

Which torch gets installed is set by UNDERSTUDY_TORCH (default "torch==2.13.0", the
CPU build on machines that carry it locally).  On a CUDA machine choose your own, e.g.

    UNDERSTUDY_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"

or UNDERSTUDY_TORCH=none to keep whatever torch the environment already has.

This file uses the standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP_NAME = "understudy-stamp.json"
REQUIRED_PYTHON = (3, 11)
DEFAULT_TORCH = "torch==2.13.0"
PYTEST_NO_TESTS_COLLECTED = 5


class BuildError(Exception):
    """A failure the user can fix; its message is one sentence saying how."""


# --------------------------------------------------------------------------- environment


def venv_python(venv: Path) -> Path:
    """The interpreter inside a virtual environment, on any OS."""
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def dependency_spec(pyproject_text: str) -> dict:
    """The parts of pyproject.toml that decide what gets installed.

    Editing tool settings (ruff, pytest) does not change this, so it does not force a
    reinstall; editing `dependencies` or `optional-dependencies` does.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: fall back to the whole file
        return {"pyproject": pyproject_text}
    project = tomllib.loads(pyproject_text).get("project", {})
    return {
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
    }


def wanted_stamp(pyproject_text: str, torch_spec: str, python_version: tuple[int, int]) -> dict:
    """What a correct environment's stamp says: dependencies, torch choice, Python."""
    spec = dependency_spec(pyproject_text)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
    return {"dependencies_sha256": digest, "torch": torch_spec, "python": list(python_version)}


def venv_state(venv: Path, wanted: dict) -> str:
    """'missing' (create it), 'stale' (reinstall into it) or 'fresh' (reuse it as is)."""
    if not venv_python(venv).exists():
        return "missing"
    try:
        recorded = json.loads((venv / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return "stale"
    if recorded.get("python") != wanted["python"]:
        return "missing"
    return "fresh" if recorded == wanted else "stale"


def find_python311() -> str:
    """An interpreter of the required version: this one, or python3.11 on PATH."""
    if sys.version_info[:2] == REQUIRED_PYTHON:
        return sys.executable
    found = shutil.which("python3.11")
    if found:
        return found
    raise BuildError(
        f"Understudy needs Python 3.11 (the Python of Blender 4.2-5.0) but this is "
        f"{sys.version.split()[0]} and no python3.11 is on PATH; install Python 3.11 "
        f"(for example `pyenv install 3.11`) and run `python3.11 build.py test`."
    )


def run_checked(command: list[str], failure: str) -> None:
    print("+", " ".join(shlex.quote(part) for part in command), flush=True)
    if subprocess.call(command) != 0:
        raise BuildError(failure)


def ensure_venv(venv: Path = VENV, root: Path = ROOT) -> Path:
    """Create, refresh or reuse the project's virtual environment; return its python."""
    torch_spec = os.environ.get("UNDERSTUDY_TORCH", DEFAULT_TORCH).strip()
    wanted = wanted_stamp((root / "pyproject.toml").read_text(), torch_spec, REQUIRED_PYTHON)
    state = venv_state(venv, wanted)
    python = venv_python(venv)
    if state == "fresh":
        print(f"Reusing {venv} (dependencies unchanged).", flush=True)
        return python

    if state == "missing":
        base = find_python311()
        print(f"Creating {venv} with {base} ...", flush=True)
        if venv.exists():
            shutil.rmtree(venv)
        run_checked(
            [base, "-m", "venv", str(venv)],
            f"Could not create the virtual environment at {venv}; check that Python 3.11 "
            f"has the venv module (Debian: apt-get install python3.11-venv) and try again.",
        )
    else:
        print(f"Dependencies changed: refreshing {venv} ...", flush=True)
    (venv / STAMP_NAME).unlink(missing_ok=True)

    install_failed = (
        "Installing the dependencies failed (pip's message is above); check the network "
        "or package index, then run `python build.py test` again."
    )
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    if torch_spec.lower() != "none":
        run_checked(pip + shlex.split(torch_spec), install_failed)
    run_checked(pip + ["-e", f"{root}[test]"], install_failed)
    (venv / STAMP_NAME).write_text(json.dumps(wanted, indent=2))
    return python


# --------------------------------------------------------------------------- commands


def command_test(pytest_args: list[str]) -> int:
    python = ensure_venv()
    command = [str(python), "-m", "pytest", *pytest_args]
    print("+", " ".join(command), flush=True)
    code = subprocess.call(command, cwd=ROOT)
    if code == PYTEST_NO_TESTS_COLLECTED:
        print("No tests were collected; that counts as a failure.", file=sys.stderr)
        return 1
    return code


def command_demo(args: list[str]) -> int:
    python = ensure_venv()
    return subprocess.call([str(python), "-m", "backend", "demo", *args], cwd=ROOT)


def command_package(_: list[str]) -> int:
    print("Packaging the Blender extension is not built yet (see the extension issue); "
          "nothing was written to dist/.", file=sys.stderr)
    return 1


def command_env(_: list[str]) -> int:
    ensure_venv()
    return 0


COMMANDS = {"test": command_test, "demo": command_demo, "env": command_env}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv and argv[0] not in COMMANDS:
        print(f"Unknown command {argv[0]!r}; use one of: {', '.join(COMMANDS)} "
              f"(or no argument to build the extension).", file=sys.stderr)
        return 2
    command = COMMANDS[argv[0]] if argv else command_package
    try:
        return command(argv[1:])
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
